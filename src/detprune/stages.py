"""One function per pipeline stage: data (synthetic set, checks), train, sparse, prune,
finetune, evaluate, report and the paper tables. The CLI parses arguments and calls these;
a stage reads the config it is given, never the workflow plan."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from detprune.backbone_init import init_file
from detprune.config import distillation, finetune_schedule
from detprune.data.classification import (
    ImageFolderDataset,
    check_imagefolder,
    classification_transform,
)
from detprune.data.coco import CocoDetection, DatasetError, check_coco
from detprune.data.transforms import get_transform
from detprune.evaluation.bootstrap import bootstrap_record
from detprune.evaluation.classification import evaluate_classifier, summary_text
from detprune.evaluation.coco_eval import evaluate_detections
from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model, model_kwargs
from detprune.pruning.base import PruneContext
from detprune.pruning.methods import get_method, procedure_of
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.train import checkpoint
from detprune.train.distill import DISTILLERS
from detprune.train.distributed import resolve_device
from detprune.train.engine import fit, make_loader, predict
from detprune.train.sparsity import (
    REGULARIZERS,
    SparsityContext,
    describe_gammas,
    gamma_histogram,
)
from detprune.utils.io import file_sha256, write_json
from detprune.utils.provenance import provenance
from detprune.utils.seed import seed_everything

log = logging.getLogger("detprune")


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _data_hash(path: str | Path) -> str:
    """sha256 of a file (a COCO JSON); for a folder (an ImageFolder split), of its sorted
    file list with sizes (reading every image of ImageNet at each start would be slow)."""
    p = Path(path)
    if not p.is_dir():
        return file_sha256(p)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return _fingerprint(files=[[str(f.relative_to(p)), f.stat().st_size] for f in files])


def _task(name: str) -> str:
    """The registry entry's task (``detection`` for names not registered)."""
    entry = MODELS.get(name)
    return entry.task if entry is not None else "detection"


