"""Helpers shared by the multi-process tests (tests/support/ranks.py, tests/integrations/test_cuda.py and
tests/support/cuda_*_worker.py).

Two halves:

* the **parent side** (:func:`free_port`, :func:`rank_env`, :func:`run_procs`, :func:`remove_shm_buffers`, from the
  lab's launcher :mod:`ds_spngd_lab.ranks`): start worker processes in their own process groups, give every run a
  deadline and kill the whole process group of every worker when it passes (or as soon as one rank fails, so its
  peers cannot sit in a collective forever);
* the **worker side** (:func:`snapshot`, :func:`state_differences`, :func:`state_devices`, :func:`teardown`,
  :func:`strict_fp32`): read SP-NGD's state through its public attributes, compare two snapshots exactly and list
  where its tensors live.

Also the in-process helpers of the single-process tests: :func:`load_script` (a repository script such as train.py
as a module), :func:`spngd_one_step` and :func:`block_named`.

Workers are scripts (``python tests/support/cuda_x_worker.py``) that import this module as ``tests.support.harness``:
:func:`run_procs` puts the repository root on their ``PYTHONPATH``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

# the parent side is the lab's launcher (one for tests, benchmarks and the sweep); these names stay importable here
from ds_spngd_lab.ranks import ProcResult as ProcResult
from ds_spngd_lab.ranks import free_port as free_port
from ds_spngd_lab.ranks import rank_env as _lab_rank_env
from ds_spngd_lab.ranks import remove_shm_buffers as remove_shm_buffers
from ds_spngd_lab.ranks import run_procs as _lab_run_procs

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent


# ---- parent side ------------------------------------------------------------------------------------------------
def rank_env(rank: int, world: int, port: int, local_rank: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of one torch.distributed rank (:func:`ds_spngd_lab.ranks.rank_env`: env:// rendezvous on
    127.0.0.1:port, one intra-op thread) plus deterministic cuBLAS workspaces (:func:`strict_fp32`).

    ``local_rank`` defaults to ``rank``; the two-ranks-one-GPU test passes 0 for both so both use cuda:0.
    """
    return _lab_rank_env(rank, world, port, local_rank, **{"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **extra})


def run_procs(cmds: list[list[str]], envs: list[dict[str, str]], timeout_s: float, log_dir: Path,
              cwd: Path = ROOT) -> list[ProcResult]:
    """:func:`ds_spngd_lab.ranks.run_procs` (every process in its own process group, output in
    ``log_dir/proc<i>.log``, all killed when the deadline passes or one fails) from the repository root, with the
    repository root on every process's ``PYTHONPATH``: workers import ``tests.support.*``.

    Returns:
        One :class:`ProcResult` per command, in order.
    """
    with_root = []
    for env in envs:
        path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with_root.append({**env, "PYTHONPATH": path})
    return _lab_run_procs(cmds, with_root, timeout_s, log_dir, cwd=cwd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object a worker wrote, or None when it wrote none (crashed before)."""
    return json.loads(path.read_text()) if path.exists() else None


# ---- worker side ------------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def strict_fp32() -> None:
    """Full-precision fp32 matmuls/convolutions on CUDA (no TF32) and deterministic kernels where torch has them.

    TF32 (cuDNN's default for convolutions on Ampere+) rounds inputs to 10 mantissa bits: runs that split the batch
    differently would then differ by ~1e-3 instead of fp32 summation order (~1e-7), and the tolerances taken from
    tests/integrations/test_distributed.py would not apply. ``warn_only``: a kernel without a deterministic
    implementation warns instead of raising (tests that need bitwise results say so and allow for it).
    ``CUBLAS_WORKSPACE_CONFIG``
    (read by torch when a cuBLAS call is made, so this must run before the first matmul) makes cuBLAS deterministic;
    without it deterministic mode warns on every cuBLAS call.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(True, warn_only=True)


def teardown() -> None:
    """A worker's last act: tear the process group down, flush, and leave without interpreter finalization.

    Every result is written by then; gloo ranks sometimes abort while torch's objects are destroyed at interpreter
    exit ("terminate called without an active exception", SIGABRT — seen about once in a few hundred rank runs here
    even after destroy_process_group), which would fail a test whose work is done.
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _preconditioner(block: Any) -> list[torch.Tensor]:
    """This rank's preconditioner tensors of a block ([] where another rank holds them, mem_opt)."""
    if not getattr(block, "holds_preconditioner", True):
        return []
    try:
        return list(block.preconditioner_tensors())
    except RuntimeError:  # no preconditioner yet
        return []


def snapshot(spngd: Any, params: list[torch.Tensor]) -> dict[str, Any]:
    """A deep copy of SP-NGD's state on this rank and of ``params``: factor values and versions, preconditioners,
    the optimizer's per-parameter state (momentum), the step counter, and the parameters (fp32 copies)."""
    return {
        "params": [p.detach().float().clone() for p in params],
        "factors": {f.name: (None if f.value is None else f.value.detach().clone(), int(f.version))
                    for b in spngd.blocks for f in b.factors},
        "preconditioners": {b.name: [t.detach().clone() for t in _preconditioner(b)] for b in spngd.blocks},
        "state": [copy.deepcopy(v) for v in spngd.state.values()],
        "steps": int(spngd.steps),
    }


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Exact equality of values (tensors on different devices are compared on the CPU; devices are checked by
    :func:`state_devices`)."""
    if a is None or b is None:
        return a is None and b is None
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def state_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two :func:`snapshot` results differ (exact comparison, ``torch.equal``); [] when identical."""
    out = []
    if a["steps"] != b["steps"]:
        out.append(f"steps {a['steps']} -> {b['steps']}")
    out += [f"parameter {i}" for i, (x, y) in enumerate(zip(a["params"], b["params"], strict=True)) if not _same(x, y)]
    for name, (va, vera) in a["factors"].items():
        vb, verb = b["factors"][name]
        if vera != verb:
            out.append(f"factor {name} version {vera} -> {verb}")
        if not _same(va, vb):
            out.append(f"factor {name} value")
    for name, ta in a["preconditioners"].items():
        tb = b["preconditioners"][name]
        if len(ta) != len(tb) or not all(_same(x, y) for x, y in zip(ta, tb, strict=True)):
            out.append(f"preconditioner {name}")
    if len(a["state"]) != len(b["state"]):
        out.append(f"optimizer state entries {len(a['state'])} -> {len(b['state'])}")
    else:
        for i, (sa, sb) in enumerate(zip(a["state"], b["state"], strict=True)):
            for key in sorted(set(sa) | set(sb)):
                x, y = sa.get(key), sb.get(key)
                if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                    if not _same(x, y):
                        out.append(f"optimizer state[{i}][{key}]")
                elif x != y:
                    out.append(f"optimizer state[{i}][{key}] {x!r} -> {y!r}")
    return out


def state_devices(spngd: Any) -> dict[str, list[str]]:
    """Device types of SP-NGD's tensors on this rank, per kind: ``{"factors": [...], "preconditioners": [...],
    "momentum": [...]}`` with one ``"<name>: <device type>"`` entry per tensor held here."""
    out: dict[str, list[str]] = {"factors": [], "preconditioners": [], "momentum": []}
    for b in spngd.blocks:
        for f in b.factors:
            if f.value is not None:
                out["factors"].append(f"{f.name}: {f.value.device.type}")
        for k, t in enumerate(_preconditioner(b)):
            out["preconditioners"].append(f"{b.name}[{k}]: {t.device.type}")
    for i, st in enumerate(spngd.state.values()):
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                out["momentum"].append(f"state[{i}][{key}]: {v.device.type}")
    return out


# ---- in-process helpers -------------------------------------------------------------------------------------------
def load_script(filename: str = "train.py", module_name: str = "ds_spngd_train_script") -> ModuleType:
    """The repository's script ``filename`` loaded unchanged as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spngd_one_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], damping: float,
                   seed: int | None = None, **cfg: object) -> tuple[Any, dict[str, torch.Tensor],
                                                                   dict[str, torch.Tensor]]:
    """One single-process SP-NGD step with lr 1, momentum 0 and factor_decay 0 (``cfg`` overrides any key) on the
    loss ``loss_fn(model)``: (optimizer, parameters before, parameters after). ``seed`` seeds torch right before the
    forward pass (the MC Fisher draws its labels right after it)."""
    from ds_spngd import SPNGD

    opt = SPNGD(model.parameters(), model=model, config={"lr": 1.0, "momentum": 0.0, "damping": damping,
                                                         "factor_decay": 0.0, **cfg})
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    opt.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    loss_fn(model).backward()
    opt.step()
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    return opt, before, after


def block_named(opt: Any, name: str) -> Any:
    """The Fisher block of ``opt`` named ``name`` (StopIteration when there is none)."""
    return next(b for b in opt.blocks if b.name == name)
