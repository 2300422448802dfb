"""Interrupted runs, NaNs, bad data, unwritable outputs.

Every run here is the real script on 300 images (10 steps per epoch), evaluated
on 200 test images with K=5. Runs that are interrupted and resumed must end with
the same metrics.csv, byte for byte apart from timings, as the uninterrupted
`reference` run.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import XLA_OFF, one_error_line, rows_without_seconds, single_run_dir, tree

import checkpoints
import cvae
import data_utils
import evaluate
import main
import steps
import stopping
import train
import utils

PROJECT_DIR = utils.PROJECT_DIR
EPOCHS = 5
STEPS = 10  # 300 images / batch 30
RUN_FLAGS = [
    *("--n_train", "300", "--batch_size", "30", "--seed", "5", "--add_noise", "True"),
    *("--n_eval", "200", "--iw_samples", "5"),
    # Without XLA: compiling would add about 2 s to each of this module's many runs,
    # and what they test happens between chunks, in Python, the same either way. The
    # default (XLA) path is resumed exactly in test_end_to_end.
    *XLA_OFF,
]


def run_main(*argv: str) -> int:
    return main.main([*RUN_FLAGS, *argv])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that interrupted ones must reproduce."""
    results = tmp_path_factory.mktemp("reference")
    assert run_main("--epochs", str(EPOCHS), "--results_dir", str(results)) == 0
    return single_run_dir(results)


@pytest.fixture
def poison_step(monkeypatch):
    """Make the reconstruction term of the run's `n`-th training step NaN, inside the graph."""

    def install(n: int) -> None:
        import tensorflow as tf

        real_step = steps._apply_step

        def poisoned(model, optimizer, *args):
            sums = real_step(model, optimizer, *args)
            # The optimizer counts the run's steps, this one included.
            factor = tf.where(optimizer.iterations == n, float("nan"), 1.0)
            return {**sums, "recon": sums["recon"] * factor}

        monkeypatch.setattr(steps, "_apply_step", poisoned)

    return install


# 1. Interrupted training ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")]
)
def test_a_signal_mid_epoch_saves_and_resumes_exactly(
    tmp_path, reference, after_each_chunk, monkeypatch, capsys, signum, name
):
    # A real SIGINT (Ctrl-C) or SIGTERM (a scheduler's) through the real handler, during
    # a chunk of 3 steps that ends at step 3 of epoch 2; the run stops at the end of that
    # chunk and exits 128 + the signal. The resumed run takes the default chunks (the
    # reference's: one per epoch), so this also shows that the result does not depend
    # on the chunking.
    monkeypatch.setattr(train, "STEPS_PER_CHUNK", 3)

    def interrupt(steps: int) -> None:
        if steps == STEPS + 3:
            signal.raise_signal(signum)

    after_each_chunk(interrupt)
    code = run_main("--epochs", str(EPOCHS), "--results_dir", str(tmp_path))
    assert code == 128 + signum
    run_dir = single_run_dir(tmp_path)
    err = capsys.readouterr().err
    assert f"{name}: saved the state after step 3 of epoch 2" in err
    assert f"--resume {run_dir}" in err
    assert [row["epoch"] for row in rows_without_seconds(run_dir)] == ["1"]
    assert (run_dir / "checkpoints" / "interrupted" / "checkpoint").is_file()

    monkeypatch.undo()
    assert main.main(["--resume", str(run_dir)]) == 0
    assert "after epoch 1, step 3 of epoch 2" in capsys.readouterr().out
    assert rows_without_seconds(run_dir) == rows_without_seconds(reference)


