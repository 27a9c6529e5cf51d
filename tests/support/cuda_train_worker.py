"""Run train.py's ``main`` unchanged, with ``ds_spngd.initialize`` wrapped to observe the engine and, optionally, to
inject one fp16 overflow (used by tests/integrations/test_cuda.py; train.py gains no flag for it).

Run as::

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/support/cuda_train_worker.py RESULT_JSON OVERFLOW_STEP -- <train.py arguments>

``OVERFLOW_STEP`` k ≥ 0: on the k-th optimizer step (0-based, counting every call of train.py's loop, skipped or
not) the wrapped ``engine.backward`` multiplies the loss it is given by 1e8 (in fp32) before DeepSpeed scales it.
The fp16 gradients overflow to Inf, while train.py keeps the unscaled loss it computed, so the loss it reports stays
finite. -1: no injection. Before that step's backward the SP-NGD state is snapshotted (tests/support/harness.py) and
after its ``engine.step`` compared exactly.

RESULT_JSON receives ``{"steps_run", "spngd_steps", "skipped_steps", "injected": null | {"step",
"skipped_before", "skipped_after", "refresh_step" (SP-NGD was collecting factors on that step), "differences":
[...]}, "devices": {...}, "engine_device", "backend"}``; it is written before the process-group teardown, and also when
train.py raises, so a crash cannot hide what was seen.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

import ds_spngd
from tests.support.harness import load_script, snapshot, state_devices, state_differences, teardown, write_json

OVERFLOW_FACTOR = 1e8  # × loss scale 2^12 ≈ 4e11: finite in fp32, far above fp16's 65504 in every gradient


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    result_path, overflow_step, train_args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    train = load_script()  # the repository's reference script, loaded unchanged

    record: dict[str, Any] = {"steps_run": 0, "spngd_steps": None, "skipped_steps": None, "injected": None,
                              "devices": None}
    engines: list[Any] = []
    original_initialize = ds_spngd.initialize

    def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        out = original_initialize(*args, **kwargs)
        engine = out[0]
        spngd = ds_spngd.get_spngd(engine)
        if spngd is None:
            raise RuntimeError("the config did not select SP-NGD")
        engines.append(engine)
        gas = engine.gradient_accumulation_steps()
        counter = {"micro": 0}
        pending: dict[str, Any] = {}
        backward, step = engine.backward, engine.step

        def params() -> list[torch.Tensor]:
            flat = [p for g in spngd.param_groups for p in g["params"]]  # fp32 master weights / ZeRO partition
            return list(engine.module.parameters()) + flat

        def wrapped_backward(loss: torch.Tensor, *a: Any, **k: Any) -> Any:
            opt_step, micro = divmod(counter["micro"], gas)
            if opt_step == overflow_step:
                if micro == 0:
                    pending["before"] = snapshot(spngd, params())
                    pending["skipped_before"] = int(engine.skipped_steps)
                    pending["refresh"] = spngd.steps % spngd.cfg.factor_update_steps == 0
                loss = loss.float() * OVERFLOW_FACTOR
            counter["micro"] += 1
            return backward(loss, *a, **k)

        def wrapped_step(*a: Any, **k: Any) -> Any:
            boundary = engine.is_gradient_accumulation_boundary()
            out = step(*a, **k)
            if boundary:
                record["steps_run"] += 1
                if "before" in pending:
                    after = snapshot(spngd, params())
                    record["injected"] = {"step": overflow_step, "skipped_before": pending["skipped_before"],
                                          "skipped_after": int(engine.skipped_steps),
                                          "refresh_step": pending.pop("refresh"),
                                          "differences": state_differences(pending.pop("before"), after)}
            return out

        engine.backward, engine.step = wrapped_backward, wrapped_step
        return out

    ds_spngd.initialize = initialize
    try:
        train.main(train_args)
    finally:
        if engines:
            spngd = ds_spngd.get_spngd(engines[0])
            assert spngd is not None
            record.update(spngd_steps=int(spngd.steps), skipped_steps=int(engines[0].skipped_steps),
                          devices=state_devices(spngd), engine_device=str(engines[0].device),
                          backend=str(dist.get_backend()) if dist.is_initialized() else None)
        write_json(result_path, record)
    teardown()


if __name__ == "__main__":
    main()
