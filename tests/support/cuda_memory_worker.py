"""SP-NGD's memory accounting against the CUDA caching allocator (used by tests/integrations/test_cuda.py).

Run as ``python tests/support/cuda_memory_worker.py RESULT_JSON [--device cuda|cpu]`` (one process, no process
group, SP-NGD used directly as a torch optimizer; ``--device cpu`` is a dry run that skips the allocator figures).

Accounting, in the order the worker measures:

1. the model (an MLP 1024 → 1024 → 1024 → 10: its K-FAC factors are 1025² and 1024², so curvature state outweighs
   the 2.1 M parameters) and one fixed batch go to the GPU; one plain forward + backward allocates every ``.grad``,
   whose storage is kept from then on (``zero_grad(set_to_none=False)``); activations are freed with the graph.
   Each linear-algebra kernel SP-NGD uses is then run once on throw-away tensors (:func:`warm_up_libraries`), so
   ``base = memory_allocated()`` counts parameters, gradients, the batch and the cuBLAS/cuBLASLt workspaces —
   everything that is not SP-NGD's. The peak counter is reset here.
2. SP-NGD is built and steps ``STEPS`` times (factors every step, inverses every step, so ≥ 1 inversion).
3. ``after = memory_allocated()`` once the last step's graph is gone; ``peak = max_memory_allocated()``.

Everything ``memory_usage()`` counts was allocated after ``base``, so its total must fit in ``peak − base`` (a
stronger form of "total ≤ max_memory_allocated()"), and ``after − base`` is exactly what SP-NGD keeps between steps:
the persistent categories (factors + preconditioners + momentum) plus whatever transient buffers it still holds
(``accumulators``, ``comm_buffers``, both reported by ``memory_usage``), plus anything it holds without reporting it.
RESULT_JSON: ``{"base", "after", "peak", "usage", "plan", "n_tensors", "model_bytes" (parameters + gradients),
"steps"}`` (bytes).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from ds_spngd import SPNGD
from ds_spngd_lab.models import MLP
from tests.support.harness import write_json

STEPS, BATCH, WIDTH = 3, 256, 1024


def state_tensor_count(opt: Any) -> int:
    """How many tensors SP-NGD's persistent state consists of (one allocation each: the allocator-rounding bound)."""
    n = sum(1 for b in opt.blocks for f in b.factors if f.value is not None)
    n += sum(len(b.preconditioner_tensors()) for b in opt.blocks if b.holds_preconditioner)
    n += sum(1 for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return n


def warm_up_libraries(device: torch.device) -> None:
    """Run once each kind of linear algebra SP-NGD's step uses (matmuls, addmm_/baddbmm_, Cholesky and its inverse,
    eigh), on throw-away tensors: cuBLAS / cuBLASLt keep a per-handle workspace from the caching allocator after
    their first call, and that one-time allocation belongs to the baseline, not to SP-NGD's state."""
    a = torch.randn(64, 64, device=device)
    s = a @ a.t() + 64 * torch.eye(64, device=device)
    s.clone().addmm_(a.t(), a, alpha=0.5)
    torch.baddbmm(s.unsqueeze(0), a.unsqueeze(0), a.unsqueeze(0).transpose(1, 2))
    chol, _ = torch.linalg.cholesky_ex(s)
    torch.cholesky_inverse(chol)
    torch.linalg.eigh(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MLP(in_features=WIDTH, hidden=WIDTH, num_classes=10).to(device)
    x = torch.randn(BATCH, WIDTH, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    F.cross_entropy(model(x), y).backward()  # allocates every .grad: model + grads are the baseline
    model.zero_grad(set_to_none=False)
    warm_up_libraries(device)
    base = 0
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    opt = SPNGD(model.parameters(), model=model, config={
        "lr": 0.05, "momentum": 0.9, "damping": 1e-2, "factor_decay": 0.9, "factor_update_steps": 1,
        "inv_update_steps": 1, "inverse_method": "inverse"})
    for _ in range(STEPS):
        model.zero_grad(set_to_none=False)  # keep the gradients' storage: it belongs to the baseline
        F.cross_entropy(model(x), y).backward()
        opt.step()
    record: dict[str, Any] = {"steps": opt.steps, "usage": opt.memory_usage(), "plan": opt.memory_plan(),
                              "n_tensors": state_tensor_count(opt), "device": args.device,
                              "model_bytes": 2 * sum(p.numel() * p.element_size() for p in model.parameters())}
    if cuda:
        torch.cuda.synchronize()
        record.update(base=base, after=torch.cuda.memory_allocated(), peak=torch.cuda.max_memory_allocated())
    write_json(args.result, record)


if __name__ == "__main__":
    main()
