"""The TensorBoard events of a run (tb/): what they hold, read back with TensorFlow's own
event reader, and that each value is there once, also after a kill -9 and --resume."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf
from helpers import CANVAS_KINDS, TINY_FLAGS, run_config, single_run_dir
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

import main
import summaries
import utils
from config import Config

EPOCH_SCALARS = [
    *("loss/train", "recon/train", "kl/train", "loss/valid", "recon/valid", "kl/valid"),
    *("learning_rate", "seconds"),
]
TEST_SCALARS = ["test/loss", "test/recon", "test/kl", "test/nll_x_given_y", "test/nll_x"]
TEST_SCALARS += ["test/classifier_error"]
TEST_SCALARS += [f"denoise/{m}_{c}" for m in ("psnr", "bce") for c in ("noised", "median", "cvae")]
TEST_SCALARS += ["eval/epochs", "eval/n_eval", "eval/iw_samples"]  # The evaluation's settings.
HPARAMS_TAGS = ["_hparams_/experiment", "_hparams_/session_start_info"]


def read_events(folder: Path) -> list[tuple[str, int, object]]:
    """Every value of the event files in `folder` as (tag, step, value), read by
    TensorBoard's own loader: each file up to a record cut short, if any."""
    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            found += [(value.tag, event.step, value) for value in event.summary.value]
    return found


def steps_by_tag(values: list[tuple[str, int, object]]) -> dict[str, list[int]]:
    """{tag: its steps, sorted}, after checking that no (tag, step) is there twice."""
    counts = Counter((tag, step) for tag, step, _ in values)
    twice = sorted(key for key, n in counts.items() if n > 1)
    assert not twice, f"written more than once: {twice}"
    steps: dict[str, list[int]] = {}
    for tag, step in sorted(counts):
        steps.setdefault(tag, []).append(step)
    return steps


def expected_steps(epochs: int, canvas_epochs: list[int], evaluated: list[int]) -> dict:
    """The tags of a denoising run and their steps."""
    steps = {tag: list(range(1, epochs + 1)) for tag in EPOCH_SCALARS}
    steps |= {f"canvas/{kind}": canvas_epochs for kind in CANVAS_KINDS}
    steps |= {"canvas/original": canvas_epochs[:1], "canvas/noised": canvas_epochs[:1]}
    steps |= {tag: evaluated for tag in [*TEST_SCALARS, "config"]}
    steps |= {tag: [0] for tag in HPARAMS_TAGS}  # Once per run, at its start.
    return steps


# --- A run killed while it wrote an epoch's events, then resumed -----------------------

# The real script, killed (SIGKILL) in the middle of writing epoch 2's events, after half
# of them reached the file: after the epoch's checkpoint, so that the resume trains on
# from epoch 3 and must write the other half of epoch 2 itself, and nothing twice.
KILLER = """
import os, signal, sys
sys.path.insert(0, {project!r})
import utils  # First, as in every entry point: it quiets TensorFlow's start-up.
import summaries

real_write = summaries.EventLog.write

def write(self, step, items):
    items = list(items)
    if step == {epoch}:
        real_write(self, step, items[: len(items) // 2])  # Written and flushed.
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, step, items)

summaries.EventLog.write = write
import main
sys.exit(main.main(sys.argv[1:]))
"""
KILLED_EPOCH = 2
FLAGS = [*TINY_FLAGS, "--epochs", "3", "--plot_every", "2", "--add_noise", "True"]