@pytest.mark.slow
def test_an_extension_is_recorded_so_that_the_printed_hint_finishes_it(
    tiny_run, tmp_path, after_each_chunk, monkeypatch, capsys
):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    monkeypatch.setattr(train, "STEPS_PER_CHUNK", 2)

    def interrupt(steps: int) -> None:
        if steps == 2:  # Steps of this process: step 2 of epoch 3.
            signal.raise_signal(signal.SIGINT)

    after_each_chunk(interrupt)
    assert main.main(["--resume", str(run_dir), "--epochs", "3"]) == 130
    assert f"Continue with: python main.py --resume {run_dir}\n" in capsys.readouterr().err
    # The new target is recorded before training, every other key kept.
    assert json.loads((run_dir / "config.json").read_text()) == {**saved, "epochs": 3}
    monkeypatch.undo()

    # Too few epochs to finish the interrupted one: refused, nothing evaluated.
    before = tree(run_dir, lock=False)
    assert main.main(["--resume", str(run_dir), "--epochs", "2"]) == 1
    error = one_error_line(capsys.readouterr())
    assert "stopped in epoch 3 (after step 2); pass --epochs 3 or more, or drop it" in error
    assert tree(run_dir, lock=False) == before

    # The printed hint, without --epochs, finishes the extension.
    assert main.main(["--resume", str(run_dir)]) == 0
    assert [row["epoch"] for row in rows_without_seconds(run_dir)] == ["1", "2", "3"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_the_config_is_one_error_line(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    utils.write_json(run_dir / "config.json", {**config, "n_hidden": [32]})
    before = tree(run_dir, lock=False)
    for flag in ("--resume", "--eval_only"):
        assert main.main([flag, str(run_dir)]) == 1
        error = one_error_line(capsys.readouterr())
        assert f"{flag} {run_dir}: " in error and "does not fit the model" in error, error
    assert tree(run_dir, lock=False) == before


def _start_script(results: Path, log: Path) -> subprocess.Popen:
    """The real script in a subprocess; returns once its first checkpoint exists."""
    argv = [sys.executable, str(PROJECT_DIR / "main.py"), *RUN_FLAGS, "--epochs", str(EPOCHS)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*argv, "--results_dir", str(results)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 120
    while not list(results.glob("*/checkpoints/checkpoint")):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint after 2 minutes"
        time.sleep(0.02)
    return process


def _send_sigint() -> None:
    """A real Ctrl-C: SIGINT, handled by whatever handler is installed.

    Raised in this thread, so that the handler runs before this returns: os.kill
    may hand the signal to another of TensorFlow's threads, and the main thread
    then meets it later, wherever it is.
    """
    signal.raise_signal(signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment", ["training epoch 2", "recording the last epoch", "the final evaluation"]
)
def test_ctrl_c_at_a_chosen_moment_then_resume(
    tmp_path, reference, after_each_chunk, monkeypatch, capsys, moment
):
    """Ctrl-C where a run spends its time, at a chosen moment rather than a random one:
    in a chunk of training steps (here epoch 2's only chunk: the signal lands as it
    ends, before the loop looks), while an epoch is recorded (metrics, checkpoint,
    curves, canvases: here the last epoch's), and in the final evaluation. Each must
    exit with code 130, keep every finished epoch, and print the command that carries
    on to the same metrics.csv as `reference`."""
    epochs = 3
    if moment == "training epoch 2":

        def interrupt(steps: int) -> None:
            if steps == 2 * STEPS:
                _send_sigint()

        after_each_chunk(interrupt)
    elif moment == "recording the last epoch":
        real_record = train.record_epoch

        def record(current, number, *args):
            if number == epochs:
                _send_sigint()
            return real_record(current, number, *args)

        monkeypatch.setattr(train, "record_epoch", record)
    else:

        def compute(*args):
            # Outside the training loop the default handler turns SIGINT into a
            # KeyboardInterrupt in the main thread: raised here directly, since in
            # two full-suite runs (not alone, not in two others) a raised SIGINT at
            # this point never reached the run (session note, 2026-11-27).
            raise KeyboardInterrupt

        monkeypatch.setattr(evaluate, "compute_test_metrics", compute)

    assert run_main("--epochs", str(epochs), "--results_dir", str(tmp_path)) == 130
    run_dir = single_run_dir(tmp_path)
    err = capsys.readouterr().err
    saved = 2 if moment == "training epoch 2" else epochs  # The epoch under way is finished.
    assert [row["epoch"] for row in rows_without_seconds(run_dir)] == [
        str(e) for e in range(1, saved + 1)
    ]
    assert not (run_dir / "metrics.json").exists()
    if moment == "the final evaluation":
        assert "the training finished and its checkpoints are saved" in err, err
        assert "before a checkpoint could be saved" not in err, err
        continue_with = ["--eval_only", str(run_dir)]
    else:
        assert f"saved the state after epoch {saved} in" in err, err
        continue_with = ["--resume", str(run_dir)]
    assert f"with: python main.py {' '.join(continue_with)}" in err, err

    monkeypatch.undo()
    # The evaluation settings of RUN_FLAGS, which --eval_only may not take from the run.
    assert main.main([*continue_with, "--n_eval", "200", "--iw_samples", "5"]) == 0
    assert rows_without_seconds(run_dir) == rows_without_seconds(reference)[:epochs]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == epochs


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume(tmp_path, reference):
    # Any moment after the first checkpoint, up to the time of the reference's epochs
    # 2 to 4: the killed run still had epoch 5, the canvases and the evaluation to go.
    # A seeded draw: the same fraction of the window on every run of the suite.
    window = sum(float(row["seconds"]) for row in utils.read_csv(reference / "metrics.csv")[1:4])
    delay = random.Random(25).uniform(0.0, window)
    log = tmp_path / "log.txt"
    process = _start_script(tmp_path / "results", log)
    time.sleep(delay)
    assert process.poll() is None, f"finished before the kill; log:\n{log.read_text()}"
    process.send_signal(signal.SIGKILL)
    code = process.wait(timeout=60)
    run_dir = single_run_dir(tmp_path / "results")
    note = f"kill -9 {delay:.3f}s after the first checkpoint; log:\n{log.read_text()}"
    assert code == -signal.SIGKILL, note
    # At most the epoch in progress is lost: its row may be written, not yet checkpointed.
    state = (run_dir / "checkpoints" / "checkpoint").read_text()
    saved = int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state, re.M).group(1))
    rows = [int(row["epoch"]) for row in rows_without_seconds(run_dir)]
    assert rows in (list(range(1, saved + 1)), list(range(1, saved + 2))), note
    # What a crash in the middle of a write may leave; the resumed run must not trip.
    (run_dir / ".metrics.csv.crash.tmp").write_text("epoch,half a ro")
    (run_dir / "checkpoints" / f"ckpt-{saved + 1}_temp").mkdir()
    (run_dir / "checkpoints" / f"ckpt-{saved + 1}_temp" / "part-00000").write_bytes(b"x")
    (run_dir / "checkpoints" / f"ckpt-{saved + 1}.index.tempstate1").write_bytes(b"x")
    (run_dir / "checkpoints" / f"ckpt-{saved + 1}.data-00000-of-00001").write_bytes(b"x")

    assert main.main(["--resume", str(run_dir)]) == 0, note
    assert rows_without_seconds(run_dir) == rows_without_seconds(reference), note


# 2. NaN or Inf in the loss ---------------------------------------------------


@pytest.mark.slow
def test_huge_learning_rate_stops_at_the_first_non_finite_step(tmp_path, capsys):
    code = run_main("--epochs", "2", "--learning_rate", "1e30", "--results_dir", str(tmp_path))
    assert code == 1
    error = one_error_line(capsys.readouterr())
    assert re.search(
        rf"non-finite training terms at epoch 1, step \d+ of {STEPS}: "
        r"((loss|recon|kl)=(nan|inf|-inf)(, )?)+;",
        error,
    ), error
    assert "No epoch had ended" in error
    run_dir = single_run_dir(tmp_path)
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.csv").exists()


@pytest.mark.slow
def test_a_diverging_run_stops_at_its_first_epoch_in_one_line(tmp_path, capsys):
    """Finite but exploding (the issue's command): stopped like a NaN, nothing saved."""
    flags = ("--learning_rate", "10", "--n_train", "1000", "--epochs", "3", *XLA_OFF)
    assert main.main([*flags, "--iw_samples", "0", "--results_dir", str(tmp_path)]) == 1
    error = one_error_line(capsys.readouterr())
    match = re.search(r"the train bound reached ([\d.e+]+) nats at epoch 1, past (\d+)", error)
    assert match, error
    assert float(match[1]) > float(match[2]) == round(stopping.divergence_bound())
    assert "smaller --learning_rate" in error
    assert not (single_run_dir(tmp_path) / "checkpoints").exists()


def test_the_divergence_bound_is_ten_know_nothing_models():
    # Logits 0 everywhere: log 2 nats per pixel, whatever the image.
    assert stopping.divergence_bound() == pytest.approx(10 * 784 * np.log(2.0), rel=1e-12)


@pytest.mark.slow
def test_nan_keeps_the_last_good_checkpoint_and_resume_works(
    tmp_path, reference, poison_step, monkeypatch, capsys
):
    assert run_main("--epochs", "1", "--results_dir", str(tmp_path)) == 0
    run_dir = single_run_dir(tmp_path)
    before = tree(run_dir, lock=False)

    poison_step(STEPS + 4)  # The 4th step of epoch 2 returns a NaN.
    assert main.main(["--resume", str(run_dir), "--epochs", "3"]) == 1
    error = one_error_line(capsys.readouterr())
    assert f"non-finite training terms at epoch 2, step 4 of {STEPS}: recon=nan;" in error
    assert f"--resume {run_dir}" in error
    # Checkpoint and metrics untouched; config.json records the extension's target.
    after = tree(run_dir, lock=False)
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    assert {**after, "config.json": before["config.json"]} == before

    monkeypatch.undo()
    assert main.main(["--resume", str(run_dir), "--epochs", "3"]) == 0
    assert rows_without_seconds(run_dir) == rows_without_seconds(reference)[:3]


def test_a_checkpoint_is_never_saved_from_non_finite_weights(tmp_path):
    import tensorflow as tf

    model = cvae.CVAE(2, (8, 8, 8, 8))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), tmp_path, 1)
    assert checkpoints.save_checkpoint(manager, model, 1)  # Finite weights: saved.
    before = tree(tmp_path)
    kernel = model.dec_out.kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [float("inf")]))
    with pytest.raises(utils.NonFiniteLoss, match="became NaN or Inf"):
        checkpoints.save_checkpoint(manager, model, 2)
    assert tree(tmp_path) == before


