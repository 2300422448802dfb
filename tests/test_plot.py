"""Canvases and plots: tiling, PNG writing, colour pairing, the model-side arrays, and
every file of a run folder."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import tensorflow as tf
from helpers import CANVAS_KINDS, check_manifold_tiles, restore_run_model, run_config

import cvae
import data_utils
import draws
import main
import plot
import train
import utils
from config import Config

SIDE = data_utils.IMAGE_SIZE


def grid_shape(n_rows: int, n_cols: int, h: int = SIDE, w: int = SIDE) -> tuple[int, int]:
    sep = plot.SEPARATOR
    return n_rows * h + (n_rows - 1) * sep, n_cols * w + (n_cols - 1) * sep


# --- tiling ---------------------------------------------------------------------------


def test_tile_puts_each_image_in_its_block_with_separators_between():
    h, w, n_rows, n_cols = 4, 5, 2, 3
    rng = np.random.default_rng(0)
    # Values avoid the separator's grey, so that every grey pixel is a separator.
    images = rng.integers(0, 100, size=(n_rows * n_cols, h, w)).astype(np.uint8)
    canvas = plot.tile(images, n_rows, n_cols, separator=1, separator_value=128)

    assert canvas.dtype == np.uint8
    assert canvas.shape == (2 * 4 + 1, 3 * 5 + 2)
    # Image 4 is row 1, column 1: rows 5..8, columns 6..10.
    np.testing.assert_array_equal(canvas[5:9, 6:11], images[4])
    for index, image in enumerate(images):
        top, left = (index // n_cols) * (h + 1), (index % n_cols) * (w + 1)
        np.testing.assert_array_equal(canvas[top : top + h, left : left + w], image)
    separator = np.zeros(canvas.shape, dtype=bool)
    separator[4, :] = True
    separator[:, [5, 11]] = True
    np.testing.assert_array_equal(canvas == 128, separator)


def test_tile_takes_flattened_floats_and_scales_them_to_uint8():
    images = np.zeros((6, SIDE * SIDE), dtype=np.float32)
    images[1] = 1.0
    images[2] = 0.5
    images[3] = 1.7  # Out of range: clipped, not wrapped around.
    canvas = plot.tile(images, 2, 3)
    assert canvas.dtype == np.uint8
    assert canvas.shape == grid_shape(2, 3)
    step = SIDE + plot.SEPARATOR
    assert np.all(canvas[:SIDE, :SIDE] == 0)
    assert np.all(canvas[:SIDE, step : step + SIDE] == 255)
    assert np.all(canvas[:SIDE, 2 * step : 2 * step + SIDE] == 128)
    assert np.all(canvas[step : step + SIDE, :SIDE] == 255)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((5, 784)), "needs 6 images"),
        (np.zeros((6, 780)), "not square"),
        (np.full((6, 784), np.nan), "NaN"),
        (np.zeros(6), "expected images of shape"),
    ],
)
def test_tile_rejects_bad_input_with_a_clear_message(images, message):
    with pytest.raises(ValueError, match=message):
        plot.tile(images, 2, 3)


def test_save_grid_writes_the_exact_canvas_as_an_8_bit_png(tmp_path):
    images = np.random.default_rng(1).random((12, SIDE, SIDE))
    path = tmp_path / "grid.png"
    plot.save_grid(path, images, 3, 4)
    read = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, plot.tile(images, 3, 4))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # No temporary file left.


# --- the latent map and the curves ----------------------------------------------------


def test_label_colours_pair_each_point_with_its_own_label():
    labels = np.random.default_rng(2).integers(0, 10, size=500)
    colours = plot.label_colours(labels)
    assert colours.shape == (500, 3)
    for i in range(len(labels)):
        np.testing.assert_array_equal(colours[i], plot.PALETTE[labels[i]])
    # Ten different colours, so that the pairing is visible at all.
    assert len({tuple(c) for c in plot.PALETTE}) == 10
    with pytest.raises(ValueError, match="labels must be in"):
        plot.label_colours(np.array([3, 10]))


def test_plot_latent_colours_each_point_by_its_own_label(tmp_path, saved_figures):
    # Label k's 30 points all sit at the k-th of ten spots on a circle, in shuffled
    # order, so that a shift between points and colours, or of the palette by one
    # label, puts another label's colour on a spot.
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 30))
    angles = 2 * np.pi * np.arange(10) / 10
    spots = 5.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    names = [f"class {k}" for k in range(10)]
    path = tmp_path / "latent.png"
    plot.plot_latent(path, spots[labels], labels, names, "title")

    (figure,) = saved_figures
    (axes,) = figure.axes
    (points,) = axes.collections
    np.testing.assert_array_equal(points.get_offsets(), spots[labels])
    np.testing.assert_array_equal(points.get_facecolors()[:, :3], plot.PALETTE[labels])
    legend = axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == names
    for k, handle in enumerate(legend.legend_handles):
        np.testing.assert_array_equal(handle.get_color(), plot.PALETTE[k])
    # And in the PNG: the pixel under each spot has its label's colour. 30 points of
    # alpha 0.7 stacked are opaque (0.3^30 of white left); the disc's anti-aliased
    # edge may touch that pixel, hence 0.03, while two palette colours differ by > 0.1.
    image = cv2.imread(str(path))[:, :, ::-1] / 255.0  # RGB
    for k in range(10):
        x, y = axes.transData.transform(spots[k])  # Pixels from the bottom left.
        pixel = image[int(image.shape[0] - y), int(x)]
        distance = np.abs(plot.PALETTE - pixel).max(axis=1)
        assert distance.argmin() == k and distance[k] < 0.03, (k, pixel)


def test_plot_latent_of_a_one_dimensional_z_plots_it_against_the_label(tmp_path, saved_figures):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, size=300)
    z = rng.normal(size=(300, 1))
    names = [f"class {k}" for k in range(10)]
    plot.plot_latent(tmp_path / "latent.png", z, labels, names, "title")

    (figure,) = saved_figures
    (axes,) = figure.axes
    (points,) = axes.collections
    offsets = points.get_offsets()
    np.testing.assert_array_equal(offsets[:, 0], z[:, 0])
    assert np.all(np.abs(offsets[:, 1] - labels) <= 0.3)  # Each in its own label's row.
    np.testing.assert_array_equal(points.get_facecolors()[:, :3], plot.PALETTE[labels])
    assert [tick.get_text() for tick in axes.get_yticklabels()] == names
    assert [text.get_text() for text in axes.get_legend().get_texts()] == names


def test_plot_latent_rejects_unpaired_points(tmp_path):
    with pytest.raises(ValueError, match="paired"):
        plot.plot_latent(tmp_path / "x.png", np.zeros((5, 2)), np.zeros(4, int), ["0"], "t")


def test_plot_curves_draws_train_and_validation_of_each_term(tmp_path, saved_figures):
    # Every series has its own values, so that a swap of train and validation, or of
    # two panels, shows. Strings, as read from metrics.csv.
    epochs = [1, 2, 3]
    series = {
        f"{split}_{key}": [offset + 100.0 * panel - 10.0 * e for e in epochs]
        for panel, key in enumerate(("loss", "recon", "kl"))
        for split, offset in (("train", 0.0), ("valid", 5.0))
    }
    rows = [
        {"epoch": str(e), **{name: str(values[i]) for name, values in series.items()}}
        for i, e in enumerate(epochs)
    ]
    plot.plot_curves(tmp_path / "curves.png", rows)
    assert cv2.imread(str(tmp_path / "curves.png")) is not None

    (figure,) = saved_figures
    assert len(figure.axes) == len(plot.CURVE_PANELS)
    for axes, (key, title) in zip(figure.axes, plot.CURVE_PANELS, strict=True):
        assert axes.get_title() == title
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert set(lines) == {"train", "valid"}, title
        for split in ("train", "valid"):
            np.testing.assert_array_equal(lines[split].get_xdata(), epochs)
            np.testing.assert_array_equal(lines[split].get_ydata(), series[f"{split}_{key}"])
        # Told apart in the picture: validation dashed, and the legend says which is which.
        assert lines["train"].get_linestyle() == "-" and lines["valid"].get_linestyle() == "--"
        assert [t.get_text() for t in axes.get_legend().get_texts()] == ["train", "valid"]

    with pytest.raises(ValueError, match="no metrics"):
        plot.plot_curves(tmp_path / "empty.png", [])


# --- the latents that main.py decodes -------------------------------------------------


def test_manifold_latents_follow_the_latent_maps_axes():
    z = plot.manifold_latents(n_z=4, dims=(2, 0), z_range=1.5, side=5)
    values = np.linspace(-1.5, 1.5, 5)
    assert z.shape == (5, 5, 4) and z.dtype == np.float32
    for r in range(5):
        for c in range(5):
            np.testing.assert_allclose(z[r, c], [values[4 - r], 0, values[c], 0], atol=1e-6)
    assert plot.manifold_latents(1, (0, 1), 2.0, side=7).shape == (1, 7, 1)


def test_generation_latents_share_z_down_each_column_and_label_each_row():
    z_samples = np.random.default_rng(4).normal(size=(10, 3)).astype(np.float32)
    z, labels = plot.generation_latents(z_samples)
    assert z.shape == (10, 10, 3) and labels.shape == (10, 10)
    for r in range(10):
        np.testing.assert_array_equal(z[r], z_samples)
        np.testing.assert_array_equal(labels[r], np.full(10, r))


# --- arrays computed with a real (small) model ----------------------------------------


@pytest.fixture(scope="module")
def small_setup(splits):
    config = Config(n_z=3, add_noise=True, seed=5, manifold_dims=(2, 0))
    model = cvae.CVAE(config.n_z, (16, 16, 16, 16), keep_prob=0.6, seed=1)
    inputs = train.make_canvas_inputs(splits.test_images, splits.test_labels, config)
    return config, model, inputs, plot.canvas_arrays(train.canvas_model(model), inputs, config)


def decode_mean(model, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = model.decode(tf.constant(z), draws.one_hot(labels))
    return tf.sigmoid(logits).numpy()


def test_canvas_inputs_are_fixed_by_the_seed(splits, small_setup):
    config, _, inputs, _ = small_setup
    again = train.make_canvas_inputs(splits.test_images, splits.test_labels, config)
    for f in dataclasses.fields(inputs):
        np.testing.assert_array_equal(getattr(inputs, f.name), getattr(again, f.name))
    other = train.make_canvas_inputs(
        splits.test_images, splits.test_labels, dataclasses.replace(config, seed=6)
    )
    assert not np.array_equal(inputs.images, other.images)
    assert not np.array_equal(inputs.z_samples, other.z_samples)
    assert inputs.images.shape == inputs.encoder_inputs.shape == (100, 784)
    assert inputs.map_inputs.shape == (5000, 784) and inputs.map_labels.shape == (5000,)
    assert inputs.z_samples.shape == (10, 3)
    np.testing.assert_array_equal(inputs.analogy_labels, np.arange(10))
    # With --add_noise the encoder sees noised images; without, the clean ones.
    assert not np.array_equal(inputs.encoder_inputs, inputs.images)
    clean = train.make_canvas_inputs(
        splits.test_images, splits.test_labels, dataclasses.replace(config, add_noise=False)
    )
    np.testing.assert_array_equal(clean.encoder_inputs, clean.images)


def test_canvas_arrays_shapes_and_ranges(small_setup):
    _, _, _, canvases = small_setup
    expected = {
        "restored": (10, 10, 784),
        "generation": (10, 10, 784),
        "analogy": (10, 11, 784),
        **{f"manifold_label{k}": (20, 20, 784) for k in range(10)},
    }
    assert {name: grid.shape for name, grid in canvases.grids.items()} == expected
    for grid in canvases.grids.values():
        assert grid.dtype == np.float32
        assert grid.min() >= 0.0 and grid.max() <= 1.0
    assert canvases.latent_points.shape == (5000, 3)


def test_generation_rows_differ_and_columns_share_their_z(small_setup):
    _, model, inputs, canvases = small_setup
    generation = canvases.grids["generation"]
    for r in range(10):
        for other in range(r + 1, 10):
            assert np.abs(generation[r] - generation[other]).max() > 1e-4, (r, other)
        # Each tile (r, j) is z_j decoded with label r: one style per column.
        expected = decode_mean(model, inputs.z_samples, np.full(10, r))
        # 10 rows here, 100 in canvas_arrays: matmul kernels may differ, and sum in
        # another order. The decoder's sums have n <= 16 terms of magnitudes below 5
        # here: about 16·u·5 ≈ 5e-6 on a logit, a quarter of that after the sigmoid.
        np.testing.assert_allclose(generation[r], expected, atol=1e-5)
    assert np.abs(generation[:, 0] - generation[:, 1]).max() > 1e-4


def test_latent_points_are_the_encoder_means_of_their_own_images(small_setup):
    _, model, inputs, canvases = small_setup
    np.testing.assert_array_equal(canvases.latent_labels, inputs.map_labels)
    # One image at a time, so that a shift between points and labels would show.
    for i in (0, 1, 999, 1000, 2500, 4999):
        mean, _ = model.encode(
            tf.constant(inputs.map_inputs[i : i + 1]),
            draws.one_hot(inputs.map_labels[i : i + 1]),
        )
        # 1 row here, 5,000 there: other matmul kernels, another order. The encoder's
        # first layer sums n = 794 inputs: up to n·u ≈ 5e-5 of magnitudes of about 1,
        # hence 1e-4. Another image's or label's mean is more than 0.02 away.
        np.testing.assert_allclose(canvases.latent_points[i], mean.numpy()[0], atol=1e-4)


def test_restored_and_analogy_decode_the_posterior_mean(small_setup):
    _, model, inputs, canvases = small_setup
    i = 37  # Row 3, column 7 of the restored grid.
    mean, _ = model.encode(
        tf.constant(inputs.encoder_inputs[i : i + 1]), draws.one_hot(inputs.labels[i : i + 1])
    )
    expected = decode_mean(model, mean.numpy(), inputs.labels[i : i + 1])[0]
    # Through the encoder (n = 794), batched otherwise than in canvas_arrays: 1e-4, as
    # in the test above. Another image, or another label even if only the encoder
    # sees it, changes this tile by more than 4e-3.
    np.testing.assert_allclose(canvases.grids["restored"][3, 7], expected, atol=1e-4)

    analogy = canvases.grids["analogy"]
    np.testing.assert_array_equal(analogy[:, 0], inputs.analogy_images)
    mean, _ = model.encode(
        tf.constant(inputs.analogy_inputs[4:5]), draws.one_hot(inputs.analogy_labels[4:5])
    )
    expected = decode_mean(model, np.repeat(mean.numpy(), 10, axis=0), np.arange(10))
    np.testing.assert_allclose(analogy[4, 1:], expected, atol=1e-4)  # As the restored tile.


# --- config -----------------------------------------------------------------------------


def test_canvas_flags_round_trip_and_are_validated(capsys):
    config = main.parse_args(["--n_z", "5", "--manifold_dims", "3", "1", "--plot_every", "2"])
    assert config.manifold_dims == (3, 1) and config.plot_every == 2
    assert Config.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert main.parse_args(["--n_z", "1"]).manifold_dims == (0, 1)  # The default is accepted.
    for argv, message in [
        (["--manifold_dims", "0", "2"], "two different dimensions in 0..1"),
        (["--n_z", "4", "--manifold_dims", "1", "1"], "two different dimensions in 0..3"),
        (["--n_z", "1", "--manifold_dims", "0", "2"], "no use with --n_z 1"),
        (["--plot_every", "0"], "--plot_every must be >= 1"),
        (["--z_range", "0"], "--z_range must be a finite number > 0"),
    ]:
        with pytest.raises(SystemExit):
            main.parse_args(argv)
        assert message in capsys.readouterr().err


# --- the run folder ---------------------------------------------------------------------


def expected_files(epochs: int) -> dict[str, tuple[int, int]]:
    """Every PNG of a run with noise and --plot_every 1, by its path in the run folder, and
    its canvas size: each epoch's canvases in epochs/, the newest of each kind at the top."""
    files = {"original.png": grid_shape(10, 10), "noised.png": grid_shape(10, 10)}
    shapes = {
        "restored": grid_shape(10, 10),
        "generation": grid_shape(10, 10),
        "analogy": grid_shape(10, 11),
        "latent": None,  # A matplotlib figure: any size.
        **{f"manifold_label{k}": grid_shape(20, 20) for k in range(10)},
    }
    for kind, shape in shapes.items():
        files[f"{kind}.png"] = shape
        for e in range(1, epochs + 1):
            files[f"epochs/{kind}_epoch{e:03d}.png"] = shape
    files["curves.png"] = None
    return files


