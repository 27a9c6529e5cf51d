"""Tests of the lab ``ds_spngd_lab`` (data, models, schedules, sweeps, train.py / train_lm.py)."""
