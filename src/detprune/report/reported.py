"""The papers' reported numbers (``config/reported.yaml``, from ``docs/papers/METHODS.md``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detprune.workflow import pct

#: The data file relative to the repository root: the CLI's default (the library takes a path).
DEFAULT_PATH = Path("config/reported.yaml")

DATASETS: tuple[str, ...] = ("coco", "voc07", "imagenet", "voc")
METRICS: tuple[str, ...] = ("mAP", "top1")
_TEXT = ("source", "dataset", "detector", "method", "metric")
#: Required fields of an entry; ``extra`` is optional.
FIELDS: tuple[str, ...] = (*_TEXT, "flops", "baseline", "pruned")
SOURCE_FIELDS: tuple[str, ...] = ("title", "venue", "doi", "arxiv")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class Reported:
    """One reported result: the unpruned and the pruned model's figure, as a paper states them."""

    id: str
    source: str
    dataset: str
    detector: str
    method: str
    flops: float
    metric: str
    baseline: float | None
    pruned: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def entry_id(source: str, dataset: str, detector: str, method: str, flops: float) -> str:
    """The id of an entry: ``<source>/<dataset>/<detector>/<method>@<pct>``, the FLOPs part
    formatted as in result paths (:func:`detprune.workflow.pct`: 0.651 -> '65.1')."""
    return f"{source}/{dataset}/{detector}/{method}@{pct(flops)}"


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a repeated mapping key (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_source(path: Path, key: object, raw: object) -> None:
    def fail(name: str, problem: str) -> ValueError:
        return ValueError(f"{path}: source {key!r}: field {name!r}: {problem}")

    if not isinstance(raw, dict):
        raise fail("*", f"must be a mapping, got {raw!r}")
    for name in (*raw, "title", "venue"):
        if name not in SOURCE_FIELDS or name not in raw:
            raise fail(str(name), "missing" if name in SOURCE_FIELDS else "unknown field")
    for name, value in raw.items():
        if not isinstance(value, str) or not value:
            raise fail(name, f"must be a non-empty string, got {value!r}")
    if "doi" not in raw and "arxiv" not in raw:
        raise fail("doi", "missing (a source needs a doi or an arxiv id)")


def _entry(path: Path, eid: object, raw: object, sources: dict[str, Any]) -> Reported:
    def fail(name: str, problem: str) -> ValueError:
        return ValueError(f"{path}: entry {eid!r}: field {name!r}: {problem}")

    if not isinstance(raw, dict):
        raise fail("*", f"must be a mapping, got {raw!r}")
    for name in (*raw, *FIELDS):
        if name not in (*FIELDS, "extra") or name not in raw:
            raise fail(str(name), "missing" if name in FIELDS else "unknown field")
    for name in _TEXT:
        if not isinstance(raw[name], str):
            raise fail(name, f"must be a string, got {raw[name]!r}")
    for name in ("detector", "method"):
        if not _NAME.fullmatch(raw[name]):
            raise fail(name, f"must be a lower-case id like 'gfl_r50', got {raw[name]!r}")
    for name, known in (("source", tuple(sources)), ("dataset", DATASETS), ("metric", METRICS)):
        if raw[name] not in known:
            raise fail(name, f"unknown {name} {raw[name]!r} (known: {', '.join(known)})")
    flops = raw["flops"]
    if not _is_number(flops) or not 0 < flops <= 1:
        raise fail("flops", f"must be a number in (0, 1] (share of FLOPs kept), got {flops!r}")
    for name in ("baseline", "pruned"):
        if raw[name] is not None and not _is_number(raw[name]):
            raise fail(name, f"must be a number or null, got {raw[name]!r}")
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise fail("extra", f"must be a mapping, got {extra!r}")
    for key, value in extra.items():
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not items or not all(map(_is_number, items)):
            raise fail(f"extra.{key}", f"must be a number or a list of numbers, got {value!r}")
    want = entry_id(raw["source"], raw["dataset"], raw["detector"], raw["method"], flops)
    if eid != want:
        raise fail("id", f"does not match its fields: expected {want!r}")
    return Reported(
        id=want,
        source=raw["source"],
        dataset=raw["dataset"],
        detector=raw["detector"],
        method=raw["method"],
        flops=float(flops),
        metric=raw["metric"],
        baseline=None if raw["baseline"] is None else float(raw["baseline"]),
        pruned=None if raw["pruned"] is None else float(raw["pruned"]),
        extra={key: list(v) if isinstance(v, list) else v for key, v in extra.items()},
    )


def load_reported(path: str | Path) -> dict[str, Reported]:
    """Load and validate the data file; a problem is a ValueError naming file, entry and field."""
    p = Path(path)
    try:
        doc = yaml.load(p.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"sources", "entries"}:
        raise ValueError(f"{p}: the top level must be a mapping with 'sources' and 'entries' only")
    for name, value in doc.items():
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{p}: {name!r} must be a non-empty mapping")
    for key, raw in doc["sources"].items():
        _check_source(p, key, raw)
    return {str(k): _entry(p, k, raw, doc["sources"]) for k, raw in doc["entries"].items()}