# 3. Bad data ------------------------------------------------------------------


def _idx(array_bytes: bytes, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + array_bytes


def _labels_file(folder: Path) -> Path:
    return folder / data_utils.FILE_NAMES["test_labels"]


def _break(case: str, folder: Path) -> None:
    """Damage the shipped test labels (the smallest file) in a copy of data/mnist."""
    path = _labels_file(folder)
    content = gzip.decompress(path.read_bytes())
    labels = content[8:]
    path.unlink()  # A copy, not a link: the shipped file stays as it is.
    if case == "missing file":
        return
    damaged = {
        "truncated gzip": gzip.compress(content)[:1000],
        "wrong magic": gzip.compress(b"\x00\x00\x0d\x01" + content[4:]),
        "count mismatch": gzip.compress(_idx(labels[:-1], (len(labels) - 1,))),
        "checksum mismatch": gzip.compress(_idx(bytes([9 - labels[0]]) + labels[1:], (10000,))),
    }[case]
    path.write_bytes(damaged)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing folder", "does not exist"),
        ("missing file", "download failed"),
        ("truncated gzip", "truncated or corrupt"),
        ("wrong magic", "bad magic number"),
        ("count mismatch", "9999 labels for 10000 images"),
        ("checksum mismatch", "checksum mismatch"),
    ],
)
def test_bad_data_is_refused_in_one_line_before_anything_is_made(
    tmp_path, monkeypatch, capsys, case, says
):
    # No network in tests: a closed local port refuses at once.
    offline = data_utils.DatasetSpec(
        **{**vars(data_utils.DATASETS["mnist"]), "mirrors": ("http://127.0.0.1:9/",)}
    )
    monkeypatch.setitem(data_utils.DATASETS, "mnist", offline)
    folder = tmp_path / "data"
    if case != "missing folder":
        folder.mkdir()
        for name in data_utils.FILE_NAMES.values():
            (folder / name).symlink_to(PROJECT_DIR / "data" / "mnist" / name)
        _break(case, folder)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    results = tmp_path / "results"
    assert run_main("--data_dir", str(folder), "--results_dir", str(results)) == 1
    error = one_error_line(capsys.readouterr())
    assert says in error
    named = folder if case == "missing folder" else _labels_file(folder)
    assert str(named) in error or (case == "missing file" and str(folder) in error), error
    assert "--data_dir" in error  # Every message names the fix.
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # Nothing made.


