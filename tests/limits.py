"""How long the slow tests wait for other processes (a driver, a worker group, a checkpoint to appear).

Every such wait is bounded, to catch a hang, and written for CI's shared 2-core machine. ``patience`` stretches
it as much as the pytest-timeout ceilings are stretched (tests/conftest.py): unchanged by default, 2.5x under
``scripts/test.sh --under-load`` (``DBGEN_TEST_TIMEOUT_SCALE=5``), where three test files run beside one busy
loop per core and a tiny training run can take ten times as long as on an idle machine.
"""

import os

TIMEOUT_SCALE = float(os.environ.get("DBGEN_TEST_TIMEOUT_SCALE", "2"))


def patience(seconds: float) -> float:
    """``seconds`` (written for the default scale of 2) scaled like the pytest-timeout ceilings."""
    return seconds * max(1.0, TIMEOUT_SCALE / 2)
