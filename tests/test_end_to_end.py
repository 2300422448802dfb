"""The real script end to end on a few hundred images: the files of a run, other settings
through every canvas, Fashion-MNIST. (Resume and repeatability: test_resume.py.)"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TINY_FLAGS,
    canvas_tiles,
    check_manifold_tiles,
    epoch_canvas,
    epoch_canvas_names,
    read_canvas,
    restore_run_model,
    run_config,
    run_folder_names,
    single_run_dir,
)

import data_utils
import evaluate
import main
import plot
import steps
import train
import utils
from config import Config

pytestmark = pytest.mark.slow  # Every test here runs the script.


def test_run_writes_config_metrics_and_checkpoint(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    for field in dataclasses.fields(Config):
        assert field.name in config
    assert config["add_noise"] is True and config["n_train"] == 300 and config["epochs"] == 2
    assert config["versions"]["tensorflow"].startswith("2.21")

    rows = utils.read_csv(tiny_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert next(iter(rows[0])) == "epoch"
    for key in ("train_loss", "train_recon", "train_kl", "valid_loss", "learning_rate"):
        assert all(np.isfinite(float(r[key])) for r in rows)
    # Each row's learning rate: test_faithful's test_metrics_csv_logs_each_epochs_last_rate.
    # Two epochs of 300 images is enough for the training loss to fall.
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])

    checkpoint_dir = tiny_run / utils.CHECKPOINTS_DIR
    assert (checkpoint_dir / "checkpoint").is_file()
    assert (checkpoint_dir / "ckpt-2.index").is_file()

    # Each metric's value is recomputed from the model in test_eval.py
    # (test_eval_only_reproduces_the_end_of_training_metrics).
    assert json.loads((tiny_run / "metrics.json").read_text())["epochs"] == 2


def test_the_script_itself_runs(tmp_path):
    script = Path(main.__file__)
    argv = [
        *("--n_train", "200", "--epochs", "1", "--n_eval", "100", "--iw_samples", "2"),
        *("--results_dir", str(tmp_path)),
    ]
    result = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=200
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Device: CPU" in result.stdout
    assert "XLA on" in result.stdout  # The default --xla auto compiles on one device.
    # The machines that run the tests have no GPU: the run says TensorFlow's CUDA
    # start-up lines are harmless, right after naming the device.
    lines = result.stdout.splitlines()
    device = next(i for i, line in enumerate(lines) if line.startswith("Device: "))
    assert lines[device + 1] == utils.CPU_ONLY_NOTE
    run_dir = single_run_dir(tmp_path)
    assert f"Run folder: {run_dir}" in result.stdout
    assert "epoch   1/1" in result.stdout and "test -ELBO" in result.stdout
    assert evaluate.GREY_LEVEL_NOTE in result.stdout  # The default --binarize none.
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "metrics.csv",
        "metrics.json",
        "checkpoints",
    }


# --- Other settings through every canvas ------------------------------------------------


def tiny_main(results: Path, *flags: str) -> Path:
    """main.main on the tiny flags for one epoch (`flags` may override); the run folder."""
    assert main.main([*TINY_FLAGS, "--epochs", "1", *flags, "--results_dir", str(results)]) == 0
    return single_run_dir(results)


@pytest.fixture
def latent_maps(monkeypatch) -> list[dict]:
    """The arguments of every plot.plot_latent call (the latent maps drawn)."""
    calls = []
    real_plot_latent = plot.plot_latent

    def record(path, points, labels, class_names, title, *args, **kwargs):
        calls.append({"points": np.asarray(points), "class_names": class_names, "title": title})
        return real_plot_latent(path, points, labels, class_names, title, *args, **kwargs)

    monkeypatch.setattr(plot, "plot_latent", record)
    return calls


def grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    """The pixel size of a canvas of n_rows x n_cols tiles."""
    step = data_utils.IMAGE_SIZE + plot.SEPARATOR
    return n_rows * step - plot.SEPARATOR, n_cols * step - plot.SEPARATOR


@pytest.mark.parametrize(
    ("flags", "manifold", "tiles"),
    [
        (["--n_z", "1"], grid(1, 20), [(0, 0), (0, 19), (0, 7)]),
        (["--n_z", "5", "--manifold_dims", "3", "1"], grid(20, 20), [(0, 0), (19, 19), (4, 15)]),
    ],
    ids=["n_z=1", "n_z=5"],
)
def test_other_latent_sizes_write_every_canvas(tmp_path, latent_maps, flags, manifold, tiles):
    run_dir = tiny_main(tmp_path, *flags, "--add_noise", "True")
    config, model = restore_run_model(run_dir)
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([1], add_noise=True)
    for k in range(10):
        assert read_canvas(epoch_canvas(run_dir, f"manifold_label{k}", 1)).shape == manifold
    # The manifold varies --manifold_dims (z[3] across, z[1] up), or z[0] alone with n_z 1.
    check_manifold_tiles(run_dir, config, model, 1, tiles)
    # The latent map: z[0] against the label with n_z 1, the first two dimensions above 2.
    (latent_map,) = latent_maps
    assert latent_map["points"].shape == (plot.N_LATENT_MAP, min(config.n_z, 2))
    assert ("(first two of 5 dimensions)" in latent_map["title"]) == (config.n_z == 5)


def test_dynamic_binarisation_end_to_end(tmp_path, monkeypatch, capsys, splits):
    """--binarize dynamic: binary training and evaluation images, true likelihoods."""
    built, iw_calls = {"make_train_chunk": [], "make_eval_step": []}, []

    def spy(real):
        def build(*args, **kwargs):
            built[real.__name__].append(inspect.signature(real).bind(*args, **kwargs).arguments)
            return real(*args, **kwargs)

        return build

    real_iw = evaluate.iw_log_likelihoods

    def iw(model, target, *args, **kwargs):
        estimates = real_iw(model, target, *args, **kwargs)
        # The test split's targets are uint8 pixels.
        iw_calls.append((data_utils.as_floats(target), estimates.numpy().astype(np.float64)))
        return estimates

    monkeypatch.setattr(steps, "make_train_chunk", spy(steps.make_train_chunk))
    monkeypatch.setattr(evaluate, "make_eval_step", spy(evaluate.make_eval_step))
    monkeypatch.setattr(evaluate, "iw_log_likelihoods", iw)
    run_dir = tiny_main(tmp_path, "--binarize", "dynamic", "--add_noise", "True")
    out = capsys.readouterr().out

    assert run_dir.name.endswith("_noise_bin-dynamic")
    assert run_config(run_dir).binarize == "dynamic"
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([1], add_noise=True)
    # The training chunk, and the eval steps of validation and test, all binarise.
    assert len(built["make_train_chunk"]) == 1 and len(built["make_eval_step"]) >= 2, built
    (train_call,) = built["make_train_chunk"]
    assert train_call["objective"].binarized is True, built
    assert all(call["binarized"] is True for call in built["make_eval_step"]), built
    # The canvases as documented: the encoder's inputs (noised.png) are binary and noised,
    # original.png the clean grey-level images.
    noised = canvas_tiles(read_canvas(run_dir / "noised.png"))
    assert set(np.unique(noised)) == {0, 255}
    original = read_canvas(run_dir / "original.png")
    inputs = train.make_canvas_inputs(splits.test_images, splits.test_labels, run_config(run_dir))
    np.testing.assert_array_equal(original, plot.tile(inputs.images, 10, 10))
    assert np.mean((original > 0) & (original < 255)) > 0.01  # Grey edges of the strokes.
    # True likelihoods: of binary test images (whatever the encoder's input, every
    # importance-weighted estimate scores them), and so bounded as likelihoods are. The
    # encoder sees the clean image, then the noised one (compute_test_metrics' order).
    metrics = json.loads((run_dir / "metrics.json").read_text())
    labels = splits.test_labels[:200]
    by_input = metrics["by_encoder_input"]
    assert [target.shape for target, _ in iw_calls] == [(200, data_utils.N_PIXELS)] * 2
    for name, (target, log_px_y) in zip(("clean", "noised"), iw_calls, strict=True):
        assert set(np.unique(target)) == {0.0, 1.0}
        # The metrics from the (N, C) estimates, in NumPy: rel 1e-6 for float32 means.
        own = log_px_y[np.arange(200), labels]
        marginal = np.logaddexp.reduce(log_px_y, axis=1) - math.log(10)
        scored = by_input[name]
        assert scored["test_nll_x_given_y"] == pytest.approx(-own.mean(), rel=1e-6), name
        assert scored["test_nll_x"] == pytest.approx(-marginal.mean(), rel=1e-6), name
        error = 100.0 * np.mean(np.argmax(log_px_y, axis=1) != labels)
        assert scored["test_classifier_error"] == pytest.approx(error, rel=1e-12), name
        # −log of a probability is positive; IW is the tighter bound (by about 10 nats
        # on this one-epoch model: far beyond float noise).
        assert 0 < scored["test_nll_x_given_y"] < scored["test_loss"], name
    headline = by_input[metrics["test_encoder_input"]]
    assert {key: metrics[key] for key in headline} == headline
    assert "Test metrics over 200 images" in out
    assert evaluate.GREY_LEVEL_NOTE not in out and "grey-level" not in out


def test_plot_every_3_of_7_epochs_draws_epochs_3_6_and_7(tmp_path):
    # One step per epoch: the epochs are cheap, the canvases are what is tested.
    flags = ["--n_train", "64", "--batch_size", "64", "--epochs", "7", "--plot_every", "3"]
    run_dir = tiny_main(tmp_path, *flags)
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([3, 6, 7], add_noise=False)
    assert {p.name for p in (run_dir / "epochs").iterdir()} == epoch_canvas_names([3, 6, 7])
    # At the top, the newest epoch's canvas of each kind, byte for byte.
    for kind in ("restored", "latent", "manifold_label4"):
        latest = (run_dir / f"{kind}.png").read_bytes()
        assert latest == epoch_canvas(run_dir, kind, 7).read_bytes(), kind
    assert [int(row["epoch"]) for row in utils.read_csv(run_dir / "metrics.csv")] == [*range(1, 8)]


# --- Fashion-MNIST ----------------------------------------------------------------------

FASHION = data_utils.DATASETS["fashion_mnist"]


def idx_file(folder: Path, key: str) -> Path | None:
    """The IDX file of `key` in `folder`, gzipped or not (as data_utils reads them)."""
    gz = folder / data_utils.FILE_NAMES[key]
    return next((path for path in (gz, gz.with_suffix("")) if path.is_file()), None)


FASHION_DIR = data_utils.resolve_data_dir("fashion_mnist", None)  # As main.py picks it.


@pytest.mark.skipif(
    not all(idx_file(FASHION_DIR, key) for key in data_utils.FILE_KEYS),
    reason=f"Fashion-MNIST is not installed in {FASHION.system_dir} (Debian's "
    "dataset-fashion-mnist: .ci/run installs it where apt-get works) nor in "
    f"{FASHION.default_dir}, and tests do not download",
)
def test_fashion_mnist_end_to_end(tmp_path, saved_figures):
    run_dir = tiny_main(tmp_path, "--dataset", "fashion_mnist")
    assert "_fashion_mnist_nz2_" in run_dir.name
    config = run_config(run_dir)
    assert config.dataset == "fashion_mnist" and config.data_dir is None
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([1], add_noise=False)
    # The images are Fashion-MNIST's: original.png shows the test images the run's seed picks.
    test_x = data_utils.read_idx(
        idx_file(FASHION_DIR, "test_images"), FASHION.sha256["test_images"]
    )
    test_labels = data_utils.read_idx(
        idx_file(FASHION_DIR, "test_labels"), FASHION.sha256["test_labels"]
    )
    inputs = train.make_canvas_inputs(
        test_x.reshape(len(test_x), -1), test_labels.astype(np.int32), config
    )
    expected = plot.tile(inputs.images, 10, 10)
    np.testing.assert_array_equal(read_canvas(run_dir / "original.png"), expected)
    # The latent map's legend names the clothes, in label order.
    (latent,) = [f for f in saved_figures if f.axes[0].get_title().startswith("Encoder means")]
    legend = [text.get_text() for text in latent.axes[0].get_legend().get_texts()]
    assert legend == list(FASHION.class_names)
