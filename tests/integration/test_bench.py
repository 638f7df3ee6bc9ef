"""The benchmark package: its entry point runs, and its target table reads the figures it is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.__main__ import targets  # noqa: E402
from bench.update import DEFAULT, IGNORE  # noqa: E402


def test_entry_point_lists_its_sections() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--only" in done.stdout and "update, diagnosis, swap, fit, variants, gpu" in done.stdout


def test_unknown_section_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "update,nope"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "nope" in done.stderr


def test_targets_say_met_or_by_how_much_they_were_missed() -> None:
    rows = targets(
        {
            "many": {DEFAULT: 1.5, IGNORE: 1.10},
            "few": {DEFAULT: 1.05, IGNORE: 1.02},
            "swap": {"lightning-ema `swap_in` + `swap_out`": (0.5, 0)},
            "e2e": {("SGD", "lightning-ema"): (1.2, 1.0, 0.1), ("SGD", "flat lerp"): (0.9, 0.8, 0.1)},
        }
    )
    verdicts = {row[0]: row[2] for row in rows}
    assert verdicts["update <= 1.25x bandwidth limit, 320-tensor model (default)"] == "MISSED by 20%"
    assert verdicts["update <= 1.1x bandwidth limit, large-tensor model (default)"] == "met"
    assert (
        verdicts["update with nonfinite='ignore' no slower than before (1.01x), large-tensor model"] == "MISSED by 1%"
    )
    assert verdicts["swap: no extra memory"] == "met"
    assert verdicts["fit overhead <= 1.3x bandwidth limit (SGD, lightning-ema)"] == "met"
    assert verdicts["(calibration: the ideal flat `lerp_` in the same hook, SGD)"] == "-"
