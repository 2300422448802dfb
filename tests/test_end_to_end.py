"""The real script end to end on a few hundred images: files, resume, repeatability."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY_FLAGS,
    canvas_tiles,
    check_manifold_tiles,
    read_canvas,
    restore_run_model,
    rows_without_seconds,
    run_config,
    run_folder_names,
    single_run_dir,
    whole_and_resumed_runs,
)

import cvae
import data_utils
import main
import plot
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
    # The decay is smooth, per step (README, "The model"): a row holds the rate of its
    # epoch's last step, 1e-4 · 0.98^(step / steps per epoch), steps counted from 0.
    # Keras computes it in float32: a few ulps, hence 1e-6; one step off is 0.4% off.
    steps = -(-300 // 64)
    for row in rows:
        last_step = int(row["epoch"]) * steps - 1
        expected = 1e-4 * 0.98 ** (last_step / steps)
        np.testing.assert_allclose(float(row["learning_rate"]), expected, rtol=1e-6)
    # Two epochs of 300 images is enough for the training loss to fall.
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])

    checkpoints = tiny_run / "checkpoints"
    assert (checkpoints / "checkpoint").is_file()
    assert (checkpoints / "ckpt-2.index").is_file()

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    # Each metric's value is recomputed from the model in test_eval.py
    # (test_eval_only_reproduces_the_end_of_training_metrics).
    assert np.isfinite(metrics["test_loss"]) and metrics["test_loss"] > 0


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


@pytest.mark.parametrize(
    "objective",
    [
        ["--add_noise", "True", "--train_samples", "2"],
        ["--binarize", "dynamic", "--n_labeled", "50"],
    ],
    ids=["noise-iwae", "m2"],
)
def test_a_compiled_run_resumes_exactly(objective, tmp_path, capsys):
    """The default path, each chunk compiled by XLA with threefry draws: a run resumed
    after epoch 1 repeats the uninterrupted one to the last bit, as without XLA. The
    other tests' small runs say --xla off; these two compile the K-sample bound and M2."""
    flags = [
        *("--n_train", "150", "--batch_size", "64", "--seed", "3", *objective),  # A padded step.
        *("--n_eval", "50", "--iw_samples", "0", "--plot_every", "10", "--xla", "auto"),
    ]
    whole, resumed = whole_and_resumed_runs(flags, tmp_path)
    assert capsys.readouterr().out.count("XLA on") == 3  # The whole, the first, the resumed.
    assert rows_without_seconds(resumed) == rows_without_seconds(whole)
    saved, expected = (json.loads((run / "metrics.json").read_text()) for run in (resumed, whole))
    assert saved["test_loss"] == expected["test_loss"]


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
    assert "XLA on" in result.stdout  # The default --xla auto compiles on one device.
    # The machines that run the tests have no GPU: the run says TensorFlow's CUDA
    # start-up lines are harmless, right after naming the device.
    lines = result.stdout.splitlines()
    device = next(i for i, line in enumerate(lines) if line.startswith("Device: "))
    assert lines[device + 1] == utils.CPU_ONLY_NOTE
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
        assert read_canvas(run_dir / f"manifold_label{k}_epoch001.png").shape == manifold
    # The manifold varies --manifold_dims (z[3] across, z[1] up), or z[0] alone with n_z 1.
    check_manifold_tiles(run_dir, config, model, 1, tiles)
    # The latent map: z[0] against the label with n_z 1, the first two dimensions above 2.
    (latent_map,) = latent_maps
    assert latent_map["points"].shape == (plot.N_LATENT_MAP, min(config.n_z, 2))
    assert ("(first two of 5 dimensions)" in latent_map["title"]) == (config.n_z == 5)


