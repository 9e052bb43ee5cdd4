"""What CUDA graphs need from the eval forward (`python -m mfcore bench --device cuda --compile reduce-overhead`):
one graph for torch.compile, and no tensor made on the host, which would keep the graph off the GPU.
Both are checked on CPU: the tracing runs no kernels, the device check runs on meta tensors."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_steps import R50
from mfcore.modeling.models import build_model


class HostTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in (out if isinstance(out, (tuple, list))
                                                                               else [out])):
            self.ops.append(func.overloadpacket.__name__)
        return out


def test_r50_eval_forward_is_one_graph():
    torch.manual_seed(0)
    model = build_model(R50).eval()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(torch.rand(1, 3, 64, 64) * 255)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_r50_eval_forward_makes_no_host_tensors():
    with torch.device("meta"):
        model = build_model(R50).eval()
    with torch.inference_mode(), HostTensors() as host:
        out = model(torch.empty(1, 3, 64, 64, device="meta"))
    assert out["pred_masks"].device.type == "meta" and host.ops == []
