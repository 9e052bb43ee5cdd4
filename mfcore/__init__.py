"""mfcore: a small, faithful PyTorch companion to MaskFormer (Cheng, Schwing, Kirillov, NeurIPS 2021)."""
from mfcore.config import LossConfig, ModelConfig, TrainConfig
from mfcore.modeling.models import (
           MaskFormer,
           PerPixelBaseline,
           PerPixelBaselinePlus,
           build_model,
)
from mfcore.presets import PRESETS, get_preset

__all__ = ["LossConfig", "ModelConfig", "TrainConfig", "MaskFormer", "PerPixelBaseline", "PerPixelBaselinePlus",
           "build_model", "PRESETS", "get_preset"]
