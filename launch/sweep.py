"""Scaling sweep logged to Weights & Biases: ``python launch/sweep.py --help`` (the same as ``python -m
ds_spngd.sweep``; the logic lives in :mod:`ds_spngd.sweep`)."""

from ds_spngd.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
