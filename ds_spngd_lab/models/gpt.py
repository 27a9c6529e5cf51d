"""Decoder-only language models for the real-text race: Hugging Face GPT-2 and a plain-PyTorch GPT (nanoGPT style).

Both map int64 token ids ``(N, T)`` to logits ``(N, T, V)`` (the Hugging Face model returns them as ``.logits`` of its
output; :func:`lm_logits` reads either). The loss is computed outside the model, mean over tokens::

    loss = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), ignore_index=-100)

* :func:`build_hf_gpt2`: ``transformers.GPT2LMHeadModel`` from a fresh ``GPT2Config`` (no downloaded weights). Its
  attention and MLP are ``transformers.pytorch_utils.Conv1D`` (weight ``d_in x d_out``, ``y = x W + b``), its norms
  ``nn.LayerNorm``, and ``lm_head`` (``nn.Linear``, no bias) shares its weight with ``transformer.wte``.
* :class:`GPT`: ``nn.Embedding`` token + position embeddings, pre-norm blocks of fused q/k/v ``nn.Linear`` + output
  projection around ``F.scaled_dot_product_attention(is_causal=True)`` and a 4x GELU MLP of ``nn.Linear``,
  ``nn.RMSNorm`` (or ``nn.LayerNorm``), and an output ``lm_head`` (``nn.Linear``, bias-free) whose weight *is*
  ``tok_embed.weight``. No ``nn.MultiheadAttention`` (its ``out_proj`` bypasses module hooks).

:func:`param_groups` splits parameters into the usual transformer recipe's decay / no-decay groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

LM_NAMES = ("hf-gpt2", "gpt")


def build_hf_gpt2(
    vocab: int, n_layer: int, n_head: int, n_embd: int, n_positions: int, dropout: float = 0.0
) -> nn.Module:
    """A randomly initialized ``transformers.GPT2LMHeadModel`` (tied ``lm_head``/``wte``, Conv1D layers, SDPA).

    Args:
        vocab: vocabulary size ``V``; n_layer / n_head / n_embd: depth, heads, width (``n_embd % n_head == 0``);
        n_positions: longest sequence ``T``; dropout: embedding, attention and residual dropout probability.

    ``use_cache`` is off (training only); bos/eos ids are unset (GPT-2's 50256 lies outside a small vocabulary).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    _check_sizes(vocab, n_layer, n_head, n_embd, n_positions, dropout)
    config = GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=True, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("GPT2LMHeadModel did not tie lm_head.weight to transformer.wte.weight")
    return model


def _check_sizes(vocab: int, n_layer: int, n_head: int, n_embd: int, n_positions: int, dropout: float) -> None:
    for name, value in (("vocab", vocab), ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                        ("n_positions", n_positions)):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`GPT`.

    Attributes:
        vocab: vocabulary size ``V``. n_layer: blocks. n_head: attention heads. n_embd: width ``C``.
        n_positions: longest sequence ``T``. dropout: probability after embeddings, attention and residuals.
        norm: ``"rms"`` (``nn.RMSNorm``) or ``"layer"`` (``nn.LayerNorm``). bias: biases in every ``nn.Linear`` but
        ``lm_head`` (LayerNorm gets a bias too).
    """

    vocab: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = 0.0
    norm: Literal["rms", "layer"] = "rms"
    bias: bool = False

    def __post_init__(self) -> None:
        _check_sizes(self.vocab, self.n_layer, self.n_head, self.n_embd, self.n_positions, self.dropout)
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused ``qkv`` Linear ``C -> 3C``, SDPA, output Linear ``proj`` ``C -> C``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, C) -> (N, T, C)``, position t attending to positions <= t."""
        n, t, c = x.shape
        q, k, v = (z.view(n, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class MLP(nn.Module):
    """``fc`` Linear ``C -> 4C``, GELU (tanh approximation, as GPT-2), ``proj`` Linear ``4C -> C``, dropout."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, C) -> (N, T, C)``."""
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, C) -> (N, T, C)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Plain-PyTorch GPT: token ids ``(N, T)`` int64 -> logits ``(N, T, V)`` in the parameters' dtype.

    Weights are initialized as GPT-2 (normal, std 0.02; residual output projections 0.02 / sqrt(2 n_layer); zero
    biases; unit norm scales). ``lm_head.weight`` is ``tok_embed.weight`` (one parameter).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.lm_head.weight = self.tok_embed.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, T, V)`` of int64 ids ``idx`` ``(N, T)``, ``T <= n_positions``.

        Raises:
            ValueError: the sequence is longer than ``n_positions``.
        """
        t = idx.shape[1]
        if t > self.cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={self.cfg.n_positions}")
        x = self.drop(self.tok_embed(idx) + self.pos_embed(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def build_lm(name: str, vocab: int, n_layer: int, n_head: int, n_embd: int, n_positions: int,
             dropout: float = 0.0, norm: Literal["rms", "layer"] = "rms") -> nn.Module:  # fmt: skip
    """``"hf-gpt2"`` (:func:`build_hf_gpt2`) or ``"gpt"`` (:class:`GPT`, ``norm`` chooses RMSNorm/LayerNorm).

    Raises:
        ValueError: an unknown name (listing :data:`LM_NAMES`) or bad sizes.
    """
    if name == "hf-gpt2":
        return build_hf_gpt2(vocab, n_layer, n_head, n_embd, n_positions, dropout)
    if name == "gpt":
        return GPT(GPTConfig(vocab=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                             dropout=dropout, norm=norm))  # fmt: skip
    raise ValueError(f"unknown language model {name!r}; valid: {', '.join(LM_NAMES)}")


def lm_logits(output: Any) -> torch.Tensor:
    """Logits ``(N, T, V)`` of a model's output: the tensor itself or a Hugging Face output's ``.logits``."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(f"expected logits of shape (N, T, V) or an output with .logits, got {type(output).__name__}")
    return logits


NO_DECAY_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                                               nn.BatchNorm1d, nn.BatchNorm2d)  # fmt: skip


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Decay / no-decay parameter groups, as the transformers recipes build them.

    No weight decay for biases, for the parameters of normalization layers and for embeddings (a weight shared by an
    embedding and an output layer, e.g. a tied ``lm_head``, counts as an embedding); every other parameter (the weight
    matrices of Linear / Conv1D layers) decays. Each parameter appears once (tied weights are deduplicated).

    Args:
        model: the model.
        weight_decay: the decay group's ``weight_decay``; ``None`` leaves the key out, so the optimizer's own
            default (the JSON ``optimizer.params.weight_decay``) applies.

    Returns:
        ``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]``, without an empty group.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, NO_DECAY_TYPES) or pname.endswith("bias") or p.dim() < 2:
                no_decay.add(id(p))
    decay_params = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    plain = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
    decay: dict[str, Any] = {"params": decay_params}
    if weight_decay is not None:
        decay["weight_decay"] = weight_decay
    groups = [decay, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
