"""Running a worker script in its own process, as every multi-process test here does, and reading what it wrote.

The ranks cannot be pytest itself (Lightning and Fabric relaunch the running script per rank), so each test starts
a ``*_worker.py`` with the same interpreter. The child gets one thread per rank (two ranks share the test machine's
cores) and no ``MASTER_PORT``/``MASTER_ADDR``: an in-process ``ddp_fork`` run leaves them in pytest's environment,
and without them each launch picks a free port of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORLD_SIZE = 2


def run_worker(script: Path, *args: str, timeout: float) -> None:
    """Run ``python script *args``; fail the test with the end of its stderr unless it exits with 0."""
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def load_ranks(out: Path) -> list[dict[str, Any]]:
    """What each rank dumped to ``out/rank{r}.pt``, in rank order."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
