"""config/reported.yaml states exactly the numbers docs/papers/METHODS.md reports, nothing else."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from detprune.report.reported import DEFAULT_PATH, Reported, entry_id, load_reported

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / DEFAULT_PATH
METHODS = ROOT / "docs" / "papers" / "METHODS.md"
SHARED = ROOT.parent / "shared" / "papers" / "METHODS.md"  # the project's original, not in CI

N = r"(\d+(?:\.\d+)?)"  # a number as METHODS.md writes it
P = f"{N}->{N}"  # full -> pruned
TABLE_DETECTORS = {"GFL R50": "gfl_r50", "SSD R50": "ssd_r50"}
TABLE_METHODS = {
    "Slim(mable)": "uniform",
    "GroupFisher": "groupfisher",
    "DepGraph": "depgraph",
    "FPGM": "fpgm",
    "MIEP": "miep",
}

Spec = dict[str, Any]  # field -> value an entry must have


def main_table(text: str) -> dict[tuple[str, float, str], tuple[float, float]]:
    """MIEP's main table: (detector, flops kept, method) -> (baseline, pruned), non-empty cells."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| detector | FLOPs kept |"))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = cells(lines[start])
    assert head == ["detector", "FLOPs kept", *TABLE_METHODS], head
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(head, cells(line), strict=True))
        kept = re.fullmatch(r"~(\d+)%", row["FLOPs kept"])
        assert kept, row
        for column, method in TABLE_METHODS.items():
            if row[column]:
                pair = re.fullmatch(f"{N}->{N}", row[column])
                assert pair, row[column]
                key = (TABLE_DETECTORS[row["detector"]], int(kept[1]) / 100, method)
                table[key] = (float(pair[1]), float(pair[2]))
    return table


def _find(pattern: str, flat: str) -> tuple[str, ...]:
    match = re.search(pattern, flat)
    assert match, f"METHODS.md no longer states: {pattern}"
    return match.groups()