@pytest.mark.slow
def test_run_folder_holds_every_canvas_and_nothing_else(tiny_run):
    epochs = Config.from_json(json.loads((tiny_run / "config.json").read_text())).epochs
    pngs = expected_files(epochs)
    others = {"config.json", "metrics.csv", "metrics.json", "checkpoints", "tb"}
    others |= {utils.LOCK_FILE, utils.EXPORT_DIR}  # The last writer's lock; the SavedModel.
    others |= {f"{kind}.gif" for kind in CANVAS_KINDS}  # The animations (test_animations.py).
    top = {name.split("/")[0] for name in pngs}
    assert {p.name for p in tiny_run.iterdir()} == top | others
    in_epochs = {f"epochs/{p.name}" for p in (tiny_run / "epochs").iterdir()}
    assert in_epochs == {name for name in pngs if name.startswith("epochs/")}
    # The newest canvas of each kind at the top: a copy of the last epoch's.
    for kind in CANVAS_KINDS:
        latest = (tiny_run / f"{kind}.png").read_bytes()
        assert latest == (tiny_run / f"epochs/{kind}_epoch{epochs:03d}.png").read_bytes(), kind
    # Nothing written beside the run folder, in the results folder the run was given.
    assert list(tiny_run.parent.iterdir()) == [tiny_run]
    for name, shape in pngs.items():
        image = cv2.imread(str(tiny_run / name), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.dtype == np.uint8, name
        if shape is not None:
            assert image.shape == shape, name
            # The first tile alone, since the separators would make any grid non-uniform.
            assert image[:SIDE, :SIDE].std() > 0, f"{name}: the first tile is blank"


def test_a_run_folder_made_before_epochs_existed_is_read_and_completed(tmp_path):
    """Old run folders keep their canvases at the top: they are read there (beside those
    a resume adds to epochs/), and get their newest pictures at the top, once."""
    images = np.random.default_rng(0).uniform(size=(3, 4, SIDE, SIDE))
    for epoch in (1, 2):  # As written before epochs/ existed.
        plot.save_grid(tmp_path / f"restored_epoch{epoch:03d}.png", images[epoch - 1], 2, 2)
    plot.save_grid(tmp_path / "latent_epoch002.png", images[0], 2, 2)
    (tmp_path / "epochs").mkdir()  # A resume's epoch 3.
    plot.save_grid(plot.epoch_canvas_path(tmp_path, "restored", 3), images[2], 2, 2)
    found = plot.canvas_files(tmp_path)
    assert {
        e: {k: str(p.relative_to(tmp_path)) for k, p in c.items()} for e, c in found.items()
    } == {
        1: {"restored": "restored_epoch001.png"},
        2: {"restored": "restored_epoch002.png", "latent": "latent_epoch002.png"},
        3: {"restored": "epochs/restored_epoch003.png"},
    }
    written = plot.write_latest_and_animations(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["restored.png", "latent.png", "restored.gif", "latent.gif"]
    )
    assert (tmp_path / "restored.png").read_bytes() == found[3]["restored"].read_bytes()
    assert plot.write_latest(tmp_path) == []  # Already the newest: not written again.
    # --eval_only of the old folder's epoch 2: its canvases are there, none is drawn.
    (tmp_path / "curves.png").write_bytes(b"")
    (tmp_path / "latent.png").unlink()

    def no_inputs():
        raise AssertionError("nothing is missing: no canvas is drawn")

    assert not plot.draw_missing_canvases(tmp_path, None, no_inputs, Config(), 2)
    assert (tmp_path / "latent.png").read_bytes() == found[2]["latent"].read_bytes()


@pytest.fixture(scope="module")
def tiny_run_model(tiny_run):
    """(config, model) of the tiny run's last checkpoint, restored as --eval_only does."""
    return restore_run_model(tiny_run)


@pytest.mark.slow
def test_manifold_tiles_decode_their_z_with_their_label(tiny_run, tiny_run_model):
    config, model = tiny_run_model
    assert (config.n_z, config.manifold_dims, config.z_range) == (2, (0, 1), 2.0)
    # The four corners say which way each axis runs; two inner tiles, one off the diagonal.
    tiles = [(0, 0), (0, 19), (19, 0), (19, 19), (6, 13), (12, 3)]
    check_manifold_tiles(tiny_run, config, model, config.epochs, tiles)


@pytest.mark.slow
def test_canvases_redrawn_from_a_checkpoint_match_the_run(
    tiny_run, tiny_run_model, splits, tmp_path
):
    """write_canvases needs only a model and the config: a finished run's checkpoint
    redraws the very same files (the fixed inputs come from the run's seed).

    The same model restored here (as --eval_only restores it) and the same inputs
    give the same floats, so every PNG is identical byte for byte: the OpenCV grids
    and the latent map. (test_eval.py checks the same through main.py --eval_only.)
    """
    config, model = tiny_run_model
    assert config == run_config(tiny_run)
    inputs = train.make_canvas_inputs(splits.test_images, splits.test_labels, config)
    plot.write_canvases(train.canvas_model(model), inputs, tmp_path, config.epochs, config)
    tag = f"epoch{config.epochs:03d}"
    kinds = ["restored", "generation", "analogy", "latent"]
    kinds += [f"manifold_label{k}" for k in range(10)]
    expected = {"original.png", "noised.png", *(f"epochs/{kind}_{tag}.png" for kind in kinds)}
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")} == expected
    for name in sorted(expected):
        assert (tmp_path / name).read_bytes() == (tiny_run / name).read_bytes(), name