def test_files_of_the_other_dataset_are_named_as_such(tmp_path, capsys):
    shipped = PROJECT_DIR / "data" / "mnist"
    argv = ["--dataset", "fashion_mnist", "--data_dir", str(shipped)]
    assert run_main(*argv, "--results_dir", str(tmp_path / "r")) == 1
    error = one_error_line(capsys.readouterr())
    assert "is a mnist file, not a fashion_mnist one" in error
    assert "--dataset" in error
    assert not (tmp_path / "r").exists()


# 4. Unwritable outputs ---------------------------------------------------------


def _unwritable_folders(tmp_path: Path) -> list[Path]:
    folders = []
    if Path("/sys").is_dir():  # sysfs refuses new folders even to root.
        folders.append(Path("/sys/cvae-results"))
    if os.geteuid() != 0:  # Permission bits bind everyone but root.
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        folders.append(locked / "results")
    return folders


def test_results_dir_that_is_a_file_or_unwritable_is_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [(a_file, "is a file"), (a_file / "sub", "is a file")]
    cases += [(folder, "cannot create folders") for folder in _unwritable_folders(tmp_path)]
    before = sorted(tmp_path.rglob("*"))
    for folder, says in cases:
        assert run_main("--results_dir", str(folder)) == 1
        error = one_error_line(capsys.readouterr())
        assert f"--results_dir {folder}" in error and says in error, error
    assert sorted(tmp_path.rglob("*")) == before
