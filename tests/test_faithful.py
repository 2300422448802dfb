"""Where the README says "as the original": Adam's ε and the per-step decay. (The split:
test_data.py; the settings a run keeps across --resume and --eval_only: test_flags.py and
test_resume.py.)"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import XLA_OFF, single_run_dir

import checkpoints
import main
import steps
import utils
from config import Config


def test_adam_epsilon_is_tf1s():
    config = main.parse_args(["--n_hidden", "8", "--n_train", "300"])
    state = checkpoints.build_state(config)
    assert state.optimizer.epsilon == 1e-8 == steps.ADAM_EPSILON


def test_the_rate_adam_used_at_each_step_decays_smoothly():
    """Adam's update of a weight whose gradient is always 1 is the step's learning rate
    (m̂/√v̂ = 1; ε = 1e-8 changes it by 1e-8 relative): read the rate actually used."""
    initial, decay, steps_per_epoch = 1e-3, 0.5, 4  # A fast decay: each step is distinct.
    optimizer = steps.FusedAdam(steps.learning_rate_schedule(initial, decay, steps_per_epoch))
    weight = keras.Variable(np.float64(0.0))
    optimizer.build([weight])
    used = []
    for _ in range(9):
        before = float(weight.numpy())
        optimizer.apply_gradients([(tf.constant(1.0, tf.float64), weight)])
        used.append(before - float(weight.numpy()))
    expected = [initial * decay ** (step / steps_per_epoch) for step in range(9)]
    # Keras evaluates the schedule in float32 (a power and a division: a few roundings
    # of u = 6e-8, 2.7e-7 seen); the float64 weight adds 1e-16. A rate changed once
    # per epoch instead would be off by up to 16 % here.
    np.testing.assert_allclose(used, expected, rtol=1e-6)
    # Not once per epoch: steps 1..3 of the first epoch already use a lower rate.
    assert used[1] < used[0] and used[3] < used[2]


@pytest.mark.slow
def test_metrics_csv_logs_each_epochs_last_rate(tiny_run):
    config = Config.from_json(json.loads((tiny_run / "config.json").read_text()))
    n_steps = config.steps_per_epoch
    assert n_steps == 5  # 300 images in batches of 64, the last one padded
    for row in utils.read_csv(tiny_run / "metrics.csv"):
        last_step = int(row["epoch"]) * n_steps - 1
        expected = config.learning_rate * config.lr_decay ** (last_step / n_steps)
        # The schedule runs in float32: its value is exact to about 1e-7 relative.
        assert float(row["learning_rate"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_results_dir_defaults_to_results_in_the_working_directory(tmp_path, monkeypatch):
    assert main.parse_args([]).results_dir == "results"
    monkeypatch.chdir(tmp_path)
    flags = ["--n_train", "64", "--batch_size", "32", "--epochs", "1", "--n_hidden", "16"]
    # No --results_dir:
    assert main.main([*flags, *XLA_OFF, "--n_eval", "20", "--iw_samples", "0"]) == 0
    run_dir = single_run_dir(tmp_path / "results")
    assert (run_dir / "metrics.json").is_file()
