#!/usr/bin/env bash
# Create .venv (Python 3.11) and install detprune with the pinned dependencies of
# pyproject.toml. Idempotent. `--dev` adds the test tools (pytest, ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch is pinned (2.14.1) so pip never picks a local torch wheel that lacks the
# compiled ops the registry's torchvision needs.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}" \
  2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import torch, torchvision, torchvision.ops; torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)"
echo "detprune installed in .venv ($(.venv/bin/detprune --version))"