class Resumed(NamedTuple):
    run_dir: Path
    at_the_kill: dict[str, list[int]]  # The events' {tag: steps} when the process died.
    out: str  # What the resume printed.
    err: str


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Resumed:
    work = tmp_path_factory.mktemp("killed")
    script = work / "killed_amid_its_events.py"
    script.write_text(KILLER.format(project=str(utils.PROJECT_DIR), epoch=KILLED_EPOCH))
    results = work / "results"
    killed = subprocess.run(
        [sys.executable, str(script), *FLAGS, "--results_dir", str(results)],
        cwd=utils.PROJECT_DIR, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = single_run_dir(results)
    at_the_kill = steps_by_tag(read_events(run_dir / "tb"))
    assert tf.train.latest_checkpoint(run_dir / "checkpoints").endswith(f"ckpt-{KILLED_EPOCH}")
    # And a record cut short, as a kill in the middle of a write leaves it.
    (events,) = (run_dir / "tb").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-5])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main.main(["--resume", str(run_dir)]) == 0
    return Resumed(run_dir, at_the_kill, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_a_kill_9_amid_the_events_then_resume_writes_each_value_once(resumed):
    # At the kill: epoch 1 whole, part of epoch 2 (the checkpoint before it), nothing after.
    killed = resumed.at_the_kill
    assert all(killed[tag] == [1, KILLED_EPOCH] for tag in EPOCH_SCALARS), killed
    assert killed["canvas/analogy"] == [KILLED_EPOCH]  # The first half: scalars, 4 canvases.
    assert "canvas/restored" not in killed and "config" not in killed  # The second: not yet.
    # The resume said what it read and what it wrote.
    damaged = [line for line in resumed.err.splitlines() if line.startswith("warning:")]
    assert len(damaged) == 1 and "is damaged after" in damaged[0], resumed.err
    assert f"TensorBoard: wrote the values of epoch(s) [{KILLED_EPOCH}]" in resumed.out
    # Every value once (steps_by_tag checks), at its epoch: canvases at the canvas
    # epochs (every 2nd, and the last), test metrics and flags after the last.
    steps = steps_by_tag(read_events(resumed.run_dir / "tb"))
    assert steps == expected_steps(3, canvas_epochs=[2, 3], evaluated=[3])


@pytest.mark.slow
def test_the_events_hold_the_runs_records(resumed):
    run_dir = resumed.run_dir
    values = {(tag, step): value for tag, step, value in read_events(run_dir / "tb")}
    # The scalars: metrics.csv's rows (in float32, TensorBoard's type) and metrics.json.
    for row in utils.read_csv(run_dir / "metrics.csv"):
        epoch = int(row["epoch"])
        for column, tag in [("train_loss", "loss/train"), ("valid_kl", "kl/valid")]:
            scalar = tf.make_ndarray(values[tag, epoch].tensor)
            assert scalar == np.float32(row[column]), (tag, epoch)
        seconds = tf.make_ndarray(values["seconds", epoch].tensor)
        assert seconds == np.float32(row["seconds"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_loss", "test_nll_x", "denoise_psnr_cvae"):
        group, _, name = key.partition("_")
        assert tf.make_ndarray(values[f"{group}/{name}", 3].tensor) == np.float32(metrics[key])
    # The canvases: the very pixels of the PNGs, the latent map's colours included.
    pngs = [("epochs/restored_epoch002", 2), ("epochs/latent_epoch003", 3), ("original", 2)]
    for name, step in pngs:
        kind = name.split("_epoch")[0].removeprefix("epochs/")
        width, height, png = values[f"canvas/{kind}", step].tensor.string_val
        expected = tf.io.decode_png((run_dir / f"{name}.png").read_bytes()).numpy()
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), expected, err_msg=name)
        assert (int(width), int(height)) == (expected.shape[1], expected.shape[0])
    # The flags: config.json as a table.
    text = values["config", 3].tensor.string_val[0].decode()
    config = json.loads((run_dir / "config.json").read_text())
    for flag in ("n_z", "epochs", "add_noise", "plot_every"):
        assert f"| {flag} | {json.dumps(config[flag])} |" in text, text
    assert f"| versions.tensorflow | {tf.__version__} |" in text


@pytest.mark.slow
def test_an_extension_appends_to_the_same_curves(resumed, tmp_path):
    run_dir = tmp_path / resumed.run_dir.name
    shutil.copytree(resumed.run_dir, run_dir)
    assert main.main(["--resume", str(run_dir), "--epochs", "4"]) == 0
    steps = steps_by_tag(read_events(run_dir / "tb"))
    assert steps == expected_steps(4, canvas_epochs=[2, 3, 4], evaluated=[3, 4])


def session_start_info(values) -> api_pb2.SessionStartInfo:
    """The one session_start_info (a run's hparams) of `read_events`' values."""
    (info,) = [v for tag, _, v in values if tag == hparams_metadata.SESSION_START_INFO_TAG]
    return hparams_metadata.parse_session_start_info_plugin_data(info.metadata.plugin_data.content)


@pytest.mark.slow
def test_the_hparams_are_the_runs_flags_beside_its_metrics(resumed):
    run_dir = resumed.run_dir
    values = read_events(run_dir / "tb")
    info = session_start_info(values)  # Once, though the run was killed and resumed.
    hparams = {
        name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()
    }
    assert hparams == summaries.hparams_of(run_config(run_dir))
    assert hparams["add_noise"] is True and hparams["n_train"] == 300  # The run's flags.
    assert info.group_name == run_dir.name  # Each run its own row, named by its folder.
    # Every column of the dashboard that a denoising run has (not M2's q(y|x)) is a scalar
    # of its events, at the epoch evaluated.
    last = {tag: step for tag, step, _ in values}
    assert set(summaries.HPARAMS_METRICS) - set(last) == {"test/q_error"}
    assert all(last[tag] == 3 for tag in summaries.HPARAMS_METRICS if tag in last)


@pytest.mark.slow
def test_eval_only_writes_no_second_hparams_and_completes_a_folder_without_them(resumed, tmp_path):
    run_dir = tmp_path / resumed.run_dir.name
    shutil.copytree(resumed.run_dir, run_dir)
    argv = ["--eval_only", str(run_dir), "--n_eval", "50", "--iw_samples", "2"]
    assert main.main(argv) == 0
    steps = steps_by_tag(read_events(run_dir / "tb"))  # Each (tag, step) once.
    assert steps == expected_steps(3, canvas_epochs=[2, 3], evaluated=[3])
    # A run folder whose events lack the hparams, as one made before them: --eval_only
    # writes them, with every other value it lacks.
    shutil.rmtree(run_dir / "tb")
    assert main.main(argv) == 0
    values = read_events(run_dir / "tb")
    assert steps_by_tag(values) == expected_steps(3, canvas_epochs=[2, 3], evaluated=[3])
    assert session_start_info(values).group_name == run_dir.name


# --- The event log alone ------------------------------------------------------------------


def test_metrics_become_tags():
    row = {"epoch": "3", "train_loss": "201.5", "valid_kl": 4.25, "learning_rate": "1e-4"}
    assert summaries.epoch_scalars(row) == {
        "loss/train": 201.5,
        "kl/valid": 4.25,
        "learning_rate": 1e-4,
    }
    metrics = {
        "epochs": 3,
        "n_eval": 100,
        "test_loss": 150.0,
        "test_nll_x": None,  # Not computed: left out.
        "test_encoder_input": "clean",
        "by_encoder_input": {"clean": {"test_loss": 150.0}},
        "denoise_psnr_cvae": 14,
        "eval_seconds": 3.5,
    }
    assert summaries.final_scalars(metrics) == {
        "eval/epochs": 3.0,
        "eval/n_eval": 100.0,
        "test/loss": 150.0,
        "denoise/psnr_cvae": 14.0,
    }
    text = summaries.flags_text({"n_hidden": [500], "data_dir": None, "v": {"a|b": "1"}})
    assert text.splitlines() == [
        "| flag | value |",
        "| --- | --- |",
        "| n_hidden | [500] |",
        "| data_dir | null |",
        "| v.a\\|b | 1 |",
    ]


def scalars(**values: float) -> list[summaries.Summary]:
    return [summaries.Summary(tag, "scalar", value) for tag, value in values.items()]


def test_each_value_is_written_once_and_the_events_only_when_needed(tmp_path):
    events = summaries.EventLog(tmp_path)
    assert events.write(1, []) == []
    assert not (tmp_path / "tb").exists()  # Nothing to write: no events file.
    assert events.write(1, scalars(a=1.0, b=2.0)) == ["a", "b"]
    assert events.write(1, scalars(a=5.0, c=3.0)) == ["c"]  # a is there already.
    events.close()
    again = summaries.EventLog(tmp_path)  # As a resumed run: it reads what is there.
    assert again.write(1, scalars(a=7.0, b=7.0, c=7.0)) == []
    assert again.write(2, scalars(a=4.0)) == ["a"]
    again.close()
    assert steps_by_tag(read_events(tmp_path / "tb")) == {"a": [1, 2], "b": [1], "c": [1]}
    assert len(list((tmp_path / "tb").iterdir())) == 2  # One file per process that wrote.


@pytest.mark.parametrize("damage", ["cut short", "garbage"])
def test_a_damaged_events_file_is_one_warning_and_its_lost_values_are_written_again(
    tmp_path, capsys, damage
):
    events = summaries.EventLog(tmp_path)
    for step in (1, 2, 3):
        events.write(step, scalars(a=float(step)))
    events.close()
    (path,) = (tmp_path / "tb").iterdir()
    data = path.read_bytes()
    path.write_bytes(data[:-3] if damage == "cut short" else b"not an events file" * 9)
    again = summaries.EventLog(tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.match(rf"warning: {re.escape(str(path))} is damaged", lines[0])
    lost = [3] if damage == "cut short" else [1, 2, 3]
    assert [step for step in (1, 2, 3) if again.write(step, scalars(a=0.0))] == lost
    again.close()
    assert steps_by_tag(read_events(tmp_path / "tb")) == {"a": [1, 2, 3]}


def test_events_that_cannot_be_written_are_one_warning_and_the_run_goes_on(tmp_path, capsys):
    (tmp_path / "tb").write_text("a file where the folder should be")
    events = summaries.EventLog(tmp_path)
    assert events.write(1, scalars(a=1.0)) == []
    assert events.write(2, scalars(a=1.0)) == []  # No second attempt, no second warning.
    events.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: cannot write TensorBoard events")
    assert "--resume" in lines[0]


# --- The HParams dashboard ----------------------------------------------------------------


def test_a_runs_hparams_are_the_flags_that_define_it():
    config = Config(n_z=5, kl_weight=0.5, n_hidden=(400, 400, 300, 300), n_train=3000)
    values = summaries.hparams_of(config)
    assert values["n_z"] == 5 and values["kl_weight"] == 0.5 and values["binarize"] == "none"
    assert values["n_hidden"] == "400 400 300 300"  # As typed.
    # Absent flags as what they mean: every training image, all labelled; no --features.
    assert values["n_train"] == values["n_labeled"] == 3000 and values["features"] == ""
    assert summaries.hparams_of(Config())["n_train"] == 55_000
    assert all(isinstance(v, bool | int | float | str) for v in values.values())
    # Not the flags a resume or --eval_only may change: hparams are written once.
    changeable = {"epochs", "resume", "eval_only", "iw_samples", "n_eval", "xla", "strategy"}
    assert not changeable & set(values)
    assert not {"data_dir", "results_dir", "plot_every", "z_range", "manifold_dims"} & set(values)


def test_the_dashboards_metrics_are_tags_that_runs_write():
    metrics = {"epochs": 3, "n_eval": 100, "iw_samples": 5, "denoise_psnr_cvae": 13.0}
    metrics |= {f"test_{k}": 1.0 for k in ("loss", "nll_x_given_y", "nll_x", "q_error")}
    metrics["test_classifier_error"] = 5.0
    tags = set(summaries.final_scalars(metrics))
    tags |= set(summaries.epoch_scalars({"epoch": 3, "valid_loss": 100.0}))
    assert set(summaries.HPARAMS_METRICS) <= tags


def test_hparams_are_written_once_per_run_and_read_back(tmp_path):
    config = Config(n_z=8, kl_weight=0.25, binarize="dynamic")
    run_dir = tmp_path / "20260101-000000_mnist_nz8_h500"
    events = summaries.EventLog(run_dir)
    assert events.write_hparams(config) == [
        hparams_metadata.EXPERIMENT_TAG,
        hparams_metadata.SESSION_START_INFO_TAG,
    ]
    assert events.write_hparams(config) == []
    events.close()
    again = summaries.EventLog(run_dir)  # A resume, or --eval_only: nothing conflicting.
    assert again.write_hparams(Config(n_z=3)) == []
    again.close()
    values = read_events(run_dir / "tb")
    assert steps_by_tag(values) == {tag: [0] for tag in HPARAMS_TAGS}
    info = session_start_info(values)
    assert info.group_name == run_dir.name
    assert info.hparams["n_z"].number_value == 8 and info.hparams["kl_weight"].number_value == 0.25
    assert info.hparams["binarize"].string_value == "dynamic"
    assert info.hparams["add_noise"].bool_value is False
    # The dashboard's columns: the hparams with their types, the metrics in their order.
    (experiment,) = [v for tag, _, v in values if tag == hparams_metadata.EXPERIMENT_TAG]
    experiment = hparams_metadata.parse_experiment_plugin_data(
        experiment.metadata.plugin_data.content
    )
    infos = {info.name: info for info in experiment.hparam_infos}
    assert set(infos) == set(summaries.hparams_of(config))
    assert infos["n_z"].type == infos["kl_weight"].type == api_pb2.DATA_TYPE_FLOAT64
    assert infos["add_noise"].type == api_pb2.DATA_TYPE_BOOL
    assert set(infos["binarize"].domain_discrete) == {"none", "dynamic"}
    # TensorBoard shows five columns first, those that differ: the main flags.
    assert {name for name, info in infos.items() if info.differs} == set(summaries.FIRST_HPARAMS)
    metric_tags = [metric.name.tag for metric in experiment.metric_infos]
    assert metric_tags == list(summaries.HPARAMS_METRICS)


def test_the_evaluations_settings_go_only_with_the_metrics_they_describe(tmp_path):
    metrics = {"epochs": 3, "n_eval": 50, "iw_samples": 2, "test_loss": 150.0}
    old = summaries.EventLog(tmp_path / "old")  # A run evaluated before eval/... existed,
    old.write(3, scalars(**{"test/loss": 140.0}))  # on other settings, then --eval_only.
    assert old.write_final(3, metrics, {}) == ["config"]
    old.close()
    new = summaries.EventLog(tmp_path / "new")
    written = new.write_final(3, metrics, {})
    new.close()
    assert sorted(written) == [
        "config",
        "eval/epochs",
        "eval/iw_samples",
        "eval/n_eval",
        "test/loss",
    ]
