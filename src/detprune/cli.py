"""`detprune <stage>`: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from detprune import __version__

log = logging.getLogger("detprune")


def _setup_logging(logfile: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    # a torchrun worker: rank 0 appends to the launcher's log file, the others only print
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if logfile and rank in (None, "0"):
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, mode="w" if rank is None else "a"))
    logging.basicConfig(
        level=logging.INFO,
        handlers=handlers,
        force=True,
        format=("" if rank is None else f"[rank {rank}] ")
        + "%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _config(path: str, seed: int | None = None) -> dict:
    """The validated config; ``seed`` (a job's ``--seed``) replaces its ``seed``."""
    from detprune.config import load_config

    config = load_config(path)
    if seed is not None:
        config["seed"] = seed
    return config


def cmd_data_synth(a: argparse.Namespace) -> None:
    from detprune import stages

    summary = stages.synth_data(_config(a.config), a.out_dir)
    log.info("synthetic dataset in %s: %s", a.out_dir, summary)


def cmd_data_check(a: argparse.Namespace) -> None:
    from detprune import stages

    summary = stages.check_data(a.ann, a.images, a.out)
    log.info("%s: OK %s", a.ann, summary)


def cmd_data_voc2coco(a: argparse.Namespace) -> None:
    from detprune.data.voc import voc_to_coco

    summary = voc_to_coco(Path(a.voc_root), a.split, Path(a.out))
    log.info("wrote %s: %s", a.out, summary)


def cmd_data_carve(a: argparse.Namespace) -> None:
    from detprune.data.splits import carve_files

    summary = carve_files(a.ann, a.size, a.seed, a.out_train, a.out_tune)
    log.info("wrote %s and %s: %s", a.out_train, a.out_tune, summary)


def cmd_train(a: argparse.Namespace) -> None:
    from detprune import stages

    stages.set_threads(a.threads)
    stages.train(_config(a.config, a.seed), a.train_ann, a.train_images, a.out)


def cmd_pretrain(a: argparse.Namespace) -> None:
    from detprune import stages
    from detprune.train.pretrain import pretrain

    stages.set_threads(a.threads)
    pretrain(_config(a.config), a.out, a.meta)


def cmd_import(a: argparse.Namespace) -> None:
    from detprune import stages

    log.info("%s", stages.import_baseline(_config(a.config, a.seed), a.weights, a.train_ann, a.out))


def cmd_sparse(a: argparse.Namespace) -> None:
    from detprune import stages

    stages.set_threads(a.threads)
    stages.sparse(
        _config(a.config, a.seed), a.regularizer, a.checkpoint, a.train_ann, a.train_images, a.out
    )


def cmd_prune(a: argparse.Namespace) -> None:
    from detprune import stages

    stages.set_threads(a.threads)
    stages.prune(
        _config(a.config, a.seed),
        a.method,
        a.flops,
        a.checkpoint,
        a.train_ann,
        a.train_images,
        a.out,
        a.summary,
    )


def cmd_finetune(a: argparse.Namespace) -> None:
    from detprune import stages

    stages.set_threads(a.threads)
    stages.finetune(
        _config(a.config, a.seed),
        a.method,
        a.checkpoint,
        a.teacher,
        a.train_ann,
        a.train_images,
        a.out,
    )


def cmd_evaluate(a: argparse.Namespace) -> None:
    from detprune import stages

    stages.set_threads(a.threads)
    stages.evaluate_checkpoint(
        _config(a.config, a.seed),
        a.checkpoint,
        a.ann,
        a.images,
        a.out,
        a.method,
        a.flops,
        a.split,
    )


def cmd_export(a: argparse.Namespace) -> None:
    from detprune import stages
    from detprune.evaluation.export import export_checkpoint

    stages.set_threads(a.threads)
    try:
        export_checkpoint(a.checkpoint, a.out, a.ann, a.images, count=a.num_images)
    except ValueError as exc:  # a bad checkpoint or a failed validation: say which, why
        log.error("export failed: %s", exc)
        sys.exit(2)


def cmd_time_latency(a: argparse.Namespace) -> None:
    from detprune import stages

    try:
        stages.time_latency(_config(a.config), a.metrics, a.ann, a.images, a.out)
    except ValueError as exc:  # a missing or changed checkpoint: say which
        log.error("time-latency failed: %s", exc)
        sys.exit(2)


def cmd_report(a: argparse.Namespace) -> None:
    from detprune import stages

    for p in stages.report(
        _config(a.config), a.metrics, a.prune_summaries, a.tables_dir, a.figures_dir, a.latency
    ):
        log.info("wrote %s", p)


def cmd_table(a: argparse.Namespace) -> None:
    from detprune import stages

    for p in stages.paper_table(
        a.table, a.profile, a.results, a.seeds, a.reported, a.tables_dir, a.figures_dir
    ):
        log.info("wrote %s", p)


def cmd_claims(a: argparse.Namespace) -> None:
    from detprune.report.ledger import claims_ledger

    for p in claims_ledger(
        a.claims, a.profile, a.results, a.tables, a.csv, a.md, reported=a.reported
    ):
        log.info("wrote %s", p)


def cmd_list(a: argparse.Namespace) -> None:
    if a.what == "models":
        from detprune.models import MODELS

        for name, entry in MODELS.items():
            print(f"{name:28s} {entry.description}")
    elif a.what == "tables":
        from detprune.experiments import load_table, table_names

        for name in table_names():
            print(f"{name:16s} {load_table(name).title}")
    else:
        from detprune.pruning.methods import METHODS

        width = max(map(len, METHODS))
        for name, m in METHODS.items():
            print(f"{name:{width}s} {m.description}")


def cmd_dvc(a: argparse.Namespace) -> None:
    from detprune.utils.io import write_text
    from detprune.workflow import dvc_yaml

    text = dvc_yaml(_config(a.config), a.config)
    if a.check:
        current = Path(a.out).read_text() if Path(a.out).is_file() else ""
        if current != text:
            sys.exit(f"{a.out} is stale: regenerate with `detprune dvc --config {a.config}`")
        print(f"{a.out} is up to date")
        return
    write_text(a.out, text)
    print(f"wrote {a.out}")


def _common(p: argparse.ArgumentParser, *, config: bool = True, threads: bool = False) -> None:
    if config:
        p.add_argument("--config", required=True, help="pipeline config YAML (validated)")
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch threads")
        p.add_argument(
            "--seed",
            type=int,
            default=None,
            help="the job's seed (one chain of a run with several `seeds`); default: the "
            "config's seed",
        )
    p.add_argument("--log", default=None, help="also write the log to this file")


TRAINING = ("train", "sparse", "finetune")


def _nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="training processes (DDP under torchrun; batch_size per process, lr scaled by "
        "the count); default: one per visible GPU when the schedule may use CUDA, else 1",
    )


