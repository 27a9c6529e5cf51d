"""Scaling sweep logged to Weights & Biases: ``python launch/sweep.py --help`` (the same as ``python -m
ds_spngd_lab.sweep``; the logic lives in :mod:`ds_spngd_lab.sweep`)."""

from ds_spngd_lab.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
