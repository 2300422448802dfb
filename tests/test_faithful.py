"""Where the README says "as the original": the split, Adam's ε, the per-step decay,
and the settings a run keeps across --resume and --eval_only."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import XLA_OFF, single_run_dir

import cvae
import data_utils
import main
import train
import utils


def test_validation_is_the_first_5000_training_images_as_in_the_original(splits):
    raw = data_utils.load_dataset("mnist")  # The same files, split again.
    spec = data_utils.DATASETS["mnist"]
    folder = spec.default_dir
    images = data_utils.read_idx(folder / data_utils.FILE_NAMES["train_images"])
    labels = data_utils.read_idx(folder / data_utils.FILE_NAMES["train_labels"])
    assert np.array_equal(raw.valid_images, images[:5_000].reshape(5_000, -1))
    assert np.array_equal(raw.valid_y, labels[:5_000])
    assert np.array_equal(raw.train_images, images[5_000:].reshape(55_000, -1))
    assert np.array_equal(raw.train_y, labels[5_000:])
    assert np.array_equal(splits.train_images, raw.train_images)


def test_adam_epsilon_is_tf1s():
    config = main.parse_args(["--n_hidden", "8", "--n_train", "300"])
    state = train.build_state(config)
    assert state.optimizer.epsilon == 1e-8 == cvae.ADAM_EPSILON


def test_the_rate_adam_used_at_each_step_decays_smoothly():
    """Adam's update of a weight whose gradient is always 1 is the step's learning rate
    (m̂/√v̂ = 1; ε = 1e-8 changes it by 1e-8 relative): read the rate actually used."""
    initial, decay, steps_per_epoch = 1e-3, 0.5, 4  # A fast decay: each step is distinct.
    optimizer = cvae.FusedAdam(cvae.learning_rate_schedule(initial, decay, steps_per_epoch))
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


def test_metrics_csv_logs_each_epochs_last_rate(tiny_run):
    config = main.Config.from_json(json.loads((tiny_run / "config.json").read_text()))
    steps = config.steps_per_epoch
    assert steps == 5  # 300 images in batches of 64, the last one padded
    for row in utils.read_csv(tiny_run / "metrics.csv"):
        last_step = int(row["epoch"]) * steps - 1
        expected = config.learning_rate * config.lr_decay ** (last_step / steps)
        # The schedule runs in float32: its value is exact to about 1e-7 relative.
        assert float(row["learning_rate"]) == pytest.approx(expected, rel=1e-6)


def test_eval_only_keeps_the_runs_own_evaluation_settings(tiny_run):
    saved = json.loads((tiny_run / "config.json").read_text())
    assert (saved["iw_samples"], saved["n_eval"]) == (5, 200)
    config = main.parse_args(["--eval_only", str(tiny_run)])
    assert (config.iw_samples, config.n_eval) == (5, 200)
    given = main.parse_args(["--eval_only", str(tiny_run), "--n_eval", "9"])
    assert (given.iw_samples, given.n_eval) == (5, 9)


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


def test_results_dir_defaults_to_results_in_the_working_directory(tmp_path, monkeypatch):
    assert main.parse_args([]).results_dir == "results"
    monkeypatch.chdir(tmp_path)
    flags = ["--n_train", "64", "--batch_size", "32", "--epochs", "1", "--n_hidden", "16"]
    # No --results_dir:
    assert main.main([*flags, *XLA_OFF, "--n_eval", "20", "--iw_samples", "0"]) == 0
    run_dir = single_run_dir(tmp_path / "results")
    assert (run_dir / "metrics.json").is_file()
