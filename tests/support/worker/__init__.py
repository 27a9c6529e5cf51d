"""One data-parallel rank of a tiny SP-NGD run through the real DeepSpeed engine, on gloo.

Launched by :mod:`tests.support.ranks` for tests/integrations/test_distributed.py, test_device_probe.py,
test_faults.py, test_replicas.py and test_param_groups.py, and tests/optimizer/test_part_owners.py,
test_reduce_scatter.py and test_stale_statistics.py. Run as::

    RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/support/worker OUT CASES_JSON

(the repository root on ``PYTHONPATH``). CASES_JSON is a JSON list of cases, each a :class:`~.case.Case` (every key
documented and checked there; an unknown key fails the run). Per case, rank 0 saves the model's parameters (fp32
view) and the global mean loss after each step to OUT/<case index>.pt as {"params": steps × P, "loss": steps};
every rank writes OUT/<i>.r<rank>.pt, its :class:`~.recording.RankRecord`.

Modules, by concern:

* :mod:`.case` — the case schema and its validation;
* :mod:`.net` — the net, its parameter groups, the global batch size;
* :mod:`.engine` — the DeepSpeed config and engine of a case;
* :mod:`.faults` — faults injected on one rank (``inject``) and the default-device canary (``canary``);
* :mod:`.recording` — the per-step, error and final records, collective counting, the files written;
* :mod:`.resume` — the checkpoint round trip (``resume_at``);
* :mod:`.run` — the step loop of one case;
* :mod:`.__main__` — the command line.
"""

from tests.support.worker.case import Case, CaseError, Inject, parse_case, parse_cases
from tests.support.worker.net import GLOBAL_BATCH, Net, make_model, param_groups

__all__ = ["GLOBAL_BATCH", "Case", "CaseError", "Inject", "Net", "make_model", "param_groups", "parse_case",
           "parse_cases"]
