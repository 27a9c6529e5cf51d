"""fp16 with dynamic loss scaling under ZeRO-2 on CUDA/NCCL (world size 1): trajectory vs fp32 and the overflow skip.

fp16 is refused on CPU by DeepSpeed 0.19.8, so this runs wherever a GPU is present (CI machines without one skip it).
The checks themselves are asserts in tests/fp16_worker.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA (DeepSpeed refuses it on CPU)")


def test_fp16_zero2_trajectory_and_overflow_skip() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fp16_worker.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "FP16 OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
