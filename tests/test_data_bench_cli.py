"""``python -m dbgen.bench`` with a config or data path that is missing: one line naming it, exit 2 (issue 19)."""

from pathlib import Path

import pytest

from dbgen.bench.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["data", "comm"])
def test_missing_data_path_is_one_line_and_exit_2(tmp_path, capsys, command):
    missing = tmp_path / "no-such-split"
    if command == "data":
        argv = ["data", "--data", str(missing), "--workers", "0"]
    else:
        argv = ["comm", "--config", str(REPO / "configs" / "rvae_binary_tiny.yaml"), f"data.train={missing}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["comm", "--config", str(REPO / "configs" / "rvae_binary_tiny.yaml"), "train.no_such_key=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_key" in err and err.count("\n") == 1, err
