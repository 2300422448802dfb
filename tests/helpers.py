"""What several test files share: the tiny runs' flags, readers of a run folder, and the
NumPy references of the model's terms. Plain functions and constants; the fixtures are
in conftest.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

import data_utils
import main
import plot
import utils
from config import Config

# A few hundred images and two epochs: enough to exercise every code path of
# the real script in seconds on a CPU.
# The final evaluation on 200 test images with K=5 keeps it to seconds as well.
# --xla off: compiling a run's chunk takes seconds, and what these runs check
# happens between chunks. The default, compiled path has its own tests:
# test_the_script_itself_runs, test_resume's compiled cases and the XLA case of
# test_epoch_does_not_depend_on_the_chunk_size.
XLA_OFF = ["--xla", "off"]
TINY_FLAGS = [
    *("--n_train", "300", "--epochs", "2", "--batch_size", "64", "--seed", "3"),
    *("--n_eval", "200", "--iw_samples", "5", *XLA_OFF),
]


# --- Running the script and reading what it wrote ----------------------------------------


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


def rows_without_seconds(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows without their wall-clock `seconds`, the one column that varies."""
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in utils.read_csv(run_dir / "metrics.csv")
    ]


def epochs_in_csv(run_dir: Path) -> list[int]:
    """The epoch numbers of metrics.csv's rows, in order."""
    return [int(row["epoch"]) for row in utils.read_csv(run_dir / "metrics.csv")]


def tree(folder: Path, lock: bool = True) -> dict[str, str]:
    """Every file under `folder` -> sha256, to show that nothing changed.

    With `lock=False`, without the run folder's lock file: it names the last process
    that took the lock, and a command refused after taking it (for its flags, say)
    leaves its own name there, and nothing else.
    """
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (lock or p.relative_to(folder) != Path(utils.LOCK_FILE))
    }


def one_error_line(captured) -> str:
    """The one line starting with 'error:' that a refused run printed to stderr (capsys's
    `readouterr()`), and no traceback on either stream."""
    assert "Traceback" not in captured.err + captured.out, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    return errors[0]


def run_config(run_dir: Path) -> Config:
    """The Config a run saved in its config.json."""
    return Config.from_json(json.loads((run_dir / "config.json").read_text()))


def restore_run_model(run_dir: Path):
    """(config, model) of a run's last checkpoint, restored as --eval_only does:
    checkpoints.build_state, then the full checkpoint with every saved object matched."""
    import tensorflow as tf

    import checkpoints

    config = run_config(run_dir)
    state = checkpoints.build_state(config)
    latest = tf.train.latest_checkpoint(str(run_dir / utils.CHECKPOINTS_DIR))
    state.checkpoint.restore(latest).assert_existing_objects_matched()
    return config, state.model


# --- Canvases ------------------------------------------------------------------------------


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
    """Every entry at the top of a finished run folder (README, "What a run writes"):
    with the TensorBoard events in tb/, the SavedModel in export/, the lock file that the
    last writer held (it stays), and per canvas kind its newest PNG and its animation;
    the canvases of each epoch are in epochs/ (`epoch_canvas_names`)."""
    names = {"config.json", "metrics.csv", "metrics.json", "curves.png", "tb"}
    names |= {utils.CHECKPOINTS_DIR, utils.LOCK_FILE, utils.EXPORT_DIR}
    names |= {"original.png", "noised.png"} if add_noise else {"original.png"}
    if list(canvas_epochs):
        names.add(utils.EPOCHS_DIR)
        names |= {f"{kind}.png" for kind in CANVAS_KINDS}
        names |= {f"{kind}.gif" for kind in CANVAS_KINDS}
    return names


def epoch_canvas_names(canvas_epochs: Iterable[int]) -> set[str]:
    """Every file in a finished run folder's epochs/: each canvas of each canvas epoch."""
    return {f"{kind}_epoch{e:03d}.png" for e in canvas_epochs for kind in CANVAS_KINDS}


def epoch_canvas(run_dir: Path, kind: str, epoch: int) -> Path:
    """The canvas `kind` of `epoch` in a run folder: epochs/<kind>_epochNNN.png."""
    return run_dir / utils.EPOCHS_DIR / f"{kind}_epoch{epoch:03d}.png"


