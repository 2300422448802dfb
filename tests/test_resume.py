"""Repeating and resuming a run: the same seed and flags give the same metrics, and a run
stopped after an epoch and resumed repeats the uninterrupted one to the last bit, for
every objective, compiled or not; what --resume records and what it refuses.

Interruptions in the middle of an epoch (Ctrl-C, kill -9, NaN) are in
test_reliability.py, a full disk in test_faults.py, the TensorBoard events of a
resumed run in test_tensorboard.py, and the parsing of --resume's flags in
test_flags.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import (
    TINY_FLAGS,
    one_error_line,
    rows_without_seconds,
    single_run_dir,
    tree,
    whole_and_resumed_runs,
)

import main
import utils

pytestmark = pytest.mark.slow  # Every test here trains through main.py.


@pytest.fixture(scope="module")
def three_epoch_run(tmp_path_factory) -> Path:
    """The tiny run's flags, uninterrupted for three epochs."""
    results = tmp_path_factory.mktemp("results3")
    argv = [*TINY_FLAGS, "--epochs", "3", "--add_noise", "True", "--results_dir", str(results)]
    assert main.main(argv) == 0
    return single_run_dir(results)


def test_the_same_seed_and_flags_give_the_same_metrics(tiny_run, three_epoch_run):
    # Two runs in one process, to the last printed digit; the first two epochs do not
    # depend on how many follow (nor on --plot_every, which only tiny_run sets).
    # test_kill_9_at_a_random_moment_then_resume compares runs of two processes.
    assert rows_without_seconds(tiny_run) == rows_without_seconds(three_epoch_run)[:2]


def test_resume_continues_to_the_same_third_epoch(tiny_run, three_epoch_run, tmp_path):
    resumed = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, resumed)
    assert main.main(["--resume", str(resumed), "--epochs", "3"]) == 0
    assert rows_without_seconds(resumed) == rows_without_seconds(three_epoch_run)
    assert (resumed / utils.CHECKPOINTS_DIR / "ckpt-3.index").is_file()
    saved = json.loads((resumed / "metrics.json").read_text())
    expected = json.loads((three_epoch_run / "metrics.json").read_text())
    assert saved["epochs"] == expected["epochs"] == 3
    for key in ("test_loss", "test_nll_x_given_y", "denoise_psnr_cvae"):
        assert saved[key] == expected[key], key


@pytest.mark.parametrize(
    "objective",
    [
        # The importance-weighted bound with the KL warm-up half done at the stop.
        [
            *("--add_noise", "True", "--binarize", "dynamic"),
            *("--train_samples", "3", "--kl_warmup", "2"),
        ],
        ["--binarize", "dynamic", "--n_labeled", "50"],  # M2: its labelled images' cycle.
    ],
    ids=["iwae-warmup", "m2"],
)
def test_a_compiled_run_resumes_exactly(objective, tmp_path, capsys):
    """The default path, each chunk compiled by XLA with threefry draws: a run resumed
    after epoch 1 repeats the uninterrupted one to the last bit, as without XLA (the
    test above). The K-sample bound with its warm-up, and M2, each carry state of their
    own across the resume: the optimizer's step that sets β, the labelled batches."""
    flags = [
        *("--n_train", "150", "--batch_size", "64", "--seed", "3", *objective),  # A padded step.
        *("--n_eval", "50", "--iw_samples", "0", "--plot_every", "10", "--xla", "auto"),
    ]
    whole, resumed = whole_and_resumed_runs(flags, tmp_path)
    assert capsys.readouterr().out.count("XLA on") == 3  # The whole, the first, the resumed.
    rows = rows_without_seconds(resumed)
    assert rows == rows_without_seconds(whole)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    saved, expected = (json.loads((run / "metrics.json").read_text()) for run in (resumed, whole))
    assert saved["test_loss"] == expected["test_loss"]


def test_resume_records_every_flag_it_changes(tmp_path):
    flags = ["--n_train", "64", "--batch_size", "32", "--epochs", "1", "--n_hidden", "16"]
    assert (
        main.main([*flags, "--n_eval", "20", "--iw_samples", "0", "--results_dir", str(tmp_path)])
        == 0
    )
    run_dir = single_run_dir(tmp_path)
    changed = ["--epochs", "2", "--iw_samples", "2", "--n_eval", "30", "--z_range", "3.0",
               "--plot_every", "2", "--manifold_dims", "1", "0", "--xla", "off"]  # fmt: skip
    assert main.main(["--resume", str(run_dir), *changed]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["iw_samples"] == 2 and saved["n_eval"] == 30
    assert saved["z_range"] == 3.0 and saved["plot_every"] == 2
    assert saved["manifold_dims"] == [1, 0] and saved["xla"] == "off"
    assert saved["resume"] is None and "versions" in saved
    # A plain --resume and --eval_only now use them.
    again = main.parse_args(["--resume", str(run_dir)])
    assert (again.epochs, again.iw_samples, again.manifold_dims) == (2, 2, (1, 0))
    assert main.parse_args(["--eval_only", str(run_dir)]).n_eval == 30


def test_resume_refuses_fewer_epochs_than_the_run_has_done(tiny_run, tmp_path, capsys):
    # Refused after reading the checkpoint, in one line, with the folder untouched.
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    before = tree(run_dir, lock=False)
    assert main.main(["--resume", str(run_dir), "--epochs", "1"]) == 1
    error = one_error_line(capsys.readouterr())
    assert f"{run_dir} has done 2 epochs; pass --epochs 2 or more, or drop it" in error
    assert tree(run_dir, lock=False) == before
