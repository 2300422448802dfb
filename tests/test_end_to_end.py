"""The real script end to end on a few hundred images: files, resume, repeatability."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_FLAGS, single_run_dir

import main
import train
import utils

TIMING_COLUMNS = {"seconds"}


def numeric_rows(run_dir: Path) -> list[dict[str, float]]:
    rows = utils.read_csv(run_dir / "metrics.csv")
    return [{k: float(v) for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_rows_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            np.testing.assert_allclose(row_a[key], row_b[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.fixture(scope="session")
def three_epoch_run(tmp_path_factory) -> Path:
    """The tiny run's flags, uninterrupted for three epochs."""
    results = tmp_path_factory.mktemp("results3")
    argv = [*TINY_FLAGS, "--epochs", "3", "--add_noise", "True", "--results_dir", str(results)]
    assert main.main(argv) == 0
    return single_run_dir(results)


def test_run_writes_config_metrics_and_checkpoint(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    for field in dataclasses.fields(main.Config):
        assert field.name in config
    assert config["add_noise"] is True and config["n_train"] == 300 and config["epochs"] == 2
    assert config["versions"]["tensorflow"].startswith("2.21")

    rows = utils.read_csv(tiny_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert next(iter(rows[0])) == "epoch"
    for key in ("train_loss", "train_recon", "train_kl", "valid_loss", "learning_rate"):
        assert all(np.isfinite(float(r[key])) for r in rows)
    np.testing.assert_allclose(float(rows[1]["learning_rate"]), 1e-4 * 0.98)
    # Two epochs of 300 images is enough for the training loss to fall.
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])

    checkpoints = tiny_run / "checkpoints"
    assert (checkpoints / "checkpoint").is_file()
    assert (checkpoints / "ckpt-2.index").is_file()

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert np.isfinite(metrics["test_loss"]) and metrics["test_loss"] > 0
    np.testing.assert_allclose(
        metrics["test_loss"], metrics["test_recon"] + metrics["test_kl"], rtol=1e-6
    )


def test_same_seed_same_metrics(tiny_run, three_epoch_run):
    # The first two epochs do not depend on how many follow.
    assert_rows_close(numeric_rows(tiny_run), numeric_rows(three_epoch_run)[:2])


def test_resume_continues_to_the_same_third_epoch(tiny_run, three_epoch_run, tmp_path):
    resumed = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, resumed)
    assert main.main(["--resume", str(resumed), "--epochs", "3"]) == 0
    assert_rows_close(numeric_rows(resumed), numeric_rows(three_epoch_run))
    assert (resumed / "checkpoints" / "ckpt-3.index").is_file()
    saved = json.loads((resumed / "metrics.json").read_text())
    expected = json.loads((three_epoch_run / "metrics.json").read_text())
    assert saved["epochs"] == expected["epochs"] == 3
    np.testing.assert_allclose(saved["test_loss"], expected["test_loss"], atol=1e-4)


def test_resume_refuses_contradicting_flags(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--resume", str(tiny_run), "--n_z", "7"])
    assert exit_info.value.code == 2
    assert "--n_z 7 (the run has 2)" in capsys.readouterr().err


def test_the_script_itself_runs(tmp_path):
    script = Path(main.__file__)
    argv = [
        *("--n_train", "200", "--epochs", "1", "--n_eval", "100", "--iw_samples", "2"),
        *("--results_dir", str(tmp_path)),
    ]
    result = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Device: CPU" in result.stdout
    run_dir = single_run_dir(tmp_path)
    assert f"Run folder: {run_dir}" in result.stdout
    assert "epoch   1/1" in result.stdout and "test -ELBO" in result.stdout
    assert train.GREY_LEVEL_NOTE in result.stdout  # The default --binarize none.
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "metrics.csv",
        "metrics.json",
        "checkpoints",
    }