def _launch_workers(a: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """Re-run this command as torchrun workers when it should use several processes."""
    from detprune.train import distributed

    if distributed.is_worker():
        return
    nproc = a.nproc
    if nproc is None:
        from detprune.config import finetune_schedule

        cfg = _config(a.config)
        sched = {"train": cfg["train"], "sparse": cfg["sparse"]["schedule"]}.get(
            a.command
        ) or finetune_schedule(cfg, a.method)
        nproc = distributed.auto_nproc(sched.get("device", "auto"))
    if nproc > 1:
        args = list(sys.argv[1:] if argv is None else argv)
        sys.exit(distributed.launch(args, nproc, entry="detprune.worker"))


def _data_paths(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument(
        f"--{split}-ann", required=True, help=f"COCO instances JSON of the {split} split"
    )
    p.add_argument(f"--{split}-images", required=True, help=f"image folder of the {split} split")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``detprune`` console script."""
    parser = argparse.ArgumentParser(prog="detprune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"detprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthetic, checks, VOC conversion")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser(
        "synth",
        help="write the embedded synthetic dataset (deterministic): COCO, or ImageFolder "
        "trees for data.source synth_cls",
    )
    _common(p)
    p.add_argument("--out-dir", required=True, help="dataset folder to create")
    p.set_defaults(func=cmd_data_synth)
    p = dsub.add_parser(
        "check", help="validate a COCO JSON and its images (or an ImageFolder) before training"
    )
    _common(p, config=False)
    p.add_argument("--ann", required=True, help="COCO instances JSON, or an ImageFolder root")
    p.add_argument(
        "--images",
        required=True,
        help="image folder (file_name is relative to it); for an ImageFolder, its root again",
    )
    p.add_argument("--out", default=None, help="write a JSON summary here when the check passes")
    p.set_defaults(func=cmd_data_check)
    p = dsub.add_parser(
        "voc2coco",
        help="convert a PASCAL VOC split (VOCdevkit XML) to COCO JSON; on any bad XML, box, "
        "class name or missing image, list them all and write nothing",
    )
    _common(p, config=False)
    p.add_argument("--voc-root", required=True, help="e.g. VOCdevkit/VOC2007")
    p.add_argument("--split", required=True, help="ImageSets/Main/<split>.txt, e.g. trainval")
    p.add_argument("--out", required=True, help="output COCO JSON")
    p.set_defaults(func=cmd_data_voc2coco)
    p = dsub.add_parser(
        "carve", help="carve a deterministic tune split of N images from a COCO training JSON"
    )
    _common(p, config=False)
    p.add_argument("--ann", required=True, help="COCO instances JSON to carve, e.g. train2017")
    p.add_argument("--size", type=int, required=True, help="tune images (data.coco.tune_images)")
    p.add_argument("--seed", type=int, required=True, help="seed of the image permutation")
    p.add_argument("--out-train", required=True, help="output COCO JSON: train minus tune")
    p.add_argument("--out-tune", required=True, help="output COCO JSON: the tune split")
    p.set_defaults(func=cmd_data_carve)

    p = sub.add_parser("train", help="train the baseline detector")
    _common(p, threads=True)
    _nproc(p)
    _data_paths(p, "train")
    p.add_argument("--out", required=True, help="final checkpoint (.pt); <out>.resume.pt resumes")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="pretrain the detector's backbone as a classifier")
    _common(p, threads=True)
    p.add_argument("--out", required=True, help="the backbone's state_dict (.pt)")
    p.add_argument("--meta", required=True, help="its record (.json): accuracy, versions")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("import-checkpoint", help="the baseline from a detector's weights file")
    _common(p)
    p.add_argument("--weights", required=True, help="detprune checkpoint or torchvision file")
    p.add_argument("--train-ann", required=True, help="training COCO JSON (its category ids)")
    p.add_argument("--out", required=True, help="baseline checkpoint (.pt)")
    p.add_argument("--seed", type=int, default=None, help="the baseline's seed (provenance)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("sparse", help="sparse training before pruning (slim, depgraph, ...)")
    _common(p, threads=True)
    _nproc(p)
    p.add_argument("--regularizer", required=True, help="sparse.regularizers key, e.g. bn_l1")
    p.add_argument("--checkpoint", required=True, help="baseline checkpoint")
    _data_paths(p, "train")
    p.add_argument("--out", required=True, help="sparse-trained checkpoint")
    p.set_defaults(func=cmd_sparse)

    p = sub.add_parser("prune", help="prune a checkpoint to a share of its FLOPs")
    _common(p, threads=True)
    p.add_argument("--method", required=True, help="a name from `detprune list methods`")
    p.add_argument("--flops", type=float, required=True, help="share of FLOPs to keep, e.g. 0.5")
    p.add_argument("--checkpoint", required=True, help="checkpoint to prune")
    _data_paths(p, "train")
    p.add_argument("--out", required=True, help="pruned checkpoint (state_dict + history)")
    p.add_argument("--summary", required=True, help="JSON: FLOPs reached, channels per layer")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a pruned checkpoint")
    _common(p, threads=True)
    _nproc(p)
    p.add_argument("--method", required=True, help="selects finetune.methods overrides")
    p.add_argument("--checkpoint", required=True, help="pruned checkpoint")
    p.add_argument("--teacher", required=True, help="unpruned checkpoint (for distillation)")
    _data_paths(p, "train")
    p.add_argument("--out", required=True, help="fine-tuned checkpoint")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="COCO AP, params, FLOPs and latency of a checkpoint")
    _common(p, threads=True)
    p.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
    p.add_argument("--ann", required=True, help="COCO instances JSON (ImageFolder: its root)")
    p.add_argument("--images", required=True, help="image folder (ImageFolder: its root)")
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="which split this is, recorded in the metrics: tables report only test",
    )
    p.add_argument("--method", default="baseline", help="method name recorded in the metrics")
    p.add_argument("--flops", type=float, default=1.0, help="FLOPs target recorded")
    p.add_argument("--out", required=True, help="metrics JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a checkpoint's dense network to ONNX, checked by ORT")
    _common(p, config=False)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--checkpoint", required=True, help="checkpoint to export")
    p.add_argument("--ann", required=True, help="COCO instances JSON of the validation images")
    p.add_argument("--images", required=True, help="image folder of those images")
    p.add_argument("--num-images", type=int, default=2, help="images checked (one batch, >= 2)")
    p.add_argument("--out", required=True, help=".onnx file (its report: .onnx.json beside it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "time-latency", help="latency of every checkpoint that metrics records name, one job"
    )
    _common(p)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSONs (baseline first)")
    p.add_argument("--ann", required=True, help="COCO instances JSON (ImageFolder: its root)")
    p.add_argument("--images", required=True, help="image folder: its first image is timed")
    p.add_argument("--out", required=True, help="timing record JSON")
    p.set_defaults(func=cmd_time_latency)

    p = sub.add_parser("report", help="paper-style tables and figures from metrics JSONs")
    _common(p)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSONs")
    p.add_argument(
        "--latency", nargs="*", default=[], help="timing records (detprune time-latency)"
    )
    p.add_argument("--prune-summaries", nargs="*", default=[], help="pruning summary JSONs")
    p.add_argument("--tables-dir", required=True, help="folder for .csv/.md/.tex tables")
    p.add_argument("--figures-dir", required=True, help="folder for .png figures")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("table", help="a paper table: reported beside reproduced figures")
    p.add_argument("--table", required=True, help="name of a config/tables/*.yaml table")
    p.add_argument("--profile", required=True, choices=["mini", "paper"])
    p.add_argument("--results", required=True, help="results root of the table run")
    p.add_argument("--seeds", default=None, help="seeds, comma separated (default: the table's)")
    p.add_argument("--reported", default="config/reported.yaml", help="reported numbers")
    p.add_argument("--tables-dir", required=True, help="folder for .csv/.md/.tex/.json")
    p.add_argument("--figures-dir", required=True, help="folder for the .png figure")
    p.add_argument("--log", default=None, help="also write the log to this file")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("claims", help="the papers' claims read against a table run")
    p.add_argument("--claims", default="config/claims.yaml", help="the claims file")
    p.add_argument("--reported", default="config/reported.yaml", help="reported numbers")
    p.add_argument("--profile", required=True, choices=["mini", "paper"])
    p.add_argument("--results", required=True, help="results root of the table run")
    p.add_argument("--tables", nargs="+", required=True, help="the run's tables, each name[:seeds]")
    p.add_argument("--csv", required=True, help="the ledger as csv")
    p.add_argument("--md", required=True, help="the ledger as a Markdown page")
    p.add_argument("--log", default=None, help="also write the log to this file")
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("list", help="list registered models, methods or paper tables")
    p.add_argument("what", choices=["models", "methods", "tables"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("dvc", help="generate dvc.yaml from the config")
    p.add_argument("--config", required=True, help="pipeline config YAML")
    p.add_argument("--out", default="dvc.yaml", help="where to write (default dvc.yaml)")
    p.add_argument("--check", action="store_true", help="fail if --out differs, write nothing")
    p.set_defaults(func=cmd_dvc)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``detprune`` console script."""
    args = build_parser().parse_args(argv)
    if args.command in TRAINING:
        from detprune.train import distributed

        distributed.install_handlers()  # SIGTERM/SIGUSR1: checkpoint, exit 75 (requeue)
    _setup_logging(getattr(args, "log", None))
    if args.command in TRAINING:
        _launch_workers(args, argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        from detprune.config import ConfigError
        from detprune.data.coco import DatasetError

        if isinstance(exc, (ConfigError, DatasetError, FileNotFoundError, KeyError)):
            log.error("%s", exc if not isinstance(exc, KeyError) else exc.args[0])
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
