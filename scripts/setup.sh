#!/usr/bin/env bash
# Create .venv (Python 3.11) and install detprune with the pinned dependencies of
# pyproject.toml. Idempotent. `--dev` adds the test tools (pytest, ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
# The registry's torch 2.14.1 brings its CUDA libraries: the environment takes about
# 6.5 GB. Say so up front rather than fail half-way through pip with ENOSPC.
if [ ! -x .venv/bin/python ]; then
  need_kb=$((7 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "setup.sh: $(pwd) has $((free_kb / 1024)) MB free; the environment (.venv) needs about 7 GB" >&2
    exit 1
  fi
  "$python" -m venv .venv
fi
# torch is pinned (2.14.1) so pip never picks a local torch wheel that lacks the
# compiled ops the registry's torchvision needs.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}" \
  2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import torch, torchvision, torchvision.ops; torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)"
echo "detprune installed in .venv ($(.venv/bin/detprune --version))"
