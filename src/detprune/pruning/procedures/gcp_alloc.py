"""GCP's group fractions and how a FLOPs target is spread over them.

Niu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (arXiv 2306.01526), give every group of the
detector its own pruning fraction (YOLOv4: 0.18 / 0.50 / 0.97 for the shallow, middle
and deep backbone, 0.865 / 0.68 for the neck parts) and prune every group to its own
|gamma| threshold. Here a FLOPs target scales the relative fractions f_g by one factor k,
found by bisection (``prune.options.<gcp>.allocation``):

- ``capped`` (default): fraction_g = min(cap, f_g * k), cap = ``max_layer_ratio`` (0.9,
  the share of a layer every other method may remove at most). A group at the cap stops
  growing and a larger k only grows the groups below it, so what the saturated groups
  cannot give is spread over the rest (water-filling).
- ``saturating``: fraction_g = min(1, f_g * k), the earlier rule, kept for ablations: at
  10 % FLOPs on fasterrcnn_narrow_fpn with the YOLOv4 pattern extrapolated to its stride
  groups it took the neck, stride-32 and head groups to 1, so FPN, RPN conv, fc6 / fc7 and
  layer3 / 4 kept 4 channels each (0.0 mAP).

The relative fractions f_g (:func:`default_fractions`): the authors' for the YOLOv4
entries, equal for every other detector (the paper gives none); ``fractions`` overrides.
With the default cap of 0.9 the authors' 0.97 (stride-32 + SPP) is capped once k > 0.93;
``max_layer_ratio: 0.99`` lifts the cap and the per-layer floor toward the authors' setting.

Nothing here imports torch: the plans and their FLOPs come in as a function of k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("detprune.prune.gcp")

ALLOCATIONS = ("capped", "saturating")

# The authors' YOLOv4 fractions (their public code: 5 groups split at darknet layers 56, 86,
# 117, 137, 162), keyed by the YOLOv4 entries' group names, which follow the same splits:
# stem to the stride-16 downsample, the stride-16 stage, the stride-32 stage with SPP, the
# top-down PAN, the bottom-up PAN with the heads.
AUTHORS_YOLOV4: dict[str, float] = {
    "backbone_early": 0.18,
    "backbone_late": 0.50,
    "spp": 0.97,
    "pan": 0.865,
    "heads": 0.68,
}
# Any other detector: the paper gives no fractions, so every group starts equal and the
# FLOPs target scales them together (within-group |gamma| ranking decides the channels).
# Chosen on the val split (benchmarks/method_fidelity.md): on fasterrcnn_narrow_fpn at 10 %
# FLOPs, equal fractions gave 27.9 val AP, the YOLOv4 pattern extrapolated to its stride
# groups (deep stages and heads lose most) 6.6.
FALLBACK_FRACTION = 0.5


def default_fractions(groups: Mapping[str, Any]) -> dict[str, float]:
    """The authors' fractions for a YOLOv4 entry (exactly their five groups), else equal."""
    if set(groups) == set(AUTHORS_YOLOV4):
        return dict(AUTHORS_YOLOV4)
    return dict.fromkeys(groups, FALLBACK_FRACTION)


