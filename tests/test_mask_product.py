"""mfcore.fast.mask_product: every order (folded conv, sparse-gradient training product, conv then product)
gives the core's embed . conv(y) and its gradients, in float64."""
import copy

import pytest
import torch

from mfcore.fast import mask_product
from mfcore.fast.mask_product import FoldedMaskProduct, mask_logits
from mfcore.modeling.models import MaskProduct, build_model


def _case(rows, bias, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=bias).double()
    y = torch.randn(2, 16, 8, 12, dtype=torch.float64, requires_grad=True)
    embed = torch.randn(2, rows, 16, dtype=torch.float64, requires_grad=True)
    return conv, y, embed


@pytest.mark.parametrize("rows, bias", [(3, True), (17, False), (18, True), (40, False)])
def test_folded_mask_product_equals_conv_then_product(rows, bias):
    """Without gradients the embeddings are folded into a 3x3 conv with 16 channels when that is cheaper,
    for R < 18 rows (9*16*R < 9*16*16 + 16*R), not from 18 on; every order gives embed . conv(y)."""
    conv, y, embed = _case(rows, bias)
    with torch.no_grad():
        expected = torch.einsum("brc,bchw->brhw", embed, conv(y))
        calls = []
        conv.register_forward_hook(lambda *args: calls.append(1))
        torch.testing.assert_close(mask_logits(embed, y, conv), expected)
        # as the model's [L, B, N, C_E]: two layers of rows / 2 queries, or one layer
        layers = embed.view(2, 2, rows // 2, 16).transpose(0, 1) if rows % 2 == 0 else embed[None]
        torch.testing.assert_close(FoldedMaskProduct()(layers, y, conv), MaskProduct()(layers, y, conv))
    assert len(calls) == (1 if rows < 18 else 3)  # the folded path calls no conv module


def _uses_sparse_backward(masks):
    """Is _SparseGradMaskProduct among the first autograd nodes behind `masks`?"""
    nodes, names = [masks.grad_fn], set()
    for _ in range(4):
        names.update(type(n).__name__ for n in nodes)
        nodes = [nxt for n in nodes for nxt, _ in n.next_functions if nxt is not None]
    return any("SparseGrad" in name for name in names)


@pytest.fixture
def sparse_for_small_convs(monkeypatch):
    """These cases are far below the size from which the sparse backward is used: lower the bar."""
    monkeypatch.setattr(mask_product, "SPARSE_BACKWARD_MIN_MACS", 0)


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_gradient_backward_equals_autograd(bias, sparse_for_small_convs):
    """Training order: rows without gradient are skipped. Image 0 has 5 live rows of 40 (folded backward),
    image 1 has 30 (too many to fold: the usual backward), and an image without any is covered below."""
    conv, y, embed = _case(40, bias)
    grad = torch.randn(2, 40, 8, 12, dtype=torch.float64)
    grad[0, 5:] = 0
    grad[1, 30:] = 0
    params = [embed, y, conv.weight] + ([conv.bias] if bias else [])
    expected = torch.autograd.grad(torch.einsum("brc,bchw->brhw", embed, conv(y)), params, grad)
    masks = mask_logits(embed, y, conv)
    assert _uses_sparse_backward(masks)
    for got, want in zip(torch.autograd.grad(masks, params, grad), expected):
        torch.testing.assert_close(got, want)


def test_sparse_gradient_backward_with_an_image_without_loss(sparse_for_small_convs):
    conv, y, embed = _case(40, True, seed=1)
    grad = torch.zeros(2, 40, 8, 12, dtype=torch.float64)
    grad[1, 7] = 1.0
    params = [embed, y, conv.weight, conv.bias]
    expected = torch.autograd.grad(torch.einsum("brc,bchw->brhw", embed, conv(y)), params, grad)
    masks = mask_logits(embed, y, conv)
    assert _uses_sparse_backward(masks)
    for got, want in zip(torch.autograd.grad(masks, params, grad), expected):
        torch.testing.assert_close(got, want)


def test_small_models_train_with_the_usual_backward():
    """Below SPARSE_BACKWARD_MIN_MACS (the tiny preset's mask conv: 9.4M per image) no custom backward."""
    model = build_model("synthetic-maskformer-tiny").train()
    model.predictor.mask_product = FoldedMaskProduct()
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert not _uses_sparse_backward(out["pred_masks"])


def test_r50_orders_agree_at_inference_and_in_training():
    """R50 at inference (100 rows) folds; in training (600 rows) conv then product with the sparse backward.
    Masks, and the gradients of a loss on a few masks, equal those of the core's conv then product;
    in float64, so that float32 rounding cannot hide a wrong term. (Its mask conv at 16x16: 151M
    multiply-adds per image, above SPARSE_BACKWARD_MIN_MACS.) Dropout off: the two sides draw differently."""
    torch.manual_seed(0)
    plain = build_model("ade20k-maskformer-r50", num_classes=8, dropout=0.0).double()
    folded = copy.deepcopy(plain)
    folded.predictor.mask_product = FoldedMaskProduct()
    images = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 255
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(images)["pred_masks"], plain.eval()(images)["pred_masks"])
    grads = []
    for model in (folded.train(), plain.train()):
        params = [model.pixel_decoder.mask_features.weight, model.pixel_decoder.mask_features.bias,
                  model.predictor.mask_embed.layers[0].weight, model.pixel_decoder.layer_1[0].weight]
        out = model(images)
        assert _uses_sparse_backward(out["pred_masks"]) == (model is folded)
        loss = out["pred_masks"][0, [3, 50]].sigmoid().sum() + out["aux_outputs"][2]["pred_masks"][0, 7].sum()
        grads.append(torch.autograd.grad(loss, params))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
