"""benchmarks/step_time.py on CPU at tiny sizes: the gpt2-small path (Hugging Face GPT-2, spngd_gpt.json vs AdamW)
runs end to end and prints its tables, and its LM loss is next-token cross-entropy over every position."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.support.harness import ROOT

TINY_GPT = ["--model", "gpt2-small", "--vocab", "64", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
            "--context", "8", "--batch", "2", "--repeats", "1", "--window-steps", "3"]


def test_gpt2_small_path_runs_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/step_time.py", *TINY_GPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "model=gpt2-small" in out and "baseline=adamw" in out and "config=ds_configs/spngd_gpt.json" in out
    assert "tokens=2x8 vocab=64 layers=1 width=16 heads=2" in out
    params = json.loads((ROOT / "ds_configs" / "spngd_gpt.json").read_text())["optimizer"]["params"]
    period = math.lcm(params["factor_update_steps"], params["inv_update_steps"])
    assert f"window={period} steps" in out  # one refresh period of spngd_gpt.json
    rows = [line.split() for line in out.splitlines() if line.startswith(("amortized", "AdamW"))]
    assert len(rows) == 2 and all(math.isfinite(float(v)) and float(v) > 0 for r in rows for v in r[-3:])


def test_lm_loss_is_next_token_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("ds_spngd_step_time_script", ROOT / "benchmarks" / "step_time.py")
    assert spec is not None and spec.loader is not None
    step_time = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, step_time)  # its dataclass looks its module up there
    spec.loader.exec_module(step_time)
    vocab = 5
    logits = torch.randn(2, 3, vocab)

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits

    y = torch.randint(0, vocab, (2, 3))
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, vocab), y.reshape(6))
    assert step_time.lm_loss(Fixed(), torch.zeros(2, 3, dtype=torch.long), y).item() == pytest.approx(expected.item())
