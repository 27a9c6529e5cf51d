"""Entry point of one data-parallel rank: ``python tests/support/worker OUT CASES_JSON`` (see the package docstring).

Every case is checked (:func:`parse_cases`) before the process group starts, then run in order and recorded.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch

from tests.support.harness import teardown
from tests.support.worker.case import parse_cases
from tests.support.worker.recording import save_records
from tests.support.worker.run import run_case


def main(argv: list[str]) -> None:
    """``argv``: OUT (an existing directory) and CASES_JSON (a JSON list of cases)."""
    out, cases = argv[0], parse_cases(json.loads(argv[1]))
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for i, case in enumerate(cases):
        save_records(out, i, rank, run_case(case, rank, world))
    teardown()  # barrier, destroy_process_group, exit without interpreter finalization (see tests/support/harness.py)


if __name__ == "__main__":
    main(sys.argv[1:])
