"""Tests of the optimizer package ``ds_spngd`` (curvature, comm, step, placement, checkpoint, memory)."""
