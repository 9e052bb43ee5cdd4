"""Parameters and FLOPs counted the paper's way.

The paper's "FLOPs" are multiply-adds: one fused multiply-add = one flop (fvcore's convention), hence
`count_macs` (benchmarks/ counts real FLOPs, 2 per multiply-add, for throughput). Model in eval mode, a zero
image at the preset's crop size, semantic inference included (masks upsampled to the image and
combined with class probabilities). We count with `torch.utils.flop_counter.FlopCounterMode`, which
counts matrix products and convolutions as 2 flops per multiply-add, and halve its total; like the
paper's counter it ignores element-wise work (adds, activations, softmax, norms' arithmetic).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mfcore.inference import semantic_inference
from mfcore.modeling.models import SegmentationModel


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen-BN statistics are buffers and never counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(model: SegmentationModel) -> dict[str, int]:
    """Parameters per top-level module (backbone, pixel_decoder, predictor) and in total."""
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    parts["total"] = count_parameters(model)
    return parts


def semantic_forward(model: SegmentationModel, images: torch.Tensor) -> torch.Tensor:
    """Forward + semantic inference at the input size: images [B,3,H,W] -> scores [B,K,H,W].
    (No autograd context here: FLOP counting needs a plain call; wrap it in torch.no_grad() to predict.)"""
    out = model(images)
    size = images.shape[-2:]
    if "pred_logits" in out:
        # channels-last upsampling leaves the query axis innermost, as semantic_inference reads it
        masks = out["pred_masks"].contiguous(memory_format=torch.channels_last)
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return semantic_inference(out["pred_logits"], masks, inplace=True)
    logits = F.interpolate(out["sem_seg_logits"], size=size, mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def count_macs(model: SegmentationModel, size: tuple[int, int]) -> int:
    """Multiply-adds of one eval-mode forward + semantic inference on a zero image of `size` (H, W), of a
    model as `build_model` makes it: the paper's order, E_pixel, then the mask product (a model given to
    `mfcore.fast.accelerate` may fold the two, which counts fewer)."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    # FlopCounterMode's module tracker fails under no_grad on some graphs; frozen parameters give the
    # same no-autograd forward without it.
    model.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            semantic_forward(model, torch.zeros(1, 3, *size, device=model.pixel_mean.device))
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 flops


def analyze(preset: str, size: tuple[int, int] | None = None, flops: bool = True) -> dict:
    """{"preset", "params", "params_by_module", "size", "flops"} for a named preset (built on the meta
    device, so even Swin-L at 640 takes a second); "flops" is the paper's FLOPs column: multiply-adds
    (`count_macs`)."""
    from mfcore.modeling.models import build_model
    from mfcore.presets import get_preset

    p = get_preset(preset)
    with torch.device("meta"):  # shapes only: counting needs no memory and no real arithmetic
        model = build_model(p.model)
    size = tuple(size) if size else tuple(p.train.crop_size)
    result = {"preset": preset, "params": count_parameters(model), "params_by_module": parameter_breakdown(model),
              "size": list(size)}
    if flops:
        result["flops"] = count_macs(model, size)
    return result
