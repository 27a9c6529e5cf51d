"""End-to-end: ``deepspeed --num_gpus 2 train_lm.py`` with the shipped GPT configs (slow; marker ``launcher``).

Each model runs AdamW and SP-NGD (``ds_configs/adamw_gpt.json`` / ``spngd_gpt.json``: ZeRO-2 + bf16) for three steps
on a tiny synthetic corpus (BPE vocabulary 300, so no installed corpus is needed) and checks ``result.json`` /
``steps.csv``; both optimizers must see the same first batch (equal step-1 losses from the same initial weights).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.harness import free_port, remove_shm_buffers, run_procs

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["thou", "art", "the", "king", "of", "all", "my", "lord", "sweet", "night", "love", "death", "fair", "sir"]


def _deepspeed() -> str:
    found = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(found).exists():
        pytest.skip("the deepspeed launcher is not installed")
    return found


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for k in range(3):
        lines = [" ".join(WORDS[(7 * i + 3 * j + k) % len(WORDS)] for j in range(6)).capitalize() + "."
                 for i in range(300)]  # fmt: skip
        (root / f"text{k}.txt").write_text("\n".join(lines) + "\n")
    return root


def _run(config: str, model: str, tmp_path: Path, corpus: Path) -> tuple[dict, list[str]]:
    out = tmp_path / f"{config}_{model}"
    port = free_port()
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(port), "train_lm.py",
           "--deepspeed_config", str(ROOT / "ds_configs" / f"{config}.json"), "--model", model,
           "--tokenizer", "bpe", "--vocab", "300", "--context", "16", "--n-layer", "1", "--n-head", "2",
           "--n-embd", "32", "--global-batch", "8", "--max-steps", "3", "--eval-interval", "2",
           "--eval-windows", "16", "--corpus-dir", str(corpus), "--cache-dir", str(tmp_path / "cache"),
           "--out-dir", str(out)]  # fmt: skip
    try:
        (res,) = run_procs([cmd], [dict(os.environ)], 300.0, tmp_path / f"logs_{config}_{model}", cwd=ROOT)
    finally:
        remove_shm_buffers(port)
    assert res.returncode == 0, f"launcher {res.status()}:\n{res.tail(8000)}"
    assert "validation loss" in res.log  # the result table
    return json.loads((out / "result.json").read_text()), (out / "steps.csv").read_text().splitlines()


@pytest.mark.launcher
@pytest.mark.parametrize("model", ["gpt", "hf-gpt2"])
def test_train_lm_adamw_and_spngd_on_two_ranks(model: str, tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    if model == "hf-gpt2":
        pytest.importorskip("transformers")
    corpus = _corpus(tmp_path / "corpus")
    first_losses = {}
    for config, optimizer in (("adamw_gpt", "AdamW"), ("spngd_gpt", "SPNGD")):
        result, rows = _run(config, model, tmp_path, corpus)
        assert result["optimizer"] == optimizer and result["model"] == model
        assert result["steps"] == 3 and result["world_size"] == 2 and result["global_batch"] == 8
        assert result["dtype"] == "bf16" and result["zero_stage"] == 2 and result["vocab"] <= 300
        assert result["tokens"] == 3 * 8 * 16
        assert [e[0] for e in result["evals"]] == [0, 2, 3]
        assert all(math.isfinite(e[2]) for e in result["evals"]) and result["val_loss"] == result["evals"][-1][2]
        assert math.isfinite(result["final_loss"]) and result["median_step_s"] > 0
        assert len(result["peak_rss_mib"]) == 2 and min(result["peak_rss_mib"]) > 50
        assert len(result["step_times_s"]) == 3
        assert rows[0] == "step,samples,loss,lr,wall_time_s" and len(rows) == 4 and rows[-1].startswith("3,24,")
        first_losses[config] = rows[1].split(",")[2]
    assert first_losses["adamw_gpt"] == first_losses["spngd_gpt"]  # same initial weights, same first batch
