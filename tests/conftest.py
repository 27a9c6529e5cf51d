"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import free_port, remove_shm_buffers


@pytest.fixture
def single_rank_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Environment of a 1-rank launch, so train.main() or ds_spngd.initialize can run a real DeepSpeed engine inside
    pytest (DeepSpeed's /dev/shm buffer of the port is removed afterwards). The process group stays initialized for
    the rest of the pytest process: DeepSpeed caches its groups, so it cannot be re-created in-process."""
    port = free_port()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    yield
    remove_shm_buffers(port)
