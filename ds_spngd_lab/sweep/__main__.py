"""``python -m ds_spngd_lab.sweep ...``: see :mod:`ds_spngd_lab.sweep.cli`."""

from ds_spngd_lab.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
