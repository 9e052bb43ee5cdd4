"""Profiles: how big the notebooks' experiments are. One notebook, three scales, chosen by papermill.

    smoke  the tests: every notebook end to end, as small as runs can be (numbers meaningless)
    quick  the embedded default, sized for a 2-core laptop CPU: all notebooks in one sitting (the time a
           run took is in results/reproduce_quick.json and in every table's provenance line)
    gpu    more classes, queries and iterations on one GPU: long enough for MaskFormer's advantage at large
           K to appear, which the quick profile's runs are too short for
    paper  the paper's presets on the real datasets (data_root), full schedules, many GPUs via torchrun

Synthetic profiles train the small presets (`synthetic-<model>-<backbone>`) from one backbone pretrained
once on synthetic classification (mfcore.training.pretrain), the way the paper starts every model from ImageNet.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mfcore.training.pretrain import PretrainConfig


@dataclass(frozen=True)
class Profile:
    name: str
    synthetic: bool = True                 # False: the paper's presets on real data under data_root
    backbone: str = "tiny"                 # small preset backbone (synthetic profiles)
    image_size: int = 64                   # synthetic scene size
    num_train: int = 2000                  # synthetic training scenes per dataset
    num_val: int = 200                     # synthetic validation scenes
    class_counts: tuple[int, ...] = (8, 16, 32)  # K settings of Table 2's trend (>= 3)
    base_classes: int = 32                 # K of the other ablations
    query_counts: tuple[int, ...] = (10, 20, 50)  # number-of-queries ablation (base: 20)
    num_queries: int = 20                  # N of MaskFormer runs
    iters: int = 300                       # optimiser steps per training run
    batch_size: int = 16
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0,)          # the tables report the median over seeds
    eval_images: int | None = None         # None: the whole val split
    parallel_runs: int = 1                 # training runs side by side in the batch pipeline (small runs leave a GPU idle)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    device: str = "auto"

    def describe(self) -> str:
        if not self.synthetic:
            return f"profile {self.name}: the paper's presets on real data, full schedules, seeds {list(self.seeds)}"
        return (f"profile {self.name}: synthetic {self.image_size}x{self.image_size} scenes "
                f"({self.num_train} train / {self.num_val} val), backbone {self.backbone} pretrained "
                f"{self.pretrain.iters} iters on synthetic classification, {self.iters} iters x batch "
                f"{self.batch_size} per model, seeds {list(self.seeds)}")


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", num_train=64, num_val=16, class_counts=(4, 8, 16), base_classes=8,
                     query_counts=(4, 8), num_queries=8, iters=4, batch_size=4,
                     pretrain=PretrainConfig(num_primitives=5, num_train=64, num_val=16, iters=4, batch_size=16)),
    # K = 8, 16, 32 all draw their classes from the same 9-primitive bank (3 hues x 3 patterns) that the
    # backbone is pretrained on: one "ImageNet" for every setting, as in the paper.
    "quick": Profile("quick", pretrain=PretrainConfig(num_primitives=9, num_train=3000, num_val=300, iters=1500)),
    # Sizing: in 1200-iteration CPU runs (batch 16) MaskFormer caught up with PerPixelBaseline+ at K=8 and 16
    # but not yet at 32, so this profile keeps the quick profile's K and gives each run 2500 iterations of
    # batch 32 (about 4x the images). Runs this small are bound by kernel launches, not arithmetic, so
    # several share the GPU side by side (parallel_runs). One seed, to keep the profile within one session.
    "gpu": Profile("gpu", num_train=20000, num_val=1000, class_counts=(8, 16, 32), base_classes=32,
                   query_counts=(20, 50, 100, 200), num_queries=100, iters=2500, batch_size=32, seeds=(0,),
                   pretrain=PretrainConfig(num_primitives=9, num_train=50000, num_val=2000, iters=6000,
                                           batch_size=256), device="cuda", parallel_runs=4),
    "paper": Profile("paper", synthetic=False, seeds=(0, 1, 2), num_queries=100, device="cuda"),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: expected one of {sorted(PROFILES)}")
    return PROFILES[name]
