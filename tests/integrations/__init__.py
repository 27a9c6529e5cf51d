"""Tests of the engine glue ``ds_spngd.integrations`` (DeepSpeed: initialize, ZeRO, faults, replicas, noise scale)."""