def expected(text: str) -> dict[str, Spec]:
    """Every entry METHODS.md implies, id -> fields, one regex per group of reported numbers."""
    out: dict[str, Spec] = {}
    flat = " ".join(text.split())  # sentences may wrap across lines

    def add(
        src: str, ds: str, det: str, method: str, flops: float, b: Any, p: Any, **kw: Any
    ) -> None:
        eid = entry_id(src, ds, det, method, flops)
        spec = {"flops": flops, "metric": kw.pop("metric", "mAP"), "baseline": b, "pruned": p}
        spec["extra"] = kw.pop("extra", {})
        # Two rows naming one configuration (e.g. ablation "cosine" = TLI+FOI) must agree.
        assert out.setdefault(eid, spec) == spec, (eid, out[eid], spec)

    table = main_table(text)
    for (det, flops, method), (b, p) in table.items():
        add("miep", "coco", det, method, flops, b, p)

    # Other methods at ~50% on SSD R50, as MIEP quotes them.
    g = _find(rf'Also at ~(\d+)% FLOPs on SSD R50: LCP {P}, "DMCP/DCP" {P}, CHEX {P}\.', flat)
    f, v = int(g[0]) / 100, [float(x) for x in g[1:]]
    for i, method in enumerate(("lcp", "dcp", "chex")):
        add("miep", "coco", "ssd_r50", method, f, v[2 * i], v[2 * i + 1])

    # Generalisation, VOC07 and COCO at 10%: "X vs Y" is GroupFisher vs MIEP with one baseline.
    g = _find(
        rf"VOC07 test mAP at (\d+)% FLOPs: Faster R-CNN GroupFisher {P}, MIEP {P}; "
        rf"RetinaNet GroupFisher {P}, MIEP {P}\.",
        flat,
    )
    f, v = int(g[0]) / 100, [float(x) for x in g[1:]]
    add("miep", "voc07", "fasterrcnn_r50", "groupfisher", f, v[0], v[1])
    add("miep", "voc07", "fasterrcnn_r50", "miep", f, v[2], v[3])
    add("miep", "voc07", "retinanet_r50", "groupfisher", f, v[4], v[5])
    add("miep", "voc07", "retinanet_r50", "miep", f, v[6], v[7])
    g = _find(
        rf"COCO at (\d+)% FLOPs: Faster R-CNN GroupFisher {P}, MIEP {P}; "
        rf"FSAF {P} vs {N}; RetinaNet {P} vs {N}\.",
        flat,
    )
    f, v = int(g[0]) / 100, [float(x) for x in g[1:]]
    add("miep", "coco", "fasterrcnn_r50", "groupfisher", f, v[0], v[1])
    add("miep", "coco", "fasterrcnn_r50", "miep", f, v[2], v[3])
    for det, (b, gf, miep) in (("fsaf_r50", v[4:7]), ("retinanet_r50", v[7:10])):
        add("miep", "coco", det, "groupfisher", f, b, gf)
        add("miep", "coco", det, "miep", f, b, miep)

    # GFL ablations; their baseline is the main table's GFL MIEP baseline.
    def ablation(method: str, pct: str, pruned: str) -> None:
        f = int(pct) / 100
        add("miep", "coco", "gfl_r50", method, f, table[("gfl_r50", f, "miep")][0], float(pruned))

    g = _find(
        rf"Ablations \(GFL COCO\): at (\d+)% FLOPs TLI {N}, \+FOI {N}, \+IRI {N}, both {N}; "
        rf"at (\d+)% {N} / {N} / {N} / {N}\.",
        flat,
    )
    for i, method in enumerate(("miep-tli", "miep-tli-foi", "miep-tli-iri", "miep")):
        ablation(method, g[0], g[1 + i])
        ablation(method, g[5], g[6 + i])
    pct, *v = _find(rf"FOI terms at (\d+)%: TLI {N}, \+Phi_pre {N}, \+Phi_obj {N}\.", flat)
    for method, value in zip(("miep-tli", "miep-phipre", "miep-tli-foi"), v, strict=True):
        ablation(method, pct, value)
    # The next sentence continues the FOI-terms paragraph, at the same FLOPs.
    v = _find(
        rf"FOI for pruning only {N} vs pruning\+optimisation {N}; MSE {N} vs cosine {N}; "
        rf"k-means {N} vs hierarchical {N}; "
        rf"cluster threshold distance=0\.8 {N} vs ratio=0\.1 {N}\.",
        flat,
    )
    pairs = [("miep-foi-pruneonly", "miep-tli-foi"), ("miep-mse", "miep-tli-foi")]
    pairs += [("miep-kmeans", "miep"), ("miep-distance", "miep")]
    for i, methods in enumerate(pairs):
        for method, value in zip(methods, v[2 * i : 2 * i + 2], strict=True):
            ablation(method, pct, value)

    g = _find(rf"ImageNet ResNet-50 top-1: {N} -> {N} at (\d+)% FLOPs, -> {N} at (\d+)%\.", flat)
    for pruned, kept in ((g[1], g[2]), (g[3], g[4])):
        f = int(kept) / 100
        add("miep", "imagenet", "resnet50", "miep", f, float(g[0]), float(pruned), metric="top1")

    g = _find(
        rf"Reported \(quoted in MIEP's table, COCO, SSD R50\): mAP {N} -> {N}, "
        rf"AP50 {N} -> {N}, AP75 {N} -> {N}, {N} GFLOPs, (\d+)% of FLOPs kept\.",
        flat,
    )
    v = [float(x) for x in g]
    extra = {"AP50": v[2:4], "AP75": v[4:6], "gflops": v[6]}
    add("lcp", "coco", "ssd_r50", "lcp", int(g[7]) / 100, v[0], v[1], extra=extra)

    params, flops = _find(
        rf"YOLOv4 \(416 input\) on PASCAL VOC; parameters -{N}%, FLOPs -{N}%\.", flat
    )
    g = _find(
        rf"YOLOv4-VOC: {N}M params, {N} GFLOPs at 416\. "
        r"Jetson Nano: (\d+) ms unpruned vs about (\d+) ms pruned\.",
        flat,
    )
    extra = {
        "params_reduction": float(params) / 100,
        "flops_reduction": float(flops) / 100,
        "params_M": float(g[0]),
        "gflops": float(g[1]),
        "latency_ms_jetson_nano": [int(g[2]), int(g[3])],
    }
    add("gcp", "voc", "yolov4_416", "gcp-sad", 1 - float(flops) / 100, None, None, extra=extra)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9)


def mismatches(entries: dict[str, Reported], specs: dict[str, Spec]) -> list[str]:
    """Every way the data file differs from METHODS.md: extra or missing ids, changed numbers."""
    problems = [f"{i}: not stated in METHODS.md" for i in entries.keys() - specs.keys()]
    problems += [f"{i}: stated in METHODS.md, missing" for i in specs.keys() - entries.keys()]
    for i in sorted(entries.keys() & specs.keys()):
        for name, want in specs[i].items():
            got = getattr(entries[i], name)
            if not _same(got, want):
                problems.append(f"{i}: {name} is {got!r}, METHODS.md says {want!r}")
    return sorted(problems)


@pytest.fixture(scope="module")
def text() -> str:
    return METHODS.read_text()


@pytest.fixture(scope="module")
def entries() -> dict[str, Reported]:
    return load_reported(DATA)


def test_main_table_cells_equal_the_data_file(text: str, entries: dict[str, Reported]) -> None:
    table = main_table(text)
    assert len(table) == 27  # 2 detectors x 3 FLOPs x 5 methods, FPGM not reported for GFL
    assert table[("gfl_r50", 0.5, "miep")] == (39.1, 39.0)
    assert table[("ssd_r50", 0.1, "uniform")] == (23.8, 12.7)
    for (det, flops, method), (base, pruned) in table.items():
        e = entries[entry_id("miep", "coco", det, method, flops)]
        assert (e.metric, e.baseline, e.pruned) == ("mAP", base, pruned), e.id
    in_table = {
        (e.detector, e.flops, e.method)
        for e in entries.values()
        if e.source == "miep" and e.dataset == "coco"
        if e.detector in TABLE_DETECTORS.values() and e.method in TABLE_METHODS.values()
    }
    assert in_table == set(table)