def _train_set(
    ann: str,
    images: str,
    augment: str,
    name: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> CocoDetection | ImageFolderDataset:
    """The training set of model ``name``: COCO for detectors; for classifiers the
    ImageFolder root ``images`` (the same path as ``ann``) with the crops of the model's
    ``crop_scale`` / ``crop_ratio``."""
    if name is not None and _task(name) == "classification":
        return ImageFolderDataset(images, transforms=_cls_transform(augment, True, name, kwargs))
    return CocoDetection(ann, images, transforms=get_transform(augment, train=True))


def _cls_transform(augment: str, train: bool, name: str, kwargs: dict[str, Any] | None):
    kw = kwargs if kwargs is not None else MODELS[name].defaults
    lo, hi = kw.get("crop_scale", (0.08, 1.0))
    return classification_transform(
        augment, train, (float(lo), float(hi)), float(kw.get("crop_ratio", 1.0))
    )


def _rois(spec: dict[str, Any]) -> int:
    entry = MODELS[spec["name"]]
    return int(spec["kwargs"].get("rpn_post_nms_top_n_test", 0)) if entry.per_roi_modules else 0


def _image_size(spec: dict[str, Any]) -> int:
    return int(spec["kwargs"].get("image_size", MODELS[spec["name"]].image_size))


def synth_data(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Write the embedded synthetic dataset of ``data.source`` (deterministic): COCO, or
    ImageFolder trees ``<out_dir>/{train,val,test}/<class>/`` for ``synth_cls``."""
    data = config["data"]
    if data["source"] == "synth_cls":
        from detprune.data.classification import write_synthetic_classification

        return write_synthetic_classification(Path(out_dir), **data["synth_cls"])
    from detprune.data.synth import write_synthetic

    return write_synthetic(Path(out_dir), **data["synth"])


def check_data(ann: str, images: str, out: str | None) -> dict[str, Any]:
    """Validate a COCO JSON and its images, or an ImageFolder split (``ann`` a folder,
    given as both ``ann`` and ``images``); write the summary to ``out`` when it passes."""
    if Path(ann).is_dir():  # a classification split: --ann and --images are its root
        if Path(images).resolve() != Path(ann).resolve():
            raise DatasetError(
                f"{ann}: an ImageFolder split is given as both --ann and --images "
                f"(got --images {images})"
            )
        summary = check_imagefolder(ann)
    else:
        summary = check_coco(ann, images)
    if out:
        write_json(
            out, {"ann": ann, "images": images, "summary": summary, "provenance": provenance()}
        )
    return summary


def train(config: dict[str, Any], train_ann: str, train_images: str, out: str) -> dict[str, Any]:
    """Train the baseline detector from scratch (or from a local pretrained backbone)."""
    seed_everything(config["seed"])
    sched = config["train"]
    name = config["model"]["name"]
    overrides = dict(config["model"].get("kwargs", {}))
    init = init_file(config)  # model.pretrained_backbone, else pretrain.init's file
    if init:
        overrides["pretrained_backbone"] = init
        log.info("backbone from %s", init)
    kwargs = model_kwargs(name, overrides) if _task(name) == "classification" else None
    train_set = _train_set(train_ann, train_images, sched["augment"], name, kwargs)
    spec = checkpoint.model_spec(config["model"]["name"], train_set.num_classes, overrides)
    model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
    meta = provenance(
        {k: config[k] for k in ("seed", "model", "train")},
        stage="train",
        method="baseline",
        flops_target=1.0,
        seed=config["seed"],
        class_names=train_set.class_names,
    )
    meta["fingerprint"] = _fingerprint(
        sched=sched, spec=spec, seed=config["seed"], data=_data_hash(train_ann)
    )
    return fit(
        model,
        spec=spec,
        history=[],
        sched=sched,
        train_set=train_set,
        seed=config["seed"],
        out=Path(out),
        meta=meta,
    )


def import_baseline(config: dict[str, Any], weights: str, train_ann: str, out: str) -> dict:
    """The baseline from the detector weights ``weights`` (``model.checkpoint``): a
    detprune checkpoint or torchvision's state_dict, never trained."""
    from detprune.train.imported import import_baseline as write_imported

    return write_imported(config, weights, train_ann, out)


def _batches(
    dataset: CocoDetection | ImageFolderDataset, batch_size: int, seed: int, device: torch.device
):
    """A function returning an endless, seeded iterator of training batches on ``device``."""

    def gen():
        epoch = 0
        while True:
            for images, targets in make_loader(
                dataset, batch_size, shuffle=True, seed=seed, epoch=epoch
            ):
                yield (
                    [im.to(device) for im in images],
                    [
                        {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                        for t in targets
                    ],
                )
            epoch += 1

    return gen


def sparse(
    config: dict[str, Any],
    regularizer: str,
    ckpt_path: str,
    train_ann: str,
    train_images: str,
    out: str,
) -> dict[str, Any]:
    """Sparse training of the baseline with ``regularizer`` (its own cached stage); the
    checkpoint's meta ``gamma`` holds the BN |gamma| distribution before and after
    (:func:`detprune.train.sparsity.gamma_histogram`), also logged."""
    seed_everything(config["seed"])
    if regularizer not in REGULARIZERS:
        raise KeyError(
            f"sparse: unknown regularizer {regularizer!r}; known: {sorted(REGULARIZERS)}"
        )
    sched = config["sparse"]["schedule"]
    model, ckpt = checkpoint.load_model(ckpt_path)
    spec = ckpt["model"]
    options = dict(config["sparse"]["regularizers"].get(regularizer, {}))
    hook = REGULARIZERS[regularizer](
        model,
        SparsityContext(
            options, list(MODELS[spec["name"]].ignored_layers), checkpoint.example_inputs(spec)
        ),
    )
    train_set = _train_set(train_ann, train_images, sched["augment"], spec["name"], spec["kwargs"])
    meta = dict(ckpt["meta"])
    meta.update(
        provenance(
            {"seed": config["seed"], "sparse": sched, regularizer: options},
            stage="sparse",
            regularizer=regularizer,
            source=ckpt_path,
        )
    )
    meta["fingerprint"] = _fingerprint(
        sched=sched,
        reg=regularizer,
        options=options,
        seed=config["seed"],
        init=file_sha256(ckpt_path),
    )
    before = gamma_histogram(model)
    log.info("sparse %s, before: %s", regularizer, describe_gammas(before))

    def gamma_meta(trained: torch.nn.Module) -> dict[str, Any]:
        """The |gamma| distribution before and after, in the checkpoint's meta."""
        after = gamma_histogram(trained)
        log.info("sparse %s, after: %s", regularizer, describe_gammas(after))
        return {"gamma": {"before": before, "after": after}}

    return fit(
        model,
        spec=spec,
        history=ckpt["pruning_history"],
        sched=sched,
        train_set=train_set,
        seed=config["seed"],
        out=Path(out),
        meta=meta,
        grad_hook=hook,
        final_meta=gamma_meta,
    )


def prune(
    config: dict[str, Any],
    method: str,
    flops: float,
    ckpt_path: str,
    train_ann: str,
    train_images: str,
    out: str,
    summary: str,
) -> dict[str, Any]:
    """Prune a checkpoint with ``method`` to ``flops`` of its MACs; write model and summary."""
    seed_everything(config["seed"])
    meth = get_method(method)
    model, ckpt = checkpoint.load_model(ckpt_path)
    spec = ckpt["model"]
    entry = MODELS[spec["name"]]
    device = resolve_device(config["train"].get("device", "auto"))
    options = {k: v for k, v in config["prune"].items() if k != "options"}
    options.update(config["prune"].get("options", {}).get(method, {}))
    dataset = _train_set(train_ann, train_images, "none", spec["name"], spec["kwargs"])
    ctx = PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options=options,
        seed=config["seed"],
        device=device,
        batches=_batches(dataset, config["train"]["batch_size"], config["seed"], device),
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_counter(_image_size(spec), entry.per_roi_modules, _rois(spec)),
        ignored=list(entry.ignored_layers),
        schedule=dict(config["train"]),
        history=list(ckpt["pruning_history"]),
    )
    result = procedure_of(meth)(ctx, meth, flops)
    result.model.cpu()
    history = list(ckpt["pruning_history"]) + list(result.history)
    meta = provenance(
        {k: config[k] for k in ("seed", "model", "prune")},
        stage="prune",
        method=method,
        flops_target=flops,
        seed=config["seed"],
        source=ckpt_path,
        pruning=result.report,
    )
    meta["class_names"] = ckpt["meta"].get("class_names")
    heads = {checkpoint.AUX_HEADS: result.aux_heads} if result.aux_heads else {}
    checkpoint.save(out, spec=spec, model=result.model, history=history, meta=meta, **heads)
    record = {
        "detector": spec["name"],
        "method": method,
        "seed": config["seed"],
        **result.report,
        "provenance": provenance(),
    }
    write_json(summary, record)
    log.info(
        "%s at %.2f: kept %.4f of MACs, params %d -> %d",
        method,
        flops,
        result.report["flops_kept"],
        result.report["params_before"],
        result.report["params_after"],
    )
    return record


def finetune(
    config: dict[str, Any],
    method: str,
    ckpt_path: str,
    teacher_path: str,
    train_ann: str,
    train_images: str,
    out: str,
) -> dict[str, Any]:
    """Fine-tune a pruned model with the method's schedule, optionally distilling from the
    unpruned ``teacher_path`` (a distillation also gets the auxiliary heads the pruned
    checkpoint carries: LCP's loss starts from them)."""
    seed_everything(config["seed"])
    sched = finetune_schedule(config, method)
    distill = distillation(config, method)
    model, ckpt = checkpoint.load_model(ckpt_path)
    spec = ckpt["model"]
    train_set = _train_set(train_ann, train_images, sched["augment"], spec["name"], spec["kwargs"])
    hook = None
    if distill:
        if distill not in DISTILLERS:
            raise KeyError(
                f"finetune.distill: unknown distillation {distill!r}; known: {sorted(DISTILLERS)}"
            )
        teacher, _ = checkpoint.load_model(teacher_path)
        hook = DISTILLERS[distill](
            model,
            teacher,
            ckpt["model"],
            sched.get("distill_options", {}),
            aux_heads=checkpoint.aux_heads(ckpt),
        )
    meta = dict(ckpt["meta"])
    meta.update(
        provenance(
            {"seed": config["seed"], "finetune": sched},
            stage="finetune",
            method=method,
            source=ckpt_path,
            distill=distill,
        )
    )
    meta["fingerprint"] = _fingerprint(
        sched=sched,
        seed=config["seed"],
        init=file_sha256(ckpt_path),
        teacher=file_sha256(teacher_path) if distill else None,
        data=_data_hash(train_ann),
    )
    return fit(
        model,
        spec=ckpt["model"],
        history=ckpt["pruning_history"],
        sched=sched,
        train_set=train_set,
        seed=config["seed"],
        out=Path(out),
        meta=meta,
        loss_hook=hook,
    )


def evaluate_checkpoint(
    config: dict[str, Any],
    ckpt_path: str,
    ann: str,
    images: str,
    out: str,
    method: str,
    flops: float,
    split: str = "test",
) -> dict[str, Any]:
    """COCO metrics (top-1/top-5 accuracy for a classifier, whose ``images`` is the
    ImageFolder root), parameters and MACs of a checkpoint (its latency is the timing
    step's, :func:`time_latency`), as one JSON record that names the ``split`` it was
    scored on. A detector's record also holds its AP on
    each of the seeded bootstrap resamples of the images (``evaluate.bootstrap``), the
    same resamples for every checkpoint, from which the report pairs any two rows."""
    seed_everything(config["seed"])
    ecfg = config["evaluate"]
    model, ckpt = checkpoint.load_model(ckpt_path)
    spec = ckpt["model"]
    device = resolve_device("auto")
    classifier = _task(spec["name"]) == "classification"
    if classifier:
        dataset: CocoDetection | ImageFolderDataset = ImageFolderDataset(
            images, transforms=_cls_transform("none", False, spec["name"], spec["kwargs"])
        )
        model.to(device)
        metrics: dict[str, Any] = evaluate_classifier(model, dataset, device, ecfg["batch_size"])
        summary = summary_text(metrics, len(dataset))
        boot = None
    else:
        dataset = CocoDetection(ann, images)
        model.to(device)
        detections = predict(model, dataset, device, ecfg["batch_size"])
        metrics, summary = evaluate_detections(dataset.coco, detections, image_ids=dataset.ids)
        bcfg = ecfg.get("bootstrap", {"resamples": 1000, "seed": 0})
        boot = bootstrap_record(
            dataset.coco, detections, dataset.ids, resamples=bcfg["resamples"], seed=bcfg["seed"]
        )
    model.cpu()
    macs = count_macs(
        model,
        _image_size(spec),
        per_roi_modules=MODELS[spec["name"]].per_roi_modules,
        rois_per_image=_rois(spec),
    )
    record = {
        "detector": spec["name"],
        "method": method,
        "flops_target": flops,
        "seed": int(ckpt["meta"].get("seed", config["seed"])),
        "split": split,
        "data": {"ann": ann, "images": images, "sha256": _data_hash(ann)},
        "metrics": metrics,
        "cost": {
            "params": count_params(model),
            "macs": macs["macs"],
            "input_size": macs["input_size"],
            "rois_per_image": macs["rois_per_image"],
        },
        "coco_summary": summary,
        **({"bootstrap": boot} if boot is not None else {}),
        "checkpoint": {
            "path": ckpt_path,
            "sha256": file_sha256(ckpt_path),
            "pruning": ckpt["meta"].get("pruning", {}).get("flops_kept"),
        },
        "provenance": provenance(
            {"evaluate": ecfg},
            checkpoint_meta={
                k: v for k, v in ckpt["meta"].items() if k not in ("train_log", "pruning")
            },
        ),
    }
    write_json(out, record)
    if classifier:
        log.info("%s %s: top-1 %.4f top-5 %.4f", method, flops, metrics["top1"], metrics["top5"])
    else:
        log.info(
            "%s %s: AP %.4f AP50 %.4f", method, flops, metrics["AP"] or 0, metrics["AP50"] or 0
        )
    return record


def time_latency(
    config: dict[str, Any], metrics: list[str], ann: str, images: str, out: str
) -> dict[str, Any]:
    """The timing step (``evaluate.latency``): every checkpoint the metrics records name,
    timed one after the other (:mod:`detprune.evaluation.latency`), as one JSON record."""
    from detprune.evaluation.latency import time_checkpoints

    seed_everything(config["seed"])
    lcfg = config["evaluate"]["latency"]
    record = time_checkpoints(metrics, ann, images, lcfg)
    record["provenance"] = provenance({"evaluate": {"latency": lcfg}})
    write_json(out, record)
    return record


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (Snakemake's ``threads``)."""
    if threads:
        torch.set_num_threads(threads)


def report(
    config: dict[str, Any],
    metrics: list[str],
    summaries: list[str],
    tables_dir: str,
    figures_dir: str,
    latency: list[str] | None = None,
) -> list[Path]:
    """Paper-style tables (with the timing step's latency and speed-up columns when
    ``latency`` records are given), a compact metrics summary, and the figures."""
    from detprune.report.figures import plot_channels_per_layer, plot_map_vs_flops
    from detprune.report.speed import add_latency, load_latency
    from detprune.report.tables import build_table, load_records, write_table

    name = config["report"]["name"]
    records = load_records([Path(p) for p in metrics])
    rcfg = config["report"]
    boot = config["evaluate"].get("bootstrap", {})
    df = build_table(
        records,
        reference=rcfg.get("reference", "l1"),
        level=rcfg.get("level", 0.95),
        seed=boot.get("seed", 0),
    )
    df = add_latency(df, load_latency([Path(p) for p in latency or []]))
    paths = write_table(df, Path(tables_dir) / name)
    write_json(Path(tables_dir) / f"{name}_summary.json", metrics_summary(df))
    paths.append(
        plot_map_vs_flops(
            df,
            Path(figures_dir) / f"{name}_map_vs_flops.png",
            title=f"{name}: mAP vs FLOPs kept (test split)",
        )
    )
    layer_records: dict[tuple[str, float], dict[str, Any]] = {}
    for p in summaries:  # one seed's widths per row: the first given
        rec = json.loads(Path(p).read_text())
        layer_records.setdefault(
            (rec["method"], rec["flops_target"]),
            {"method": rec["method"], "flops_target": rec["flops_target"], "layers": rec["layers"]},
        )
    paths.append(
        plot_channels_per_layer(
            list(layer_records.values()),
            Path(figures_dir) / f"{name}_channels_per_layer.png",
            title=f"{name}: channels kept per layer",
        )
    )
    return paths


#: Table columns the DVC metrics summary carries, per row.
SUMMARY_COLUMNS = (
    "mAP",
    "mAP std",
    "seeds",
    "AP50",
    "AP75",
    "ΔmAP",
    "ΔmAP lo",
    "ΔmAP hi",
    "Δref",
    "Δref lo",
    "Δref hi",
    "mark",
    "flops_kept (%)",
    "GMACs",
    "params (M)",
    "latency (ms)",
    "speed-up",
    "ORT (ms)",
    "ORT speed-up",
)


def metrics_summary(df: Any) -> dict[str, Any]:
    """The DVC metrics file: every row of the table (test split, mean over seeds),
    keyed ``<method>@<flops target>``; missing values left out."""
    rows: dict[str, Any] = {}
    for rec in df.to_dict("records"):
        key = f"{rec['method']}@{rec['flops_target (%)'] / 100:g}"
        if df["detector"].nunique() > 1:
            key = f"{rec['detector']}/{key}"
        rows[key] = {
            c: rec[c]
            for c in SUMMARY_COLUMNS
            if c in rec and isinstance(rec[c], (int, float, str)) and rec[c] == rec[c]
        }
    return {"split": "test", "rows": rows}


def paper_table(
    table: str,
    profile: str,
    results: str,
    seeds: str | None,
    reported: str,
    tables_dir: str,
    figures_dir: str,
) -> list[Path]:
    """A paper table (config/tables/<table>.yaml) from a table run's metrics records."""
    from detprune.experiments import load_table, parse_seeds
    from detprune.report.paper_tables import build_paper_table, plot_paper_table
    from detprune.report.reported import load_reported
    from detprune.report.tables import write_table

    spec = load_table(table)
    seed_list = parse_seeds(seeds, spec.seeds)
    df = build_paper_table(
        {"results": results}, spec, profile, seed_list, load_reported(Path(reported))
    )
    stem = Path(tables_dir) / table
    paths = write_table(df, stem)
    meta = provenance(
        None,
        table=table,
        title=spec.title,
        profile=profile,
        seeds=list(seed_list),
        reported=reported,
        caption=spec.caption,
    )
    write_json(stem.with_suffix(".json"), meta)
    figure = Path(figures_dir) / f"{table}_vs_flops.png"
    metric = spec.metric
    paths.append(plot_paper_table(df, figure, f"{table} ({profile}): {spec.title}", metric))
    return paths
