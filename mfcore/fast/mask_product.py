"""The mask product m = embed . E_pixel with E_pixel = mask_conv(y), computed in its cheapest order.

    masks[b, r, h, w] = sum_c embed[b, r, c] * E_pixel[b, c, h, w],   E_pixel = W * y + bias   (paper Sec. 3.3)

Both steps are linear, so embed . (W * y + bias) = (embed . W) * y + embed . bias: a conv whose R output
channels carry the embeddings applied to W. With a k x k conv from C to C_E channels that costs k^2 C R
multiply-adds per pixel instead of k^2 C C_E + C_E R. Three orders follow from it:

- inference (R = N = 100 rows, C = C_E = 256, k = 3): the folded conv, 2.7x fewer multiply-adds;
- training: the forward runs conv then product (R = L*N = 600 rows, all needed by the matcher), but only
  matched masks reach a loss, so all but r ~ 50 of an image's 600 rows of the gradient are exactly zero.
  The backward (`_SparseGradMaskProduct`) takes the live rows only and runs them through the folded conv:
  ~2 k^2 C r instead of 2 k^2 C C_E + 2 C_E R multiply-adds per pixel (R50 with 8 segments per image,
  r = 48: ~6x fewer), image by image;
- otherwise (autocast in training, small models): conv, then product, as `MaskProduct`.

Every order gives the same values and gradients up to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mfcore.modeling.models import MaskProduct

# The sparse backward loops over images in Python. Below this many multiply-adds per image in the conv's
# dense backward the loop's overhead outweighs what it saves: the tiny preset (64 channels, 16x16 masks,
# 9.4M) trains slower with it, 112 vs 103 ms per step; R50 at 256x256 (2.4G) 64 ms faster, 812 vs 877 ms.
SPARSE_BACKWARD_MIN_MACS = 10**8


def _folded_is_cheaper(rows: int, conv: nn.Conv2d) -> bool:
    """k^2 C R < k^2 C C_E + C_E R: multiply-adds per pixel of the folded conv vs conv then product."""
    k2c = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels
    return k2c * rows < k2c * conv.out_channels + conv.out_channels * rows


def mask_logits(embed: Tensor, pixel_features: Tensor, mask_conv: nn.Conv2d) -> Tensor:
    """embed: [B, R, C_E], pixel_features y: [B, C, h, w] -> mask logits [B, R, h, w] = embed . mask_conv(y)."""
    batch, rows, _ = embed.shape
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (embed, pixel_features, mask_conv.weight))
    if _folded_is_cheaper(rows, mask_conv):
        weight = torch.einsum("brc,cikl->brikl", embed, mask_conv.weight)           # [B, R, C, k, k]
        bias = embed @ mask_conv.bias if mask_conv.bias is not None else None      # [B, R]
        # one conv per image (each has its own weights); channels-last weights, like build_model's
        masks = [mask_conv._conv_forward(pixel_features[b:b + 1],
                                         weight[b].contiguous(memory_format=torch.channels_last),
                                         None if bias is None else bias[b]) for b in range(batch)]
        return masks[0] if batch == 1 else torch.cat(masks)
    device = embed.device.type
    conv_macs = mask_conv.weight[0].numel() * mask_conv.out_channels * pixel_features[0, 0].numel()
    # under autocast the saved tensors mix dtypes, and a meta tensor has no values to find live rows in
    if (needs_grad and conv_macs >= SPARSE_BACKWARD_MIN_MACS and device in ("cpu", "cuda")
            and not torch.is_autocast_enabled(device)):
        return _SparseGradMaskProduct.apply(embed, pixel_features, mask_conv.weight, mask_conv.bias, mask_conv)
    mask_features = mask_conv(pixel_features)                                      # [B, C_E, h, w]
    masks = torch.bmm(embed, mask_features.flatten(2))                            # [B, R, h*w]
    return masks.view(batch, rows, *mask_features.shape[-2:])


class FoldedMaskProduct(MaskProduct):
    """`MaskProduct` (the model's m = MLP(Q) . E_pixel) through `mask_logits`: same inputs and output,
    embed [L, B, N, C_E] -> [L, B, N, h, w]. Each image's L*N rows go together, so that each layer's masks
    are a view of the [B, L*N, h, w] result and their gradients come back in that very layout."""

    def forward(self, embed: Tensor, pixel_features: Tensor, mask_conv: nn.Conv2d) -> Tensor:
        layers, batch, queries, channels = embed.shape
        rows = embed.permute(1, 0, 2, 3).reshape(batch, layers * queries, channels)          # [B, L*N, C_E]
        return mask_logits(rows, pixel_features, mask_conv).unflatten(1, (layers, queries)).transpose(0, 1)


class _SparseGradMaskProduct(torch.autograd.Function):
    """Conv then product forward; a backward over the rows whose gradient is not all zero.

    For the r live rows G_r [r, h*w] of image b, with W_r = embed_r . W (the folded conv) and E_pixel saved:
        d embed_r = G_r E_pixel^T,   d y = conv_transpose(G_r, W_r),   d W = embed_r^T . dW_r,
        d bias = embed_r^T sum_pixels G_r,   with dW_r the folded conv's weight gradient,
    the conv's two backward products on r channels instead of C_E. An image with too many live rows for
    that to pay (e.g. PerPixelBaseline+, whose every query gets a per-pixel loss) takes the usual backward.
    """

    @staticmethod
    def forward(ctx, embed: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        mask_features = conv._conv_forward(y, weight, bias)                       # [B, C_E, h, w]
        masks = torch.bmm(embed, mask_features.flatten(2))
        ctx.save_for_backward(embed, y, weight, mask_features)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return masks.view(*embed.shape[:2], *mask_features.shape[-2:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        embed, y, weight, mask_features = ctx.saved_tensors
        conv = ctx.conv
        batch, rows, height, width = grad.shape
        grad = grad.reshape(batch, rows, height * width)
        live = grad.ne(0).any(-1)                                                 # [B, R]
        features = mask_features.flatten(2)                                       # [B, C_E, h*w]
        d_embed, d_y = torch.zeros_like(embed), torch.empty_like(y)
        d_weight = torch.zeros_like(weight)
        d_bias = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None

        def conv_backward(g: Tensor, b: int, w: Tensor) -> tuple[Tensor, Tensor]:
            """(d y[b], d w) of conv(y[b], w) given its output gradient g [C_out, h*w]."""
            g = g.view(1, -1, height, width).contiguous(memory_format=torch.channels_last)
            d_in, d_w, _ = torch.ops.aten.convolution_backward(
                g, y[b:b + 1], w, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
                [True, True, False])
            return d_in[0], d_w

        for b in range(batch):
            idx = live[b].nonzero().squeeze(1)
            if len(idx) == 0:  # no loss reached this image's masks
                d_y[b].zero_()
                continue
            g, e = grad[b, idx], embed[b, idx]                                    # [r, h*w], [r, C_E]
            d_embed[b, idx] = g @ features[b].t()
            if d_bias is not None:
                d_bias += e.t() @ g.sum(1)
            if _folded_is_cheaper(len(idx), conv):
                folded = torch.einsum("rc,cikl->rikl", e, weight).contiguous(memory_format=torch.channels_last)
                d_y[b], d_folded = conv_backward(g, b, folded)
                d_weight += torch.einsum("rc,rikl->cikl", e, d_folded)
            else:
                d_y[b], d_w = conv_backward(e.t() @ g, b, weight)                # E_pixel's gradient, then conv
                d_weight += d_w
        return d_embed, d_y, d_weight, d_bias, None