def test_every_entry_is_stated_in_methods(text: str, entries: dict[str, Reported]) -> None:
    assert mismatches(entries, expected(text)) == []
    assert len(entries) == 55
    assert entries["lcp/coco/ssd_r50/lcp@53"].extra["AP75"] == [22.7, 21.6]
    assert entries["miep/imagenet/resnet50/miep@10"].pruned == 70.32


def _mutations(e: Reported) -> list[Reported]:
    """The entry with each of its numbers changed, one at a time (and with an unsourced extra)."""
    out = [dataclasses.replace(e, flops=e.flops / 2)]
    for name in ("baseline", "pruned"):
        value = getattr(e, name)
        out.append(dataclasses.replace(e, **{name: 1.0 if value is None else value + 0.1}))
    for key, value in e.extra.items():
        bumped = [value[0] + 1, *value[1:]] if isinstance(value, list) else value + 0.1
        out.append(dataclasses.replace(e, extra={**e.extra, key: bumped}))
    out.append(dataclasses.replace(e, extra={**e.extra, "AP": 1.0}))
    return out


def test_the_checker_rejects_any_altered_number(text: str, entries: dict[str, Reported]) -> None:
    specs = expected(text)
    bad = dataclasses.replace(entries["miep/coco/gfl_r50/miep@50"], pruned=39.1)
    assert mismatches({**entries, bad.id: bad}, specs) == [
        "miep/coco/gfl_r50/miep@50: pruned is 39.1, METHODS.md says 39.0"
    ]
    for e in entries.values():
        for changed in _mutations(e):
            assert mismatches({**entries, e.id: changed}, specs), changed


def test_sources_are_the_papers_in_methods(text: str) -> None:
    sources = yaml.safe_load(DATA.read_text())["sources"]
    assert set(sources) == {"miep", "lcp", "gcp"}
    for src in sources.values():
        assert src["venue"] in text
        assert (src.get("doi") or f"arXiv {src['arxiv']}") in text


def _write(tmp_path: Path, entry_id_: str, **fields: Any) -> Path:
    doc = yaml.safe_load(DATA.read_text())
    entry = {**doc["entries"]["miep/coco/gfl_r50/miep@50"], **fields}
    path = tmp_path / "reported.yaml"
    path.write_text(yaml.safe_dump({"sources": doc["sources"], "entries": {entry_id_: entry}}))
    return path


@pytest.mark.parametrize(
    ("eid", "fields", "field", "problem"),
    [
        ("miep/coco/gfl_r50/miep@150", {"flops": 1.5}, "flops", "(0, 1]"),
        ("miep/coco/gfl_r50/miep@0", {"flops": 0}, "flops", "(0, 1]"),
        ("foo/coco/gfl_r50/miep@50", {"source": "foo"}, "source", "unknown source 'foo'"),
        ("miep/coco/gfl_r50/miep@50", {"pruned": "39.0"}, "pruned", "number or null"),
        ("miep/coco/gfl_r50/miep@50", {"metric": None}, "metric", "must be a string"),
        ("miep/coco/gfl_r50/miep@50", {"extra": {"AP50": "x"}}, "extra.AP50", "list of numbers"),
        ("miep/coco/gfl_r50/miep@25", {}, "id", "'miep/coco/gfl_r50/miep@50'"),
    ],
)
def test_load_rejects_a_bad_entry(
    tmp_path: Path, eid: str, fields: dict[str, Any], field: str, problem: str
) -> None:
    path = _write(tmp_path, eid, **fields)
    with pytest.raises(ValueError) as err:
        load_reported(path)
    msg = str(err.value)
    assert str(path) in msg and repr(eid) in msg and f"field {field!r}" in msg, msg
    assert problem in msg, msg


def test_load_rejects_a_duplicate_id_and_a_missing_field(tmp_path: Path) -> None:
    doc = yaml.safe_load(DATA.read_text())
    eid = "miep/coco/gfl_r50/miep@50"
    entry = dict(doc["entries"][eid])
    sources = yaml.safe_dump({"sources": doc["sources"]})
    block = yaml.safe_dump({"entries": {eid: entry}})
    path = tmp_path / "reported.yaml"
    path.write_text(sources + block + block.split("entries:\n", 1)[1])  # the same id twice
    with pytest.raises(ValueError, match=f"duplicate key '{eid}'") as err:
        load_reported(path)
    assert str(path) in str(err.value)
    del entry["baseline"]
    path.write_text(sources + yaml.safe_dump({"entries": {eid: entry}}))
    with pytest.raises(ValueError, match=f"entry '{eid}': field 'baseline': missing"):
        load_reported(path)


def test_the_repo_copy_of_methods_is_verbatim() -> None:
    if SHARED.exists():
        assert METHODS.read_bytes() == SHARED.read_bytes()
    else:
        assert METHODS.read_text().splitlines()[0] == (
            "# The three methods and what their papers report"
        )