def group_fractions(groups: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
    """:func:`default_fractions` of the entry's groups, overridden by ``options['fractions']``."""
    given = dict(options.get("fractions") or {})
    unknown = sorted(set(given) - set(groups))
    if unknown:
        raise KeyError(
            f"prune.options.<gcp>.fractions: unknown groups {unknown}; known: {sorted(groups)}"
        )
    defaults = default_fractions(groups)
    out = {g: float(given.get(g, defaults[g])) for g in groups}
    bad = {g: f for g, f in out.items() if not 0 <= f <= 1}
    if bad:
        raise ValueError(f"prune.options.<gcp>.fractions: not in [0, 1]: {bad}")
    return out


def fraction_ceiling(allocation: str, max_layer_ratio: float) -> float:
    """The largest fraction a group may get: ``max_layer_ratio`` when ``capped``, 1 when
    ``saturating``."""
    if allocation == "capped":
        return float(max_layer_ratio)
    if allocation == "saturating":
        return 1.0
    raise ValueError(
        f"prune.options.<gcp>.allocation: {allocation!r} is not one of {list(ALLOCATIONS)}"
    )


def scale_fractions(fractions: Mapping[str, float], k: float, ceiling: float) -> dict[str, float]:
    """Every group's fraction scaled by ``k``, at most ``ceiling``."""
    return {g: min(ceiling, f * k) for g, f in fractions.items()}


def max_scale(fractions: Mapping[str, float], ceiling: float) -> float:
    """A factor at which every group with a positive fraction is at ``ceiling`` (the
    bisection's upper bound; a hair above ceiling / min f so rounding cannot stop short)."""
    positive = [f for f in fractions.values() if f > 0]
    return ceiling / min(positive) * (1 + 1e-9) if positive else 1.0


def saturated(
    fractions: Mapping[str, float], scaled: Mapping[str, float], ceiling: float
) -> list[str]:
    """The groups (sorted) whose scaled fraction is at ``ceiling``, fraction 0 aside."""
    return sorted(g for g, f in scaled.items() if fractions[g] > 0 and f >= ceiling * (1 - 1e-9))


def bisect_scale(
    kept_at: Callable[[float], float],
    fractions: Mapping[str, float],
    target: float,
    *,
    ceiling: float,
    tolerance: float,
    max_trials: int,
) -> tuple[float, list[dict[str, float]]]:
    """The factor k whose plan keeps the share of the FLOPs closest to ``target``, and the
    trials (``kept_at(k)``: the FLOPs share the plan of factor k keeps, non-increasing in
    k). It first tries every group at ``ceiling``: if even that keeps more than
    ``target * (1 + tolerance)``, a ValueError names the target, that best share and the
    option to change. Then it bisects [0, max_scale] and stops within ``tolerance / 4``.
    """
    hi = max_scale(fractions, ceiling)
    floor = kept_at(hi)
    trials = [{"scale": hi, "kept": floor}]
    if floor > target * (1 + tolerance):
        raise ValueError(
            f"GCP cannot reach {target:.3f} of the FLOPs: with every group at fraction "
            f"{ceiling:g} (the most it allows) the model keeps {floor:.4f} at best; "
            f"raise prune.options.<method>.max_layer_ratio (or prune.max_layer_ratio: it caps "
            f"the group fractions and sets the per-layer floor) or lower "
            f"prune.options.<method>.min_channels"
        )
    best, lo = (abs(floor / target - 1), hi), 0.0
    for _ in range(max_trials):
        k = (lo + hi) / 2
        kept = kept_at(k)
        err = abs(kept / target - 1)
        trials.append({"scale": k, "kept": kept})
        log.info("GCP scale %.4f keeps %.4f of MACs (target %.3f)", k, kept, target)
        if err < best[0]:
            best = (err, k)
        if err <= tolerance / 4:
            break
        lo, hi = (k, hi) if kept > target else (lo, k)
    return best[1], trials


def group_report(
    units: Sequence[Any],
    plan: Mapping[str, list[int]],
    scaled: Mapping[str, float],
    at_cap: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Per group of the coupled ``units`` (GCP's ``Unit``: root, group, scores): its
    scaled fraction, whether it is at the cap (in ``at_cap``), removed / total channels,
    and every coupled group's root layer -> [kept, total] channels."""
    out = {}
    for g, frac in scaled.items():
        layers = {
            u.root: [len(u.scores) - len(plan.get(u.root, [])), len(u.scores)]
            for u in units
            if u.group == g
        }
        total = sum(n for _, n in layers.values())
        out[g] = {
            "fraction": frac,
            "saturated": g in at_cap,
            "removed": total - sum(k for k, _ in layers.values()),
            "total": total,
            "layers": layers,
        }
    return out


def summary_line(groups: Mapping[str, Mapping[str, Any]], ceiling: float, kept: float) -> str:
    """One line: every group's scaled fraction (* at the ceiling), removed / total channels
    and the FLOPs share kept."""
    parts = [
        f"{g} {v['fraction']:.3f}{'*' if v['saturated'] else ''} ({v['removed']}/{v['total']})"
        for g, v in groups.items()
    ]
    removed = sum(v["removed"] for v in groups.values())
    total = sum(v["total"] for v in groups.values())
    return (
        f"GCP keeps {kept:.4f} of MACs, removed {removed}/{total} channels; group fraction "
        f"(removed/total): {', '.join(parts)}; * = at the cap {ceiling:g}"
    )


def floor_share(channels: int, max_layer_ratio: float) -> int:
    """ceil((1 - max_layer_ratio) * C): the channels no layer goes below in every method
    (rounded to 6 decimals first, so 0.1 * 30 is 3, not 4)."""
    return math.ceil(round((1 - max_layer_ratio) * channels, 6))
