"""``python -m ds_spngd.sweep ...``: see :mod:`ds_spngd.sweep.cli`."""

from ds_spngd.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
