"""Engine integrations: where SP-NGD meets the training frameworks that drive it.

* :mod:`.deepspeed` — ``ds_spngd.initialize`` and every DeepSpeed seam (ZeRO 0-3, checkpoints, monitors);
* :mod:`.transformers` — :class:`~ds_spngd.integrations.transformers.SPNGDTrainer` for the Hugging Face Trainer;
* :mod:`.accelerate` — :class:`~ds_spngd.integrations.accelerate.SPNGDAccelerator` /
  :func:`~ds_spngd.integrations.accelerate.prepare_spngd` for Accelerate's DeepSpeed plugin.

Both Hugging Face routes build the same engine as ``ds_spngd.initialize`` through its public pieces
(``prepare_client_config`` before DeepSpeed is built, ``adopt`` after).
"""
