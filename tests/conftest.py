"""Shared fixtures: the real data loaded once, and one tiny end-to-end run; helpers that
read a run folder back."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import pytest

import cvae
import data_utils
import main
import plot
import utils

# A few hundred images and two epochs: enough to exercise every code path of
# the real script in seconds on a CPU.
# The final evaluation on 200 test images with K=5 keeps it to seconds as well.
# --xla off: compiling a run's chunk takes seconds, and what these runs check
# happens between chunks. The default, compiled path has its own tests:
# test_the_script_itself_runs, test_a_compiled_run_resumes_exactly and the
# XLA case of test_epoch_does_not_depend_on_the_chunk_size.
XLA_OFF = ["--xla", "off"]
TINY_FLAGS = [
    *("--n_train", "300", "--epochs", "2", "--batch_size", "64", "--seed", "3"),
    *("--n_eval", "200", "--iw_samples", "5", *XLA_OFF),
]


@pytest.fixture(scope="session")
def splits() -> data_utils.Splits:
    return data_utils.load_dataset("mnist")


def single_run_dir(results_dir: Path) -> Path:
    """The one run folder that a run created under `results_dir`."""
    runs = [p for p in results_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def whole_and_resumed_runs(flags: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The real main.py with `flags`: a 3-epoch run, and a 1-epoch run resumed to 3.

    Returns (the uninterrupted run's folder, the resumed run's folder)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main.main([*flags, "--epochs", "3", "--results_dir", str(whole)]) == 0
    assert main.main([*flags, "--epochs", "1", "--results_dir", str(split)]) == 0
    resumed = single_run_dir(split)
    assert main.main(["--resume", str(resumed), "--epochs", "3"]) == 0
    return single_run_dir(whole), resumed


def rows_without_seconds(run_dir: Path) -> list[dict]:
    """metrics.csv's rows without their wall-clock `seconds`, the one column that varies."""
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in utils.read_csv(run_dir / "metrics.csv")
    ]


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures that plot.py saves, in order, kept to be read back after saving."""
    figures = []
    real_save = plot._save_figure

    def save_and_keep(path, figure):
        real_save(path, figure)
        figures.append(figure)

    monkeypatch.setattr(plot, "_save_figure", save_and_keep)
    return figures


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Run the real main() once with noise on and canvases every epoch; tests read (never
    modify) its folder."""
    results = tmp_path_factory.mktemp("results")
    code = main.main(
        [*TINY_FLAGS, "--add_noise", "True", "--plot_every", "1", "--results_dir", str(results)]
    )
    assert code == 0
    return single_run_dir(results)


# --- Reading a run folder back ------------------------------------------------------------


def run_config(run_dir: Path) -> main.Config:
    """The Config a run saved in its config.json."""
    return main.Config.from_json(json.loads((run_dir / "config.json").read_text()))


def restore_run_model(run_dir: Path):
    """(config, model) of a run's last checkpoint, restored as --eval_only does:
    train.build_state, then the full checkpoint with every saved object matched."""
    import tensorflow as tf

    import train

    config = run_config(run_dir)
    state = train.build_state(config)
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    state.checkpoint.restore(latest).assert_existing_objects_matched()
    return config, state.model


def read_canvas(path: Path) -> np.ndarray:
    """A canvas PNG as written, uint8 (height, width)."""
    canvas = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert canvas is not None and canvas.dtype == np.uint8 and canvas.ndim == 2, path
    return canvas


def canvas_tile(canvas: np.ndarray, r: int, c: int) -> np.ndarray:
    """Tile (r, c) of a canvas: 28 x 28 pixels from (r*(28+1), c*(28+1)) (plot.tile)."""
    side, step = data_utils.IMAGE_SIZE, data_utils.IMAGE_SIZE + plot.SEPARATOR
    return canvas[r * step : r * step + side, c * step : c * step + side]


def canvas_tiles(canvas: np.ndarray) -> np.ndarray:
    """Every tile of a canvas, (rows, cols, 28, 28); the separators left out."""
    step = data_utils.IMAGE_SIZE + plot.SEPARATOR
    n_rows, n_cols = (canvas.shape[0] + 1) // step, (canvas.shape[1] + 1) // step
    return np.array([[canvas_tile(canvas, r, c) for c in range(n_cols)] for r in range(n_rows)])


