"""The cheaper step (issue 16): the same flags and layouts as before, and no host → device uploads in a step.

* :func:`ds_spngd.comm.agreement.max_abs` (the NaN/Inf checks' max-abs norm, aminmax off CUDA) equals
  ``torch._foreach_norm(·, inf)`` bit for bit, NaN/Inf included;
* :func:`ds_spngd.comm.fragments.layout_from` (where ZeRO's partitions put each parameter, for the all-gather of
  the gradients) finds the ranges of the parameters that are contiguous across ranks and only those;
* a steady-state SP-NGD step, plain or refresh + inversion, builds no tensor from a Python list on the device and
  indexes no tensor with a Python list (each an upload, a stream sync on CUDA) from ds_spngd's own files.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ds_spngd import SPNGD
from ds_spngd.comm.agreement import max_abs
from ds_spngd.comm.fragments import layout_from
from ds_spngd.comm.packing import pack_symmetric, unpack_symmetric

NAN, INF = float("nan"), float("inf")


def test_max_abs_is_the_infinity_norm_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(1000, generator=gen), -torch.rand(7, 5, generator=gen), torch.tensor([0.0, -0.0]),
          torch.tensor([1.0, NAN, -3.0]), torch.tensor([-INF, 2.0]), torch.tensor([INF]),
          torch.randn(33, generator=gen).bfloat16(), torch.tensor([3e38, -3.4e38]), torch.tensor([-5.0])]
    got = max_abs(ts)
    want = torch._foreach_norm(ts, float("inf"))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape == ()
        assert torch.equal(g, w) or (bool(g.isnan()) and bool(w.isnan())), (g, w)
        assert not torch.signbit(g)  # +0.0 for an all-zero tensor, as the norm
    assert max_abs([]) == []


def test_pack_and_unpack_share_indices_within_a_call_and_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    mats = []
    for b, d in [(1, 6), (3, 2), (1, 6), (4, 1), (1, 6)]:
        x = torch.randn(b, d, d, generator=gen)
        mats.append(x + x.transpose(1, 2))
    flat = pack_symmetric(mats)
    back = unpack_symmetric(flat, [(m.shape[0], m.shape[-1]) for m in mats])
    assert all(torch.equal(a, m) for a, m in zip(back, mats, strict=True))


def test_layout_of_partitions_keeps_contiguous_parameters_only() -> None:
    # two ranks, partitions of 10: p0 = flat[0:4], p1 = flat[4:16] (crosses the boundary), p2 = flat[16:20]
    rank0 = ([10], {"p0": (0, 0, 0, 4), "p1": (0, 4, 0, 6)})
    rank1 = ([10], {"p1": (0, 0, 6, 6), "p2": (0, 6, 0, 4)})
    numels = {"p0": 4, "p1": 12, "p2": 4}
    layout = layout_from([rank0, rank1], numels)
    assert layout is not None and layout.sizes == (10,)
    assert layout.offsets == {"p0": (0, 0), "p1": (0, 4), "p2": (0, 16)}
    gathered = torch.arange(20.0)
    assert torch.equal(gathered.narrow(0, 4, 12), torch.arange(4.0, 16.0))
    # p1's second piece somewhere else (not one range), a missing piece, a piece short: left out
    assert set(layout_from([rank0, ([10], {"p1": (0, 1, 6, 6), "p2": (0, 6, 0, 4)})], numels).offsets) == {"p0", "p2"}
    assert set(layout_from([rank0, ([10], {"p2": (0, 6, 0, 4)})], numels).offsets) == {"p0", "p2"}
    short = layout_from([rank0, ([10], {"p1": (0, 0, 6, 5), "p2": (0, 6, 0, 4)})], numels)
    assert short is not None and set(short.offsets) == {"p0", "p2"}
    # partitions of different lengths: no all-gather of equal pieces
    assert layout_from([rank0, ([11], {"p2": (0, 6, 0, 4)})], numels) is None


class UploadCounter(TorchFunctionMode):
    """Counts, per ds_spngd file:line, tensors built from Python lists on a device and Python-list indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        upload = (name in ("tensor", "as_tensor") and "device" in kwargs and isinstance(args[0], (list, tuple))) or (
            name in ("__getitem__", "__setitem__", "index_put_") and len(args) > 1 and isinstance(args[1], list))
        if upload:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None and "/ds_spngd/" in frame.f_code.co_filename:
                self.calls[f"{frame.f_code.co_filename.split('/ds_spngd/')[-1]}:{frame.f_lineno}"] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_steady_steps_upload_nothing_from_python_lists(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = SPNGD(model.parameters(), model=model, config={
        "lr": 0.1, "factor_update_steps": 2, "inv_update_steps": 2, "kl_clip": 0.01, "weight_rescale": True,
        "weight_decay": 1e-4, "inverse_method": method})
    gen = torch.Generator().manual_seed(1)
    counter = UploadCounter()
    for step in range(8):  # steps 4-7: two refresh + inversion steps and two plain ones, after the first uses
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        with counter if step >= 4 else contextlib.nullcontext():  # hooks, then the step
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert opt.steps == 8
    assert not counter.calls, dict(counter.calls)
