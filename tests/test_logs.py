"""What a run prints: progress bars on a terminal; in a file (nohup, a cluster job's log)
plain lines only, one per epoch, and a line a minute at most during a long evaluation."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cvae
import evaluate
import utils

EPOCHS = 3
FLAGS = [
    *("--n_train", "300", "--epochs", str(EPOCHS), "--batch_size", "64"),
    *("--n_eval", "100", "--iw_samples", "2", "--xla", "off"),
]
# A line of TensorFlow's C++ log (glog's format): severity and date, time, thread, file.
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] (?P<message>.+)$")
# What TensorFlow says at start-up on a machine without a GPU, and in the log of none of ours.
TF_START_UP_WORDS = ("cuInit", "cuda drivers", "oneDNN", "absl", "cpu_feature_guard")
ESCAPES = ("\x1b", "\r", "\b")  # ANSI codes, and the returns and backspaces of a redrawn bar.


@pytest.mark.slow  # The real script, in its own process.
def test_a_run_logging_to_a_file_writes_plain_lines_one_per_epoch(tmp_path):
    out_path, err_path = tmp_path / "out.log", tmp_path / "err.log"
    argv = [sys.executable, str(utils.PROJECT_DIR / "main.py"), *FLAGS]
    with out_path.open("w") as out, err_path.open("w") as err:
        result = subprocess.run(
            [*argv, "--results_dir", str(tmp_path / "results")],
            cwd=utils.PROJECT_DIR, stdout=out, stderr=err, timeout=200,
        )  # fmt: skip
    log, errors = out_path.read_text(), err_path.read_text()
    assert result.returncode == 0, errors[-3000:]
    assert not [code for code in ESCAPES if code in log], log[:3000]
    lines = log.splitlines()
    assert len(lines) <= EPOCHS + 40, log
    epochs = [line.split()[1] for line in lines if line.startswith("epoch ")]
    assert epochs == [f"{n}/{EPOCHS}" for n in range(1, EPOCHS + 1)], log
    # TensorFlow's start-up lines are on stderr, its business; nothing of ours repeats them.
    assert not set(errors.splitlines()) & set(filter(None, lines))
    messages = [m["message"] for m in map(TF_LOG_LINE.match, errors.splitlines()) if m]
    assert not [message for message in messages if message in log], messages
    assert not [word for word in TF_START_UP_WORDS if word in log], log


class Clock:
    """A clock that the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_in_a_file_progress_is_a_plain_line_at_most_once_an_interval(monkeypatch, capsys):
    monkeypatch.setattr(utils, "interactive", lambda: False)
    clock = Clock()
    progress = utils.Progress(10, "batch", "importance-weighted pass", every=60, clock=clock)
    for done, now in [(1, 10), (2, 59), (3, 61), (4, 62), (5, 120), (6, 130), (10, 400)]:
        clock.now = now
        progress.update(done)
    lines = capsys.readouterr().out.splitlines()
    # At 61 s and 130 s: a minute after the start, then after that line; none at the end.
    assert lines == [
        "importance-weighted pass: batch 3 of 10 after 61 s, about 142 s to go",
        "importance-weighted pass: batch 6 of 10 after 130 s, about 87 s to go",
    ]
    silent = utils.Progress(5, clock=clock)  # No interval: nothing until the end.
    for done in range(1, 6):
        clock.now += 100
        silent.update(done, [("loss", 1.0)])
    assert capsys.readouterr().out == ""


def test_on_a_terminal_progress_is_a_bar(monkeypatch, capsys):
    monkeypatch.setattr(utils, "interactive", lambda: True)
    progress = utils.Progress(4, stateful_metrics=["loss"])
    for done in range(1, 5):
        progress.update(done, [("loss", 2.5)])
    out = capsys.readouterr().out
    assert "4/4" in out and "loss: 2.5" in out


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_interactive_is_whether_stdout_is_a_terminal(monkeypatch, tty):
    monkeypatch.setattr(sys, "stdout", Stream(tty))
    assert utils.interactive() is tty


def test_the_importance_weighted_pass_reports_its_progress_in_a_file(monkeypatch, capsys):
    """Every PROGRESS_SECONDS (here 0: at every batch but the last), one plain line."""
    monkeypatch.setattr(utils, "interactive", lambda: False)
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0.0)
    model = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16))
    x = tf.constant(np.random.default_rng(0).uniform(size=(12, 784)).astype(np.float32))
    evaluate.iw_log_likelihoods(model, x, 2, seed=7, images_per_batch=4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" after ")[0] for line in lines] == [
        "importance-weighted pass: batch 1 of 3",
        "importance-weighted pass: batch 2 of 3",
    ]
    assert not [code for code in ESCAPES if code in "".join(lines)]
