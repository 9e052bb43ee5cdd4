"""The reference side of `benchmarks.bench`: Hugging Face `transformers`' MaskFormer, set up like mfcore's.

transformers is an optional, benchmark-only dependency (`pip install -e ".[bench]"`); mfcore never imports
this module itself. Everything is built offline from config objects: a randomly initialised timm
ResNet-50 with frozen BatchNorm (`use_pretrained_backbone=False`), and HF_HUB_OFFLINE=1 so that no file
can be fetched.

Equivalence with mfcore's MaskFormer R50 (41.25M parameters in both):
  * K classes (K+1 logits), N queries, 6 post-norm decoder layers, d=256, 8 heads, FFN 2048, FPN 256;
  * dropout 0.1 in the decoder *everywhere DETR has it*: residual branches, attention weights and the FFN
    hidden layer (transformers' defaults leave the last two at 0, which would make its step cheaper);
  * loss weights 1 (CE), 20 (focal), 1 (dice), "no object" weight 0.1, Hungarian costs 1 / 20 / 1;
  * deep supervision over the 6 decoder layers (18 loss terms). transformers' own
    `use_auxiliary_loss=True` path also supervises the decoder's *input* (the all-zero query state), a
    seventh set of masks, matching and losses; `train_loss` drops it so both sides do the same work.
Images go to transformers already normalised (its image processor's job); mfcore normalises inside forward.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor, nn


def available() -> bool:
    """True when transformers (and its MaskFormer) can be imported."""
    return importlib.util.find_spec("transformers") is not None


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # config objects only: never reach for the Hub
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()  # "timm_backbone is not a supported model" is about pretrained configs
    return transformers


def build_model(num_classes: int = 150, num_queries: int = 100, dec_layers: int = 6, dropout: float = 0.1) -> nn.Module:
    """`MaskFormerForInstanceSegmentation` with a random timm ResNet-50 (frozen BN), like mfcore's R50 preset."""
    tf = _transformers()
    backbone = tf.TimmBackboneConfig(backbone="resnet50", out_indices=[1, 2, 3, 4], features_only=True,
                                     freeze_batch_norm_2d=True, use_pretrained_backbone=False)
    decoder = tf.MaskFormerDetrConfig(num_queries=num_queries, decoder_layers=dec_layers, d_model=256,
                                      decoder_attention_heads=8, decoder_ffn_dim=2048, dropout=dropout,
                                      attention_dropout=dropout, activation_dropout=dropout,
                                      backbone_config=None, use_timm_backbone=True)
    config = tf.MaskFormerConfig(backbone_config=backbone, decoder_config=decoder, num_labels=num_classes,
                                 fpn_feature_size=256, mask_feature_size=256, no_object_weight=0.1,
                                 cross_entropy_weight=1.0, mask_weight=20.0, dice_weight=1.0,
                                 use_auxiliary_loss=False)  # deep supervision is done in train_loss
    return tf.MaskFormerForInstanceSegmentation(config)


def train_loss(model: nn.Module, pixel_values: Tensor, mask_labels: list[Tensor], class_labels: list[Tensor]) -> Tensor:
    """Forward + the weighted loss with deep supervision over the decoder's 6 layers, built from the model's
    own heads and criterion exactly as its `use_auxiliary_loss` path does, minus the zero-state layer.

    pixel_values: [B, 3, H, W] normalised; mask_labels: B float masks [n_b, H, W]; class_labels: B [n_b].
    """
    out = model.model(pixel_values, output_hidden_states=True)
    states = torch.stack(out.transformer_decoder_hidden_states[1:])        # [L, B, N, d]; [0] is the zero input
    classes = model.class_predictor(states)                                 # [L, B, N, K+1]
    masks = torch.einsum("lbqc,bchw->lbqhw", model.mask_embedder(states), out.pixel_decoder_last_hidden_state)
    aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
    losses = model.get_loss_dict(masks[-1], classes[-1], mask_labels, class_labels, aux)
    return model.get_loss(losses)


def criterion_loss(model: nn.Module, outputs: dict, mask_labels: list[Tensor], class_labels: list[Tensor]) -> float:
    """transformers' weighted total loss of given predictions in mfcore's layout (`pred_logits`,
    `pred_masks`, `aux_outputs`): the cross-check that both sides optimise the same objective."""
    aux = [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
           for a in outputs.get("aux_outputs", [])]
    losses = model.get_loss_dict(outputs["pred_masks"], outputs["pred_logits"], mask_labels, class_labels, aux)
    return float(model.get_loss(losses))


def semantic_predictor():
    """images [B,3,H,W] (normalised) -> label maps, through the model and the image processor's
    `post_process_semantic_segmentation` (what a transformers user runs)."""
    processor = _transformers().MaskFormerImageProcessor()

    def predict(model: nn.Module, pixel_values: Tensor) -> list[Tensor]:
        size = tuple(pixel_values.shape[-2:])
        return processor.post_process_semantic_segmentation(model(pixel_values),
                                                            target_sizes=[size] * len(pixel_values))
    return predict


def build_matcher() -> nn.Module:
    """`MaskFormerHungarianMatcher` with MaskFormer's costs (class 1, focal 20, dice 1)."""
    from transformers.models.maskformer.modeling_maskformer import (
        MaskFormerHungarianMatcher,
    )

    _transformers()
    return MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)


def version() -> str | None:
    return _transformers().__version__ if available() else None
