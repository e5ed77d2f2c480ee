"""How far two pruned checkpoints of the same baseline chose the same channels.

For every layer whose output channels both checkpoints pruned (torch-pruning's history,
indices into the unpruned layer), prints the widths and the share of the first
checkpoint's kept channels that the second one kept too; then the MAC-free summary: the
mean share over layers, weighted by kept channels. Used in issue 21 to tell DCP's channel
*selection* from its l1-allocated *widths*:

    python benchmarks/selection_overlap.py BASELINE.pt A.pt B.pt
"""

from __future__ import annotations

import argparse

from detprune.train.checkpoint import load


def kept_sets(path: str, widths: dict[str, int]) -> dict[str, set[int]]:
    """Per pruned layer, the output channels the checkpoint at ``path`` kept."""
    removed: dict[str, set[int]] = {}
    for name, is_out, idxs in load(path)["pruning_history"]:
        if is_out and name in widths:
            removed.setdefault(name, set()).update(int(i) for i in idxs)
    return {n: set(range(widths[n])) - r for n, r in removed.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("baseline")
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args()
    state = load(args.baseline)["state_dict"]
    widths = {
        k[: -len(".weight")]: int(v.shape[0])
        for k, v in state.items()
        if k.endswith(".weight") and v.ndim >= 2
    }
    a, b = kept_sets(args.a, widths), kept_sets(args.b, widths)
    print("| layer | channels | kept (a) | kept (b) | a's kept also kept by b |")
    print("|---|---:|---:|---:|---:|")
    shared = total = 0
    for name in sorted(set(a) & set(b)):
        both = len(a[name] & b[name])
        shared, total = shared + both, total + len(a[name])
        share = both / max(len(a[name]), 1)
        print(f"| {name} | {widths[name]} | {len(a[name])} | {len(b[name])} | {share:.2f} |")
    print(f"\nweighted share: {shared / max(total, 1):.3f} over {total} kept channels")


if __name__ == "__main__":
    main()