def check_manifold_tiles(
    run_dir: Path, config: Config, model, epoch: int, tiles: Iterable[tuple[int, int]]
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
        canvas = read_canvas(epoch_canvas(run_dir, f"manifold_label{k}", epoch))
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


# --- NumPy references of the model's terms ------------------------------------------------


def numpy_kl(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """KL(N(mean, std²) ‖ N(0, 1)) summed over dimensions, written out per dimension."""
    return np.sum(np.log(1.0 / std) + (std**2 + mean**2) / 2.0 - 0.5, axis=-1)


def numpy_bernoulli_nll(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """−log p(x|logits) = Σ_pixels [log(1 + e^l) − x·l], in float64; finite for any logit."""
    logits = np.asarray(logits, np.float64)
    return np.sum(np.logaddexp(0.0, logits) - np.asarray(x, np.float64) * logits, axis=-1)


def encoder_outputs(model, x, y) -> tuple[np.ndarray, np.ndarray]:
    """q(z|x,y)'s mean and std (B, Z) in float64, dropout off."""
    import tensorflow as tf

    mean, std = model.encode(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
    return mean.numpy().astype(np.float64), std.numpy().astype(np.float64)


def monte_carlo_recon(
    model,
    x: np.ndarray,
    y: np.ndarray,
    n_samples: int,
    seed: int,
    chunk: int = 500,
    x_input: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """E_q[−log p(x|z,y)] per row by plain Monte Carlo, and its standard error: (B,), (B,).

    Independent of cvae's loss code: z ~ q = N(mean, std²) drawn by NumPy from the
    encoder's outputs given `x_input` (default x), the Bernoulli likelihood in
    NumPy; the model only encodes and decodes (dropout off). `chunk` samples per
    decoder call bound the memory.
    """
    import tensorflow as tf

    mean, std = encoder_outputs(model, x if x_input is None else x_input, y)
    rng = np.random.default_rng(seed)
    recon = []
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        z = mean + std * rng.standard_normal((n, *mean.shape))  # (n, B, Z)
        logits = model.decode(
            tf.constant(z.reshape(-1, mean.shape[1]), tf.float32), tf.constant(np.tile(y, (n, 1)))
        ).numpy()
        recon.append(numpy_bernoulli_nll(np.tile(x, (n, 1)), logits).reshape(n, len(x)))
    recon = np.concatenate(recon)  # (n_samples, B)
    return recon.mean(axis=0), recon.std(axis=0, ddof=1) / np.sqrt(n_samples)


def binary_test_batch(splits, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first n test images thresholded at ½ (binary, as with --binarize), their int
    labels and one-hot labels."""
    x = (data_utils.scale(splits.test_images[:n]) > 0.5).astype(np.float32)
    labels = splits.test_labels[:n]
    return x, labels, np.eye(data_utils.N_CLASSES, dtype=np.float32)[labels]


def ten_label_reference(model, x, seed, neg_log_likelihood) -> dict[str, np.ndarray]:
    """M2's −L(x, y) for every label by an explicit loop in float64, dropout off: label by
    label, the encoder and decoder called on one-hot c with z drawn from the ε that
    `cvae.negative_elbo_all_labels(model, x, x, seed)` uses for (image, c).

    `neg_log_likelihood(x, decoded)` -> (B,) in float64 from the decoder's outputs.
    Returns "recon", "kl", "loss", each (B, C).
    """
    import tensorflow as tf

    import draws

    n, n_z, n_classes = int(x.shape[0]), model.n_z, 10
    _, seed_eps, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    eps = tf.random.stateless_normal((n * n_classes, n_z), seed_eps).numpy()
    eps = eps.reshape(n, n_classes, n_z)
    xs = x.numpy().astype(np.float64)
    terms = {name: np.zeros((n, n_classes)) for name in ("recon", "kl", "loss")}
    for c in range(n_classes):
        y = draws.one_hot(tf.fill([n], c))
        mean, std = (t.numpy().astype(np.float64) for t in model.encode(x, y))
        z = mean + std * eps[:, c]
        decoded = model.decode(tf.constant(z, tf.float32), y).numpy().astype(np.float64)
        terms["recon"][:, c] = neg_log_likelihood(xs, decoded)
        terms["kl"][:, c] = 0.5 * np.sum(mean**2 + std**2 - 2 * np.log(std) - 1, -1)
    terms["loss"] = terms["recon"] + terms["kl"]
    return terms
