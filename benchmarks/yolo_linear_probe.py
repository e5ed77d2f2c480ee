"""Linear probe of a trained YOLO checkpoint: do the head features hold the class?

For every ground-truth box the model's own assignment (``YOLO.build_targets``) picks the
cells and anchors that learn it; the head's 3x3 conv output at those cells is the feature.
A logistic regression fitted on the training positives and scored on the validation
positives says how much class information the features carry; the head's own argmax over
its class logits and the majority-class share are printed beside it.

    python benchmarks/yolo_linear_probe.py results/models/baseline.pt --data results/data/synth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from detprune.data.coco import CocoDetection
from detprune.data.transforms import get_transform
from detprune.models.yolo import YOLO, split_prediction, target_rows
from detprune.train import checkpoint


def positives(
    model: YOLO, data: Path, split: str, limit: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per level: head features, labels and the head's predicted class at the positives."""
    ds = CocoDetection(
        str(data / f"instances_{split}.json"),
        str(data / split),
        transforms=get_transform("none", train=False),
    )
    feats: dict[int, list] = {}
    n = min(limit, len(ds))
    for start in range(0, n, 16):
        ims, tgs = zip(*[ds[i] for i in range(start, min(n, start + 16))], strict=True)
        with torch.no_grad():
            x, tgs2, _ = model.transform(list(ims), list(tgs))
            necks = model.neck(model.backbone(x))
            mids = [c(f) for f, c in zip(necks, model.head.convs, strict=True)]
            gt = target_rows(tgs2, torch.device("cpu"))
            for lv, (h, pred) in enumerate(zip(mids, model.head.preds, strict=True)):
                b, a, gj, gi, tgt = model.build_targets(lv, gt, (h.shape[2], h.shape[3]))
                logits = split_prediction(pred(h), len(model.masks[lv]))[b, a, gj, gi][:, 5:]
                feats.setdefault(lv, []).append(
                    (h[b, :, gj, gi].numpy(), tgt[:, 1].long().numpy(), logits.argmax(1).numpy())
                )
    return {
        lv: tuple(np.concatenate([r[k] for r in rows]) for k in range(3))  # type: ignore[misc]
        for lv, rows in feats.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=Path("results/data/synth"))
    ap.add_argument("--images", type=int, default=400, help="training images to fit on")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = checkpoint.load_model(args.checkpoint)
    if not isinstance(model, YOLO):
        raise SystemExit(f"{args.checkpoint}: model is {type(model).__name__}, not a YOLO")
    model.eval()
    train = positives(model, args.data, "train", args.images)
    val = positives(model, args.data, "val", args.images // 4)
    for lv in sorted(train):
        xt, yt, _ = train[lv]
        xv, yv, pv = val[lv]
        probe = LogisticRegression(max_iter=2000).fit(xt, yt)
        print(
            f"level {lv} (stride {model.strides[lv]}): {len(yt)} train / {len(yv)} val "
            f"positives; probe accuracy train {probe.score(xt, yt):.2f} val "
            f"{probe.score(xv, yv):.2f}; head's own val accuracy {(pv == yv).mean():.2f}; "
            f"majority class {np.bincount(yv).max() / len(yv):.2f}"
        )


if __name__ == "__main__":
    main()
