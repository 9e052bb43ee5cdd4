"""mfcore.fast.attention: the same attention as nn.MultiheadAttention (its parameters taken over), and a dropout with PyTorch's statistics."""
import pytest
import torch
from torch import nn

from mfcore.fast.attention import Dropout, MultiheadAttention, dropout


def test_attention_takes_over_torch_parameters_and_outputs():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
    ours = MultiheadAttention(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())  # checkpoints load either way
    assert all(a is b for a, b in zip(ours.parameters(), ref.parameters(), strict=True))  # the same tensors
    query, memory = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    ref.eval(), ours.eval()
    out, weights = ours(query, memory, memory)
    assert weights is None
    torch.testing.assert_close(out, ref(query, memory, memory, need_weights=False)[0])
    ref.train(), ours.train()
    # the explicit training path, softmax(QK^T / sqrt(d_h)) V, with a p so small that no weight is dropped
    ref.dropout, ours.dropout = 0.0, 1e-12
    torch.testing.assert_close(ours(query, memory, memory)[0], ref(query, memory, memory, need_weights=False)[0])
    with pytest.raises(ValueError, match="need_weights"):
        ours(query, memory, memory, need_weights=True)


def test_attention_dropout_acts_on_the_weights_in_training_only():
    torch.manual_seed(0)
    attn = MultiheadAttention(nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True))
    query = torch.randn(1, 4, 16)
    attn.eval()
    assert torch.equal(attn(query, query, query)[0], attn(query, query, query)[0])
    attn.train()
    assert not torch.equal(attn(query, query, query)[0], attn(query, query, query)[0])


def test_dropout_keeps_one_minus_p_and_scales():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    # 1M Bernoulli(0.9) draws: standard deviation of the kept fraction 3e-4
    assert kept.float().mean().item() == pytest.approx(0.9, abs=1.5e-3)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same scaled mask
    # kept elements are independent of position: both halves keep ~90%
    assert kept[:500].float().mean().item() == pytest.approx(kept[500:].float().mean().item(), abs=3e-3)


def test_dropout_follows_the_seed_and_the_mode():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(1)
    a = dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3), a)
    assert not torch.equal(dropout(x, 0.3), a)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.3).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="1.5"):
        Dropout(1.5)
