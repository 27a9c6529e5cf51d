"""SP-NGD in the Hugging Face Trainer with DeepSpeed: :class:`SPNGDTrainer`.

A Trainer script changes one import and one class name::

    from ds_spngd.integrations.transformers import SPNGDTrainer
    trainer = SPNGDTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)

and its DeepSpeed JSON says ``"optimizer": {"type": "SPNGD", "params": {"lr": "auto", "weight_decay": "auto",
...}}``. ``"auto"`` ``lr`` / ``weight_decay`` are filled from ``TrainingArguments.learning_rate`` /
``weight_decay`` exactly like DeepSpeed's own sections (a number that differs from them is refused by the Trainer,
as for DeepSpeed's optimizers); scheduler fields and batch sizes work as with any DeepSpeed config. Other SP-NGD keys
have no Trainer argument: ``"auto"`` there is an error naming the key.

What it does (plain ``transformers.Trainer`` hands DeepSpeed a ``DummyOptim`` for a config optimizer section, and
DeepSpeed cannot build ``"SPNGD"``):

* at construction: takes the SPNGD section out of the DeepSpeed config the Trainer and Accelerate hand to DeepSpeed
  (so the Trainer calls :meth:`create_optimizer`) and validates it and the engine settings (errors before training);
* :meth:`create_optimizer` builds :class:`ds_spngd.SPNGD` on ``self.model`` with the Trainer's decay / no-decay
  parameter groups (``get_decay_parameter_names``: ``weight_decay`` for the decay group, 0 for biases and norms);
* ``self.accelerator.prepare`` (wrapped on the instance) prepares the config for a client SP-NGD and glues SP-NGD to
  the DeepSpeed engine Accelerate builds (:func:`ds_spngd.integrations.accelerate.prepare_spngd`), so
  ``engine.save_checkpoint`` / ``load_checkpoint`` — which the Trainer calls for checkpoints and
  ``resume_from_checkpoint`` — write / read SP-NGD's ``spngd_rank*.pt`` shards in ``checkpoint-N/global_stepN``.

``optimizers=(SPNGD(...), scheduler_or_None)`` works too (the DeepSpeed JSON then has no optimizer section): the
object is used instead of being dropped, and glued the same way. The plain ``transformers.Trainer`` drops an
optimizer passed that way under DeepSpeed (``deepspeed_init`` sets ``trainer.optimizer = None`` and builds AdamW;
transformers issues #15784, #38753): use this class.

Gradient clipping: under DeepSpeed the Trainer does not clip; DeepSpeed's ``gradient_clipping`` does, on the raw
gradient before SP-NGD preconditions it. ``"gradient_clipping": "auto"`` takes ``TrainingArguments.max_grad_norm``
(default 1.0): a warning says so at start (pass ``max_grad_norm=0`` to turn it off; ``kl_clip`` is SP-NGD's own
step-size control). Without a ``gradient_clipping`` key ds_spngd uses 0 (DeepSpeed 0.19.8's default is 1.0), and a
warning says that ``max_grad_norm`` is not applied. ``TrainingArguments`` are never changed.

A second ``train()`` call on the same trainer and model is refused (SP-NGD's hooks are on the model and the Trainer
re-initializes DeepSpeed around the old engine): create a new trainer, e.g. to resume. Untested:
``hyperparameter_search`` (each trial rebuilds the DeepSpeed config and the accelerator through
``create_accelerator_and_postprocess``, which takes the SPNGD section out again, and SP-NGD is built on the trial's
model).

On a CPU-only machine the Trainer runs DeepSpeed with ``TrainingArguments(use_cpu=True)`` (gloo), as without
SP-NGD.

transformers internals relied on (5.25): ``Trainer.create_accelerator_and_postprocess`` creates
``self.accelerator`` (whose ``prepare`` is wrapped here); ``TrainingArguments`` fills ``"auto"`` values
(``HfTrainerDeepSpeedConfig.trainer_config_process``) into ``accelerator.state.deepspeed_plugin.deepspeed_config``
before the Trainer is built; ``integrations/deepspeed.py`` ``deepspeed_optim_sched`` calls
``trainer.create_optimizer()`` when that config has no ``optimizer`` section; ``Trainer._prepare_for_training``
passes the model and optimizer to ``self.accelerator.prepare`` together and saves / resumes through
``self.model_wrapped.save_checkpoint`` / ``deepspeed_load_checkpoint``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ds_spngd.integrations.accelerate import build_spngd, prepare_spngd, resolve_auto, take_spngd_section
from ds_spngd.integrations.deepspeed.build import check_client_config, spngd_config
from ds_spngd.optimizer import SPNGD

__all__ = ["SPNGDTrainer", "trainer_param_groups"]

logger = logging.getLogger("ds_spngd")

TRAINER_CLIPPING = (' (from the DeepSpeed config; the Trainer fills "auto" with TrainingArguments.max_grad_norm: '
                    'pass max_grad_norm=0, or write "gradient_clipping": 0, to turn it off)')


def trainer_param_groups(trainer: Trainer, model: nn.Module) -> list[dict[str, Any]]:
    """The Trainer's decay / no-decay parameter groups of ``model`` (as ``Trainer.create_optimizer`` builds them):
    ``{"params": decay, "weight_decay": args.weight_decay}`` and ``{"params": rest, "weight_decay": 0.0}``, trainable
    parameters only, without an empty group."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class SPNGDTrainer(Trainer):
    """``transformers.Trainer`` that trains with SP-NGD under DeepSpeed (module docstring); without DeepSpeed, or
    with another DeepSpeed optimizer, it is the plain Trainer.

    Takes the Trainer's arguments.

    Raises:
        SPNGDConfigError: (at construction) invalid SPNGD params, an ``"auto"`` the Trainer does not fill, or engine
            settings SP-NGD does not support.
        ValueError: (at construction) an SP-NGD (a scheduler) passed in ``optimizers`` while the DeepSpeed config
            has an optimizer (a scheduler) section; (at ``train()``) a second SP-NGD build on the same model.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.spngd_section: dict[str, Any] | None = None
        self.spngd_built: SPNGD | None = None
        self.spngd_model: nn.Module | None = None  # the model spngd_built hooks
        super().__init__(*args, **kwargs)
        self.client_spngd: SPNGD | None = self.optimizer if isinstance(self.optimizer, SPNGD) else None
        self.client_scheduler: Any = self.lr_scheduler if self.client_spngd is not None else None
        self.check_spngd_config()

    # ---- the accelerator: config section out, prepare glued ---------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, with the SPNGD section taken out of its DeepSpeed config and ``prepare``
        building / gluing SP-NGD (:func:`ds_spngd.integrations.accelerate.prepare_spngd`)."""
        super().create_accelerator_and_postprocess()
        if not self.is_deepspeed_enabled:
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        section = take_spngd_section(config)
        if section is not None:
            values = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay}
            self.spngd_section = resolve_auto(section, values, "the Trainer (TrainingArguments)")
        plain = self.accelerator.prepare
        if getattr(plain, "func", None) is not prepare_spngd:
            self.accelerator.prepare = partial(  # type: ignore[method-assign]
                prepare_spngd, self.accelerator, prepare_fn=plain, clipping_source=TRAINER_CLIPPING)

    def check_spngd_config(self) -> None:
        """Validate the SPNGD section / the client SP-NGD against the DeepSpeed config now, before training, and warn
        about gradient clipping once (module docstring).

        Raises:
            SPNGDConfigError: invalid params or unsupported engine settings.
            ValueError: an SP-NGD (a scheduler) in ``optimizers`` beside an optimizer (a scheduler) section in the
                DeepSpeed config.
        """
        if not self.is_deepspeed_enabled or (self.spngd_section is None and self.client_spngd is None):
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if self.client_spngd is not None:
            section = self.spngd_section if self.spngd_section is not None else config.get("optimizer")
            if section is not None:
                raise ValueError("SPNGDTrainer got an SP-NGD in optimizers= and an optimizer section (type "
                                 f"{section.get('type')!r}) in the DeepSpeed config: remove one of them")
            if self.client_scheduler is not None and "scheduler" in config:
                raise ValueError("SPNGDTrainer got a scheduler in optimizers= and a scheduler section in the "
                                 "DeepSpeed config: remove one of them")
        if self.spngd_section is not None:
            cfg = spngd_config({**config, "optimizer": self.spngd_section})
        else:
            assert self.client_spngd is not None
            cfg = self.client_spngd.cfg
        check_client_config(config, cfg)
        clip = config.get("gradient_clipping")
        if clip is None and self.args.max_grad_norm > 0:
            logger.warning("SP-NGD: TrainingArguments.max_grad_norm=%s is not applied: the DeepSpeed config has no "
                           "gradient_clipping, so ds_spngd uses 0 (under DeepSpeed the Trainer does not clip; "
                           'write "gradient_clipping": "auto" to clip the raw gradient at max_grad_norm before '
                           "preconditioning)", self.args.max_grad_norm)

    # ---- optimizer and scheduler ------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """SP-NGD under DeepSpeed (from the config section, or the one passed in ``optimizers``); otherwise the
        Trainer's optimizer.

        Raises:
            SPNGDConfigError: invalid SP-NGD params (checked at construction already).
            ValueError: SP-NGD was built on this model before (a second ``train()`` call).
        """
        if self.optimizer is not None or not self.is_deepspeed_enabled:
            return super().create_optimizer(model)
        if self.client_spngd is not None:
            self.optimizer = self.client_spngd
        elif self.spngd_section is not None:
            opt_model = self.model if model is None else model
            if opt_model is None:
                raise ValueError("SPNGDTrainer needs the model to build SP-NGD (its layers get curvature hooks)")
            if self.spngd_built is not None:
                if opt_model is self.spngd_model:
                    raise ValueError("SPNGDTrainer builds SP-NGD once per model (its hooks are on the model): create "
                                     "a new trainer for another train() call, e.g. with resume_from_checkpoint")
                self.spngd_built.remove_hooks()  # a new model (model_init): the old SP-NGD is done
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            self.spngd_built = build_spngd(config, self.spngd_section, trainer_param_groups(self, opt_model),
                                           opt_model)
            self.spngd_model = opt_model
            self.optimizer = self.spngd_built
        else:
            return super().create_optimizer(model)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The scheduler passed with an SP-NGD in ``optimizers`` (when the DeepSpeed config has no scheduler), else
        the Trainer's."""
        if self.lr_scheduler is None and self.client_scheduler is not None:
            self.lr_scheduler = self.client_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

