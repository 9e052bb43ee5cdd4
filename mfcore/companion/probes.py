"""What pooling over a segment buys, measured in a trained model's own features (linear probes).

The paper's argument (Sec. 1, 3.2): a segment is named from evidence pooled over the whole segment, a pixel from
its neighbourhood. For every ground-truth segment of the train and val splits, this takes the features the
queries attend to (the memory: `ModelConfig.memory_feature` of the backbone) and builds

    pooled(s) = sum_p w_s(p) f(p) / sum_p w_s(p)     w_s: the segment's mask, area-resized to the feature grid
    local     = f(p) for every position p the segment covers by more than half, labelled with its class

then fits one linear classifier on the train split for each (standardised features, softmax regression) and
scores it on val: the pooled probe's segment accuracy against the local probe's position accuracy. Next to
`diagnostics.MatchingDiagnostic`'s matched class accuracy it says where MaskFormer's class errors come from: if
the pooled probe names segments far better than the queries do, the features hold the class and the queries'
attention has not yet learned to pool over their segment; if the pooled probe is weak too, the features do not.

    python -m mfcore.companion.probes RUN/last.pt [...] --data-root DATA [--max-images 600]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfcore.training.checkpoint import configs_from_checkpoint, load_trained_model
from mfcore.training.runtime import checkpoint_dataset, forked_rng


@torch.no_grad()  # not inference_mode: the probes are trained on these tensors
def segment_features(model: nn.Module, dataset: Any, max_images: int | None = None, batch: int = 32
                     ) -> dict[str, Tensor]:
    """Memory features of `dataset`'s segments (built without transform; images a multiple of 32).

    Returns {"pooled": [S, C], "pooled_labels": [S], "local": [P, C], "local_labels": [P]}.
    """
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    pooled, pooled_labels, local, local_labels = [], [], [], []
    for start in range(0, count, batch):
        samples = [dataset[i] for i in range(start, min(start + batch, count))]
        images = torch.stack([s["image"].float() for s in samples])
        _, memory = model.pixel_features(images)                                     # [B, C, h, w]
        for sample, feats in zip(samples, memory):
            if len(sample["labels"]) == 0:
                continue
            weights = F.interpolate(sample["masks"][None].float(), size=feats.shape[-2:], mode="area")[0]  # [n, h, w]
            flat, w = feats.flatten(1), weights.flatten(1)                           # [C, hw], [n, hw]
            covered = w.sum(1) > 0
            pooled.append((w[covered] @ flat.T) / w[covered].sum(1, keepdim=True))
            pooled_labels.append(sample["labels"][covered])
            owner = w.argmax(0)                                                      # [hw] segment of each position
            majority = w.max(0).values > 0.5
            local.append(flat.T[majority])
            local_labels.append(sample["labels"][owner[majority]])
    return {"pooled": torch.cat(pooled), "pooled_labels": torch.cat(pooled_labels),
            "local": torch.cat(local), "local_labels": torch.cat(local_labels)}


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                 steps: int = 500, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Val accuracy (percent) of a softmax regression fit on (train_x [M, C], train_y [M]), full batch, Adam."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    with forked_rng(seed):  # a seeded initialisation that leaves the caller's RNGs as they were
        probe = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float((probe(val_x).argmax(1) == val_y).float().mean())


def segment_probe(checkpoint: str | Path, data_root: str | Path | None = None, max_images: int | None = None
                  ) -> dict:
    """Pooled and local linear probes of a checkpoint's memory features, fit on train, scored on val.

    Returns {"pooled_acc", "local_acc" (percent; chance 100/K), "train_segments", "val_segments", "num_classes"}.
    """
    model, ckpt = load_trained_model(checkpoint)
    _, model_cfg, _, train_cfg = configs_from_checkpoint(ckpt)
    splits = {split: segment_features(model, checkpoint_dataset(checkpoint, model_cfg, train_cfg, data_root, split),
                                      max_images) for split in ("train", "val")}
    tr, va, k = splits["train"], splits["val"], model_cfg.num_classes
    return {"pooled_acc": linear_probe(tr["pooled"], tr["pooled_labels"], va["pooled"], va["pooled_labels"], k),
            "local_acc": linear_probe(tr["local"], tr["local_labels"], va["local"], va["local_labels"], k),
            "train_segments": len(tr["pooled_labels"]), "val_segments": len(va["pooled_labels"]), "num_classes": k}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m mfcore.companion.probes", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="mfcore checkpoints (last.pt of a run)")
    parser.add_argument("--data-root", default=None, help="the dataset the runs were trained on")
    parser.add_argument("--max-images", type=int, default=None, help="images per split (default: all)")
    args = parser.parse_args(argv)
    for checkpoint in args.checkpoints:
        if not Path(checkpoint).is_file():
            print(f"{checkpoint}: no such checkpoint file", file=sys.stderr)
            return 2
        print(json.dumps({"checkpoint": checkpoint, **segment_probe(checkpoint, args.data_root, args.max_images)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