CANVAS_KINDS = ["restored", "latent", "generation", "analogy"] + [
    f"manifold_label{k}" for k in range(10)
]


def run_folder_names(canvas_epochs: Iterable[int], add_noise: bool) -> set[str]:
    """Every entry of a finished run folder (README, "What a run writes"): with the
    TensorBoard events in tb/ and one animation per canvas kind."""
    names = {"config.json", "metrics.csv", "metrics.json", "checkpoints", "curves.png", "tb"}
    names |= {"original.png", "noised.png"} if add_noise else {"original.png"}
    for epoch in canvas_epochs:
        names |= {f"{kind}_epoch{epoch:03d}.png" for kind in CANVAS_KINDS}
        names |= {f"{kind}.gif" for kind in CANVAS_KINDS}
    return names


def check_manifold_tiles(
    run_dir: Path, config: main.Config, model, epoch: int, tiles: Iterable[tuple[int, int]]
) -> None:
    """Tile (r, c) of manifold_label{k}_epochNNN.png is z[r, c] decoded with label k.

    z is worked out here from the README: an even grid over [-z_range, z_range],
    z[dims[0]] growing left to right and z[dims[1]] bottom to top, the others 0;
    with n_z 1 one row along z[0]. It is decoded here through train.canvas_model, 3
    rows per tile checked in one call, where the canvas decoded its 400 z in one call.
    Another batch size may take other matmul kernels, which sum in another order
    (and CPUs differ in the last bits too): the decoder's longest sums have 500 terms,
    off by up to about 500 x 6e-8 = 3e-5 of their magnitudes (a few units), so a
    pixel moves by under 1/100 of a level (the sigmoid's slope is at most 1/4). That
    moves it to the next uint8 level only if it sat that close to a rounding
    boundary: +-1 level, never more.
    The neighbouring label, and z reflected through the origin, must each miss by more,
    or the comparison could not tell a wrong tile from the right one.
    """
    import train

    decode = train.canvas_model(model).decode
    side = plot.MANIFOLD_SIDE
    values = np.linspace(-config.z_range, config.z_range, side)

    def latent(x: float, y: float) -> np.ndarray:
        z = np.zeros((1, config.n_z), np.float32)
        if config.n_z == 1:
            z[0, 0] = x
        else:
            z[0, config.manifold_dims[0]], z[0, config.manifold_dims[1]] = x, y
        return z

    def pixels(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(n, n_z), (n,) -> uint8 levels (n, 28, 28), as ints; one decoder call."""
        images = decode(z.astype(np.float32), labels.astype(np.int32))
        return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(int).reshape(-1, 28, 28)

    tiles = list(tiles)
    for k in range(10):
        canvas = read_canvas(run_dir / f"manifold_label{k}_epoch{epoch:03d}.png")
        # Per tile: its own z and label, the next label, z reflected (-x, -y: the grid is even).
        z = np.concatenate(
            [latent(values[c], values[side - 1 - r]) for r, c in tiles for _ in range(2)]
            + [latent(values[side - 1 - c], values[r]) for r, c in tiles]
        )
        labels = np.array([k, (k + 1) % 10] * len(tiles) + [k] * len(tiles))
        decoded = pixels(z, labels)
        for i, (r, c) in enumerate(tiles):
            tile = canvas_tile(canvas, r, c).astype(int)
            own, next_label = decoded[2 * i], decoded[2 * i + 1]
            reflected = decoded[2 * len(tiles) + i]
            where = f"manifold_label{k}, tile ({r}, {c})"
            assert np.abs(tile - own).max() <= 1, where
            assert np.abs(tile - next_label).max() > 1, where
            assert np.abs(tile - reflected).max() > 1, where


@pytest.fixture
def after_each_chunk(monkeypatch):
    """Call `hook(steps run so far)` after every real compiled chunk of training steps."""

    def install(hook) -> None:
        real_factory = cvae.make_train_chunk

        def factory(*args, **kwargs):
            chunk = real_factory(*args, **kwargs)
            steps = 0

            def wrapped(*chunk_args):
                nonlocal steps
                sums, done = chunk(*chunk_args)
                steps += int(done)
                hook(steps)
                return sums, done

            return wrapped

        monkeypatch.setattr(cvae, "make_train_chunk", factory)

    return install
