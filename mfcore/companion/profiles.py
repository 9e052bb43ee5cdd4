"""Profiles: how big the notebooks' experiments are. One notebook, several scales, chosen by papermill.

    smoke   the tests: every notebook end to end in about a minute (numbers meaningless)
    quick   the embedded default: a laptop CPU, all notebooks in under 25 minutes on 2 cores; Tables 2 and 4
    laptop  every trained table with three seeds on 2 CPU cores (under 2 hours), quick's protocol and iterations
    gpu     K up to 128 and the paper's width on one GPU, three seeds (sized by estimate: see the README)
    paper   the paper's presets on the real datasets (data_root), full schedules, many GPUs via torchrun

Synthetic profiles train the small presets (`synthetic-<model>-<backbone>`) from one backbone pretrained
once on synthetic classification (mfcore.training.pretrain), the way the paper starts every model from ImageNet.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mfcore.training.pretrain import PretrainConfig

# Iterations per run, the same for every model of every synthetic CPU profile. Sized by measurement to fit quick in
# 25 minutes on 2 cores with set-up: at 1000 iterations its 8 runs (Tables 2 and 4, the notebooks' panoptic run) took
# 24.8 min for pretraining and 7 runs two side by side plus 4.4 min for the panoptic run alone (32.7 min in all with
# make venv): about 2.8 s of one core per iteration in all. With make venv (2 min), pretraining (2 min), the notebooks
# (1.5 min) and a 10% margin, 750 fit. laptop trains the same 750: at 1000 its runs took about 2.4 hours, over its
# 2-hour aim; at 750 its 45 runs took 110.8 min from a fresh clone, about 1 h 50 min on idle cores (README, "How the
# laptop tables were run"), and its seed-0 runs are quick's.
SYNTHETIC_ITERS = 750


@dataclass(frozen=True)
class Profile:
    name: str
    synthetic: bool = True                 # False: the paper's presets on real data under data_root
    backbone: str = "tiny8"                # small preset backbone (synthetic profiles)
    memory_feature: str = "res5"           # what the queries attend to: the deepest features, as in the paper (tiny8's
                                           # res5 is 8x8 on 64x64 scenes, so a segment still spans several positions)
    design: str = "hue"                    # scene design (mfcore.data.synthetic): "hue" tests the paper's mechanism,
                                           # "pairs" (a class = two texture primitives) is the named variant
    hue_noise: float = 40.0                # "hue": per-pixel hue std in degrees
    hue_context: int = 4                   # "hue": a scene's classes lie within this many hue steps of one anchor
    class_freq_exponent: float = 0.0       # Zipf exponent of the class frequencies (0 = uniform)
    image_size: int = 64                   # synthetic scene size
    num_train: int = 2000                  # synthetic training scenes per dataset
    num_val: int = 200                     # synthetic validation scenes
    class_counts: tuple[int, ...] = (8, 16, 32)  # K settings of Table 2's trend (>= 3)
    base_classes: int = 32                 # K of the other ablations
    query_counts: tuple[int, ...] = (10, 20, 50)  # number-of-queries ablation (base: 20)
    num_queries: int = 20                  # N of MaskFormer runs
    width: int = 128                       # transformer width of every compared model (hidden_dim; nheads = width // 16)
    curve_points: int = 5                  # val evaluations along each run (learning curves), the last at the end
    tables: tuple[str, ...] = ()           # trained tables this profile runs; () = all of them
    perpixel_rows: bool = True             # Table 2 trains PerPixelBaseline too (the claims compare PerPixelBaseline+)
    iters: int = 300                       # optimiser steps per training run
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0          # the backbone's lr is lr x this. The paper's ResNets take 0.1; here 0.1 lowered
                                           # both models at K=64 (results/levers: PP+ -3.3, MaskFormer -1.5 mIoU), the
                                           # tiny backbone's pretraining being far from finished features
    seeds: tuple[int, ...] = (0,)          # the tables report the median over seeds
    eval_images: int | None = None         # None: the whole val split
    parallel_runs: int = 1                 # training runs side by side in the batch pipeline (small runs leave a GPU idle)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    device: str = "auto"

    def describe(self) -> str:
        if not self.synthetic:
            return f"profile {self.name}: the paper's presets on real data, full schedules, seeds {list(self.seeds)}"
        return (f"profile {self.name}: synthetic '{self.design}' {self.image_size}x{self.image_size} scenes "
                f"({self.num_train} train / {self.num_val} val), backbone {self.backbone} pretrained "
                f"{self.pretrain.iters} iters on {self.pretrain.num_train} {self.pretrain.image_size}x{self.pretrain.image_size} "
                f"synthetic classification images, queries on {self.memory_feature}, width "
                f"{self.width}, {self.iters} iters x "
                f"batch {self.batch_size}, lr {self.lr:g} for every model, seeds {list(self.seeds)}")

    def model_fields(self, model: str) -> dict:
        """The ModelConfig fields a synthetic run of `model` takes from the profile: one width, attention memory and
        N for every compared model (N = K models keep one query per class)."""
        fields = {"hidden_dim": self.width, "nheads": max(1, self.width // 16), "memory_feature": self.memory_feature}
        if model in ("maskformer", "maskformer-boxmatch"):
            fields["num_queries"] = self.num_queries
        return fields

    def runs_table(self, name: str) -> bool:
        """Whether this profile trains the runs of table `name` (a notebook shows the others as not run)."""
        return not self.tables or name in self.tables


# The synthetic profiles share one protocol, fixed before their tables were looked at: "hue" scenes (the class is a
# statistic of the whole segment, see data/README.md), one tiny backbone pretrained on image-level classification
# of 64 evenly spaced hues (it covers every K <= 64: one "ImageNet" for every setting, as in the paper), width 128
# and the same lr, batch, schedule and iterations for every model of a table.
# The pretraining is sized like ImageNet's role in the paper: a large labelled set (20,000 images) trained long
# enough that the backbone's features name the hue (val accuracy ~70% over 64 classes, chance 1.6%), so neither
# model has to learn class identity from the small segmentation set. 32x32 images keep it as cheap as the
# segmentation runs' own data (4000 steps x 64 images at 32x32 ~ 1000 steps at 64x64). Measured with
# `python -m mfcore.companion.levers` (results/levers/): the weaker 3,000-image pretraining held MaskFormer back
# more than PerPixelBaseline+ at K=64 (README, "Protocol").
_HUE64 = PretrainConfig(design="hue", num_hues=64, image_size=32, num_train=20000, num_val=300, iters=4000)

PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", num_train=64, num_val=16, class_counts=(4, 8, 16), base_classes=8,
                     query_counts=(4, 8), num_queries=8, iters=4, batch_size=4, width=32, curve_points=2,
                     pretrain=PretrainConfig(design="hue", num_hues=16, num_train=64, num_val=16, iters=4,
                                             batch_size=16)),
    # Laptop CPU, under 25 minutes on 2 cores from a fresh clone: Table 2 at three K and Table 4 (Table VII
    # re-reads Table 4's checkpoints), one seed, two runs side by side.
    "quick": Profile("quick", class_counts=(8, 32, 64), iters=SYNTHETIC_ITERS, pretrain=_HUE64, parallel_runs=2,
                     tables=("table2", "table4", "table7"), perpixel_rows=False),
    # Every trained table, three seeds, the same scenes, backbone, hyper-parameters and iterations as quick (its
    # seed-0 runs are quick's); like quick without the PerPixelBaseline rows of Table 2, to fit 2 hours.
    "laptop": Profile("laptop", class_counts=(8, 32, 64), iters=SYNTHETIC_ITERS, seeds=(0, 1, 2), pretrain=_HUE64,
                      parallel_runs=2, perpixel_rows=False),
    # One GPU: K up to 128, the paper's width 256 and N = 100, three seeds, many runs side by side (each small
    # run alone leaves the GPU idle). Not yet run on a GPU: its size is an estimate.
    "gpu": Profile("gpu", num_train=8000, num_val=500, class_counts=(8, 32, 128), base_classes=32,
                   query_counts=(20, 50, 100), num_queries=100, width=256, iters=2000, batch_size=32,
                   seeds=(0, 1, 2), device="cuda", parallel_runs=8,
                   pretrain=PretrainConfig(design="hue", num_hues=128, num_train=20000, num_val=1000, iters=3000,
                                           batch_size=256)),
    "paper": Profile("paper", synthetic=False, seeds=(0, 1, 2), num_queries=100, device="cuda"),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: expected one of {sorted(PROFILES)}")
    return PROFILES[name]