def test_dynamic_binarisation_end_to_end(tmp_path, monkeypatch, capsys):
    """--binarize dynamic: binary training and evaluation images, true likelihoods."""
    built, iw_targets = {"make_train_chunk": [], "make_eval_step": []}, []

    def spy(real):
        def build(*args, **kwargs):
            built[real.__name__].append(inspect.signature(real).bind(*args, **kwargs).arguments)
            return real(*args, **kwargs)

        return build

    real_iw = cvae.iw_log_likelihoods

    def iw(model, target, *args, **kwargs):
        iw_targets.append(data_utils.as_floats(target))  # The test split's are uint8 pixels.
        return real_iw(model, target, *args, **kwargs)

    for name in built:
        monkeypatch.setattr(cvae, name, spy(getattr(cvae, name)))
    monkeypatch.setattr(cvae, "iw_log_likelihoods", iw)
    run_dir = tiny_main(tmp_path, "--binarize", "dynamic", "--add_noise", "True")
    out = capsys.readouterr().out

    assert run_dir.name.endswith("_noise_bin-dynamic")
    assert run_config(run_dir).binarize == "dynamic"
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([1], add_noise=True)
    # The training chunk, and the eval steps of validation and test, all binarise.
    assert len(built["make_train_chunk"]) == 1 and len(built["make_eval_step"]) >= 2, built
    (train_call,) = built["make_train_chunk"]
    assert train_call["objective"].binarize is True, built
    assert all(call["binarize"] is True for call in built["make_eval_step"]), built
    # The canvases as documented: the encoder's inputs (noised.png) are binary and noised,
    # original.png the clean grey-level images.
    noised = canvas_tiles(read_canvas(run_dir / "noised.png"))
    assert set(np.unique(noised)) == {0, 255}
    original = canvas_tiles(read_canvas(run_dir / "original.png"))
    assert np.mean((original > 0) & (original < 255)) > 0.01  # Grey edges of the strokes.
    # True likelihoods: of binary test images (whatever the encoder's input, every
    # importance-weighted estimate scores them), and so bounded as likelihoods are.
    assert iw_targets
    for target in iw_targets:
        assert target.shape == (200, data_utils.N_PIXELS)
        assert set(np.unique(target)) == {0.0, 1.0}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    nll_y, nll = metrics["test_nll_x_given_y"], metrics["test_nll_x"]
    # −log of a probability is positive; IW is the tighter bound (by about 10 nats on
    # this one-epoch model: far beyond float noise).
    assert 0 < nll_y < metrics["test_loss"]
    assert nll <= nll_y + math.log(10)  # p(x) >= p(x|y) / 10.
    assert 0.0 <= metrics["test_classifier_error"] <= 100.0
    assert "Test metrics over 200 images" in out
    assert train.GREY_LEVEL_NOTE not in out and "grey-level" not in out


def test_plot_every_3_of_7_epochs_draws_epochs_3_6_and_7(tmp_path):
    # One step per epoch: the epochs are cheap, the canvases are what is tested.
    flags = ["--n_train", "64", "--batch_size", "64", "--epochs", "7", "--plot_every", "3"]
    run_dir = tiny_main(tmp_path, *flags)
    assert {p.name for p in run_dir.iterdir()} == run_folder_names([3, 6, 7], add_noise=False)
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
    test_y = data_utils.read_idx(
        idx_file(FASHION_DIR, "test_labels"), FASHION.sha256["test_labels"]
    )
    inputs = train.make_canvas_inputs(
        test_x.reshape(len(test_x), -1), test_y.astype(np.int32), config
    )
    expected = plot.tile(inputs.images, 10, 10)
    np.testing.assert_array_equal(read_canvas(run_dir / "original.png"), expected)
    # The latent map's legend names the clothes, in label order.
    (latent,) = [f for f in saved_figures if f.axes[0].get_title().startswith("Encoder means")]
    legend = [text.get_text() for text in latent.axes[0].get_legend().get_texts()]
    assert legend == list(FASHION.class_names)


def test_readme_data_section_names_the_fashion_mnist_classes():
    readme = (utils.PROJECT_DIR / "README.md").read_text()
    data_section = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    words = " ".join(data_section.split())  # Lines joined, as Markdown reads them.
    assert "fashion_mnist" in words and ", ".join(FASHION.class_names) in words
