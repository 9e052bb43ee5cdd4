"""Memory and speed switches: gradient checkpointing of the backbone, TF32."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mfcore import fast
from mfcore.config import ModelConfig
from mfcore.modeling.backbones import build_backbone
from mfcore.modeling.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_HEAD = dict(num_classes=5, num_queries=4, conv_dim=32, mask_dim=32, hidden_dim=32, nheads=2,
                  dim_feedforward=64, dec_layers=2, gn_groups=8, dropout=0.0)


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of module(x)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


@pytest.mark.parametrize("backbone", ["r50", "swin-t"])
def test_grad_checkpointing_gives_the_same_gradients_with_less_memory(backbone):
    images = torch.rand(2, 3, 64, 64) * 255
    grads, saved = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = fast.accelerate(build_model(ModelConfig(backbone=backbone, grad_checkpointing=on, **SMALL_HEAD)))
        model.train()
        out = model(images)
        (out["pred_logits"].square().mean() + out["pred_masks"].sigmoid().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        saved.append(_saved_bytes(model.backbone, images / 255))
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("backbone.") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved[1] < saved[0] / 2  # only the blocks' inputs are kept


def test_grad_checkpointing_is_refused_for_the_small_backbones():
    with pytest.raises(ValueError, match="grad_checkpointing is available for the backbones r50, .*not 'tiny'"):
        build_backbone("tiny", grad_checkpointing=True)


def test_tf32_is_on_by_default_only_on_cuda_of_compute_capability_8(monkeypatch):
    from mfcore.config import TrainConfig
    from mfcore.training.runtime import set_tf32

    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    assert TrainConfig().tf32 is True
    assert set_tf32(True, torch.device("cpu")) is False and [f.allow_tf32 for f in flags] == before  # a no-op
    try:
        for capability, expected in (((7, 5), before), ((8, 0), [True, True]), ((9, 0), [True, True])):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
            assert set_tf32(True, torch.device("cuda", 0)) is (capability >= (8, 0))
            assert [f.allow_tf32 for f in flags] == expected, capability
        assert set_tf32(False, torch.device("cuda", 0)) is False and [f.allow_tf32 for f in flags] == [False, False]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_train_compiled_matches_eager(tmp_path):
    from mfcore.data import make_synthetic
    from mfcore.training.checkpoint import load_checkpoint
    from mfcore.training.train import train

    root = tmp_path / "data"
    make_synthetic(root, num_classes=4, num_train=4, num_val=1, image_size=32, workers=1)
    fast_run = dict(crop_size=(32, 32), short_sides=(32,), max_size=64, test_short_side=32, batch_size=2,
                    num_workers=0, iters=2)
    graphs = []

    def eager_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)  # what backend="eager" does, and a record that the model went through dynamo
        return graph.forward

    weights = []
    for name, options in (("eager", None), ("compiled", {"backend": eager_backend})):
        train("synthetic-maskformer-tiny", tmp_path / name, root, train_overrides=fast_run, progress="off",
              device="cpu", compile_options=options)
        weights.append(load_checkpoint(tmp_path / name / "last.pt")["model"])
    assert graphs and not any(k.startswith("_orig_mod.") for k in weights[1])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("flag, expected", [([], None), (["--compile"], {"mode": "default"}),
                                            (["--compile", "max-autotune"], {"mode": "max-autotune"})])
def test_train_compile_flag(flag, expected, monkeypatch):
    import mfcore.training.train as train_module
    from mfcore.cli import main

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: seen.update(kwargs) or
                        {"eval": None, "status": "finished"})
    main(["train", "--preset", "synthetic-maskformer-tiny", "--output", "unused", "--progress", "off", *flag])
    assert seen["compile_options"] == expected


_PAGE_FAULTS = """
import resource, sys, torch
from mfcore.training.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def step():  # four 16 MB activations (PP+'s logits at K = 64), touched, then all freed, as in a training step
    blocks = [torch.empty(4 << 20).fill_(1.0) for _ in range(4)]

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_reuses_a_freed_activation_without_new_page_faults():
    """Without it the freed blocks go back to the system and every step maps them anew (4096 page faults per
    16 MB at 4 KB pages)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert 2 * faults["keep"] < faults["default"], faults  # measured: 4-8k in all vs 20-37k
