"""The papers' claims of issue 21 on a fidelity run's per-seed test records.

    python benchmarks/fidelity_claims.py /tmp/dr19/results

Per target and pair of rows: the means over seeds and the 95 % interval of their difference,
seeds and test images resampled together (``delta_interval``, the report's own interval).
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import numpy as np

from detprune.evaluation.bootstrap import delta_interval, mark

PAIRS = (
    ("miep", "groupfisher", "MIEP > GroupFisher"),
    ("miep-tli-foi", "groupfisher", "+FOI helps (TLI + FOI vs TLI)"),
    ("miep-tli-iri", "groupfisher", "+IRI helps (TLI * IRI vs TLI)"),
    ("lcp", "dcp", "LCP > DCP"),
    ("gcp-sad", "gcp", "SAD helps GCP"),
    ("gcp", "slim", "gcp >= slim"),
    ("dcp", "l1", "dcp >= l1 (same widths)"),
    ("lcp", "l1", "lcp >= l1 (same widths)"),
)
VERDICT = {"better": "reproduced", "worse": "contradicted", "within noise": "within noise"}


def records(results: str, method: str, pct: str) -> list[tuple[float, np.ndarray]]:
    out = []
    for path in sorted(glob.glob(f"{results}/metrics/{method}/flops{pct}/seed*.json")):
        record = json.loads(Path(path).read_text())
        if record["split"] != "test":
            raise ValueError(f"{path}: scored on {record['split']}, not test")
        out.append((record["metrics"]["AP"], np.asarray(record["bootstrap"]["AP"])))
    return out


def main(results: str) -> None:
    print("| target | claim | rows (mean over seeds) | difference [95 %] | verdict |")
    print("|---|---|---|---|---|")
    for pct in ("25", "10"):
        for a, b, claim in PAIRS:
            ra, rb = records(results, a, pct), records(results, b, pct)
            if not ra or not rb:
                print(f"| {pct} % | {claim} | {a} n={len(ra)}, {b} n={len(rb)} | | not run |")
                continue
            lo, hi = delta_interval([v for _, v in ra], [v for _, v in rb])
            ma, mb = (100 * np.mean([ap for ap, _ in r]) for r in (ra, rb))
            print(
                f"| {pct} % | {claim} | {a} {ma:.1f} (n={len(ra)}), {b} {mb:.1f} (n={len(rb)}) "
                f"| {ma - mb:+.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {VERDICT[mark(lo, hi)]} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
