"""mfcore: a small, faithful PyTorch companion to MaskFormer (Cheng, Schwing, Kirillov, NeurIPS 2021)."""
from .config import LossConfig, ModelConfig, TrainConfig
from .models import MaskFormer, PerPixelBaseline, PerPixelBaselinePlus, build_model
from .presets import PRESETS, get_preset

__all__ = ["LossConfig", "ModelConfig", "TrainConfig", "MaskFormer", "PerPixelBaseline", "PerPixelBaselinePlus",
           "build_model", "PRESETS", "get_preset"]
