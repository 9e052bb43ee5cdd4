"""Backbone pretraining on synthetic image-level classification: the embedded benchmark's "ImageNet".

The paper never trains from scratch: every compared model starts from one ImageNet-pretrained backbone.
The embedded benchmark follows the same protocol. A backbone learns to name the dominant texture class
of separately generated images (`mfcore.data.make_classification_set`), once; its weights are cached and
every model of a comparison starts from them (`ModelConfig.pretrained`).

    logits = Linear(GlobalAvgPool(res5))    loss = CE(logits, label)
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mfcore.config import PIXEL_MEAN, PIXEL_STD
from mfcore.data import make_classification_set
from mfcore.data.synthetic_writer import generate_once
from mfcore.files import write_json
from mfcore.modeling.backbones import build_backbone
from mfcore.training.checkpoint import save_checkpoint
from mfcore.training.runtime import keep_freed_memory, resolve_device, seed_everything


@dataclass
class PretrainConfig:
    backbone: str = "tiny"          # mfcore.backbones name
    design: str = "pairs"           # mfcore.data.synthetic design of the classification images
    num_primitives: int = 17        # "pairs": texture bank of the images (17 -> 136 pair classes)
    num_hues: int = 64              # "hue": evenly spaced hue classes (64 covers the scenes' K = 8, 16, 32, 64)
    image_size: int = 64            # square images
    num_train: int = 4000           # generated training images
    num_val: int = 400
    iters: int = 1500               # optimiser steps
    batch_size: int = 64
    lr: float = 2e-3                # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    seed: int = 0

    @property
    def num_classes(self) -> int:
        if self.design == "hue":
            return self.num_hues
        return self.num_primitives * (self.num_primitives - 1) // 2


def _load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageFolder -> (images uint8 [M,3,S,S], labels [M]) held in memory (a few MB at 64x64)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.v2.functional import pil_to_tensor

    folder = ImageFolder(str(root))
    images = torch.stack([pil_to_tensor(folder.loader(p)) for p, _ in folder.samples])
    return images, torch.tensor(folder.targets)


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels["res5"], num_classes)
        mean, std = torch.tensor(PIXEL_MEAN), torch.tensor(PIXEL_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone((images.float() - self.mean) / self.std)["res5"]
        return self.head(feats.mean(dim=(2, 3)))


def pretrain_backbone(cfg: PretrainConfig, out_path: str | Path, data_dir: str | Path, device: str = "auto",
                      progress: str = "log") -> dict:
    """Pretrain `cfg.backbone` and save its weights to `out_path` (atomically) with a JSON report beside it.
    Reuses the file if it exists with the same config. Returns the report."""
    out_path, data_dir = Path(out_path), Path(data_dir)
    report_path = out_path.with_suffix(".json")
    if out_path.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("config") == dataclasses.asdict(cfg):
            return report
    generate_once(data_dir, lambda out: make_classification_set(
        out, cfg.num_classes, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed,
        num_primitives=cfg.num_primitives if cfg.design == "pairs" else None, design=cfg.design),
        "classification_meta.json")
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # as training does
    train_x, train_y = _load_folder(data_dir / "train")
    val_x, val_y = _load_folder(data_dir / "val")
    seed_everything(cfg.seed)
    model = _Classifier(build_backbone(cfg.backbone), cfg.num_classes).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.iters, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for it in range(1, cfg.iters + 1):
        idx = torch.randint(len(train_x), (cfg.batch_size,), generator=gen)
        x = train_x[idx]
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5  # the textures are flip-invariant
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x.to(dev)), train_y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress != "off" and (it % max(1, cfg.iters // 10) == 0 or it == cfg.iters):
            print(f"pretrain {cfg.backbone}: iter {it}/{cfg.iters} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val_x[i:i + 256].to(dev)).argmax(1).cpu() for i in range(0, len(val_x), 256)])
    report = {"config": dataclasses.asdict(cfg), "val_accuracy": 100.0 * (pred == val_y).float().mean().item(),
              "chance": 100.0 / cfg.num_classes, "seconds": round(time.perf_counter() - start, 1),
              "weights": str(out_path)}
    save_checkpoint(out_path, {"model": model.backbone.state_dict(), "pretrain": report})
    write_json(report_path, report)
    return report
