"""Do two timing records of the same checkpoints agree? (issue 24: "two default runs on the
same machine give medians within 10 %").

Reads two records of ``detprune time-latency`` (e.g. a default run's
``results/metrics/latency/default/seed0.json``, copied aside, and the record of a second
timing or a second run of the same config), pairs their rows by detector, method, FLOPs
target and seed and prints, per row
and per timing (PyTorch whole detector, ONNX Runtime network), both medians, their IQRs and
the relative difference; then the largest difference, and per method whether the latency
falls as the FLOPs target falls.

Usage: python benchmarks/latency_repeat.py first.json second.json [--md out.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("torch", "onnxruntime")


def rows_by_checkpoint(path: Path) -> dict[tuple, dict]:
    """Rows keyed by (detector, method, FLOPs target, seed): two runs of one config in two
    clones write checkpoints with the same weights under other paths."""
    record = json.loads(path.read_text())
    return {(r["detector"], r["method"], r["flops_target"], r["seed"]): r for r in record["rows"]}


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> tuple[list[str], dict[str, float]]:
    lines = [
        "| method | FLOPs target | PyTorch ms, 1st (IQR) | 2nd (IQR) | diff | "
        "ORT ms, 1st (IQR) | 2nd (IQR) | diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = dict.fromkeys(KINDS, 0.0)
    for key, ra in a.items():
        rb = b[key]
        cells = [ra["method"], f"{ra['flops_target'] * 100:g} %"]
        for kind in KINDS:
            ma, mb = ra[kind]["median_ms"], rb[kind]["median_ms"]
            rel = (mb - ma) / ma
            worst[kind] = max(worst[kind], abs(rel))
            cells += [
                f"{ma:.2f} ({ra[kind]['iqr_ms']:.2f})",
                f"{mb:.2f} ({rb[kind]['iqr_ms']:.2f})",
                f"{rel * 100:+.1f} %",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, worst


def monotone(rows: dict[tuple, dict]) -> list[str]:
    """Per method and timing: does the median fall as the FLOPs target falls?"""
    by_method: dict[str, list[dict]] = {}
    for r in rows.values():
        if r["method"] != "baseline":
            by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in sorted(by_method.items()):
        rs.sort(key=lambda r: -r["flops_target"])
        for kind in KINDS:
            ms = [r[kind]["median_ms"] for r in rs]
            ok = all(x > y for x, y in zip(ms, ms[1:], strict=False))
            shown = " > ".join(f"{m:.2f}" for m in ms)
            out.append(f"- {method} {kind}: {shown} ms {'falls' if ok else 'DOES NOT fall'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args()
    a, b = rows_by_checkpoint(args.first), rows_by_checkpoint(args.second)
    if set(a) != set(b):
        raise SystemExit("the two records time different rows")
    lines, worst = compare(a, b)
    lines += ["", *(f"largest |difference|, {k}: {v * 100:.1f} %" for k, v in worst.items())]
    lines += ["", "first record:", *monotone(a), "", "second record:", *monotone(b)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
