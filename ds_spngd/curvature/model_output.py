"""What the Fisher blocks need from the model's output: the number of loss terms, and the MC Fisher's sampled labels.

One forward hook on the whole model, active on factor-refresh steps only:

* **Loss terms** (every ``fisher_type``): the output (a tensor, or ``.logits`` of a Hugging Face output, or the first
  tensor of a tuple) gets a tensor hook that runs first in the backward pass, before any other layer's hook (the
  block of a layer whose output *is* the model output counts in its own hook, which runs first). A loss term's
  row of the output gradient is non-zero; a position whose label is ``ignore_index`` (or padding after the last
  kept token) has an exactly zero row. The hook stores, per example, the number of non-zero rows
  (:attr:`CaptureContext.terms`), so the blocks scale and average by the true number of loss terms without a host
  sync (Eschenhagen et al., NeurIPS 2023, arXiv:2311.00636: A ⊗ G is then the Fisher of the loss per term).
* **MC Fisher** (``fisher_type="mc"``, Martens & Grosse 2015 §5): labels are sampled from the model's predictive
  distribution y ~ softmax(logits) at every position of N × C or N × … × V logits (one sample each), and a second,
  summed-loss backward runs back to the hooked layer outputs only (no weight gradients; the training gradients are
  untouched). Every position is then a loss term.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ds_spngd.curvature.base import CaptureContext

__all__ = ["ModelOutputHook", "output_logits"]


def output_logits(output: Any) -> Tensor | None:
    """The tensor a model's forward returned as its prediction: the output itself, its ``.logits`` (Hugging Face
    ModelOutput), or the first tensor of a tuple / list; None when there is none."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


class ModelOutputHook:
    """The model-level forward hook (see the module docstring).

    Args:
        model: the raw model.
        ctx: the blocks' shared capture context (its ``terms`` and ``phase`` are set here).

    Attributes:
        outputs: hooked layer outputs of the current forward (MC backward targets; filled by the blocks' hooks).
    """

    def __init__(self, model: nn.Module, ctx: CaptureContext) -> None:
        self.ctx = ctx
        self.outputs: list[Tensor] = []
        if ctx.fisher_type == "mc":
            ctx.track_output = self.outputs.append
        self._handle: RemovableHandle | None = model.register_forward_hook(self)

    def remove(self) -> None:
        """Detach the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        outputs = list(self.outputs)
        self.outputs.clear()
        self.ctx.terms, self.ctx.output_id = None, None
        if not (self.ctx.collecting and module.training and torch.is_grad_enabled()):
            return
        logits = output_logits(output)
        if logits is None or logits.dim() < 2 or not logits.requires_grad:
            if self.ctx.fisher_type == "mc" and outputs:
                shape = tuple(logits.shape) if logits is not None else type(output).__name__
                raise ValueError(f'fisher_type "mc" needs the model to return logits of shape N x classes or '
                                 f"N x ... x vocab (a tensor, or .logits), got {shape}")
            return
        if self.ctx.fisher_type == "mc":
            if outputs:
                self._sampled_backward(logits, outputs)
            return
        self.ctx.output_id = id(logits)  # a block whose layer output is this tensor counts first (its hook runs first)
        logits.register_hook(self.ctx.count_terms)

    def _sampled_backward(self, logits: Tensor, outputs: list[Tensor]) -> None:
        flat = logits.float().reshape(-1, logits.shape[-1])
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(flat.detach(), dim=-1), 1).squeeze(1)
        loss = F.cross_entropy(flat, y, reduction="sum")
        n = int(logits.shape[0])
        per = flat.shape[0] // max(n, 1)
        self.ctx.terms = torch.full((n,), float(per), device=logits.device)
        self.ctx.phase = "mc"
        try:
            torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        finally:
            self.ctx.phase = "train"
