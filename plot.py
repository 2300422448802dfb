"""Pictures: what each canvas shows and how it is drawn.

Image grids with OpenCV, the latent map and curves with matplotlib, the animations
across epochs with Pillow. This module
never imports TensorFlow: it receives the model as two NumPy functions
(`CanvasModel`, made by `train.canvas_model`), so every picture here can be
made and tested from plain arrays.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

import data_utils
import utils

SEPARATOR = 1  # Pixels between tiles: thin, yet it keeps the tiles apart.
SEPARATOR_VALUE = 128  # Mid-grey shows against both the black ground and white strokes.
# Ten well-separated colours (matplotlib's tab10), one per class, in label order.
PALETTE = np.array(
    [
        (0.122, 0.467, 0.706),
        (1.000, 0.498, 0.055),
        (0.173, 0.627, 0.173),
        (0.839, 0.153, 0.157),
        (0.580, 0.404, 0.741),
        (0.549, 0.337, 0.294),
        (0.890, 0.467, 0.761),
        (0.498, 0.498, 0.498),
        (0.737, 0.741, 0.133),
        (0.090, 0.745, 0.812),
    ]
)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pixel intensities in [0, 1] (any float dtype), or uint8 already -> uint8 in [0, 255]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or infinite values; the model has diverged")
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def tile(
    images: np.ndarray,
    n_rows: int,
    n_cols: int,
    separator: int = SEPARATOR,
    separator_value: int = SEPARATOR_VALUE,
) -> np.ndarray:
    """Lay images out row by row on one canvas, with thin lines between the tiles.

    Args:
      images: n_rows * n_cols images, (n, h, w), or flattened square ones (n, h*h);
        floats in [0, 1] or uint8.
      n_rows, n_cols: the grid; image i goes to row i // n_cols, column i % n_cols.
      separator: width in pixels of the lines between tiles (none around the edge).
      separator_value: their grey level, 0..255.

    Returns:
      uint8 canvas of shape (n_rows*h + (n_rows-1)*separator, n_cols*w + (n_cols-1)*separator);
      tile (r, c) starts at pixel (r*(h+separator), c*(w+separator)).
    """
    images = np.asarray(images)
    if images.ndim == 2:
        side = math.isqrt(images.shape[1])
        if side * side != images.shape[1]:
            raise ValueError(
                f"flattened images of {images.shape[1]} pixels are not square; pass (n, h, w)"
            )
        images = images.reshape(-1, side, side)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, h, w) or (n, h*w), got {images.shape}")
    if len(images) != n_rows * n_cols:
        raise ValueError(
            f"a {n_rows}x{n_cols} grid needs {n_rows * n_cols} images, got {len(images)}"
        )
    _, h, w = images.shape
    pixels = to_uint8(images)
    canvas = np.full(
        (n_rows * h + (n_rows - 1) * separator, n_cols * w + (n_cols - 1) * separator),
        separator_value,
        dtype=np.uint8,
    )
    for index, image in enumerate(pixels):
        top = (index // n_cols) * (h + separator)
        left = (index % n_cols) * (w + separator)
        canvas[top : top + h, left : left + w] = image
    return canvas


def write_png(path: str | os.PathLike, canvas: np.ndarray) -> None:
    """Encode an 8-bit canvas as PNG with OpenCV and write it atomically."""
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a PNG for {path}")
    utils.atomic_write_bytes(path, encoded.tobytes())


def save_grid(path: str | os.PathLike, images: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Tile `images` into an n_rows x n_cols grid and write it as a PNG: every canvas."""
    write_png(path, tile(images, n_rows, n_cols))


def label_colours(labels: np.ndarray) -> np.ndarray:
    """Integer labels (n,) -> RGB colours (n, 3): point i gets the colour of its own label."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(PALETTE)):
        raise ValueError(f"labels must be in 0..{len(PALETTE) - 1}")
    return PALETTE[labels]


def _save_figure(path: str | os.PathLike, figure: Figure) -> None:
    FigureCanvasAgg(figure)  # Explicit Agg: no display, no pyplot global state.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    utils.atomic_write_bytes(path, buffer.getvalue())


def plot_latent(
    path: str | os.PathLike,
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str,
    axis_names: Sequence[str] = ("z[0]", "z[1]"),
) -> None:
    """Scatter latent points coloured by their true label, with a legend; write a PNG.

    Args:
      points: (n, 2) latent coordinates, or (n, 1) for a one-dimensional z, which
        is drawn against the label (with a little vertical jitter).
      labels: (n,) integer labels, paired with `points` row by row.
      class_names: legend text per label.
      title: figure title.
      axis_names: names of the two plotted dimensions.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or points.shape[1] not in (1, 2) or len(points) != len(labels):
        raise ValueError(
            f"expected points (n, 1 or 2) paired with labels (n,), got {points.shape} "
            f"and {labels.shape}"
        )
    figure = Figure(figsize=(7.5, 6.5))
    axes = figure.add_subplot()
    if points.shape[1] == 2:
        x, y = points[:, 0], points[:, 1]
        axes.set_ylabel(axis_names[1])
        axes.set_aspect("equal", adjustable="datalim")
    else:
        # A fixed jitter spreads each label's row so that its density shows.
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))
        x, y = points[:, 0], labels + jitter
        axes.set_yticks(range(len(class_names)), class_names)
        axes.set_ylabel("label")
    # One call in data order, so that no class is always drawn on top of the others.
    axes.scatter(x, y, c=label_colours(labels), s=4, alpha=0.7, linewidths=0)
    axes.set_xlabel(axis_names[0])
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=PALETTE[k], label=name)
        for k, name in enumerate(class_names)
    ]
    axes.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.tight_layout()
    _save_figure(path, figure)


CURVE_PANELS = (("loss", "−ELBO"), ("recon", "reconstruction −log p(x|z,y)"), ("kl", "KL(q ‖ p)"))


def plot_curves(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], train_samples: int = 1
) -> None:
    """Train and validation −ELBO, reconstruction and KL per epoch; write a PNG.

    Args:
      rows: the metrics rows (as in metrics.csv; strings or numbers), each with
        "epoch" and "train_/valid_" + "loss", "recon", "kl"; an M2 run's
        (--n_labeled) also "valid_q_error", drawn in a fourth panel, and its
        train loss is J^α/N, which the title says.
      train_samples: K of the training bound; for K > 1 the train loss is −L_K
        (the validation loss stays the −ELBO), and the title says so.
    """
    if not rows:
        raise ValueError("no metrics rows to plot")
    epochs = np.array([float(row["epoch"]) for row in rows])
    semi_supervised = "valid_q_error" in rows[0]
    n_panels = len(CURVE_PANELS) + semi_supervised
    figure = Figure(figsize=(13 * n_panels / len(CURVE_PANELS), 3.8))
    for index, (key, name) in enumerate(CURVE_PANELS):
        axes = figure.add_subplot(1, n_panels, index + 1)
        for split, style in (("train", "-"), ("valid", "--")):
            values = [float(row[f"{split}_{key}"]) for row in rows]
            marker = "o" if len(rows) <= 20 else None  # Dots help only on short runs.
            axes.plot(epochs, values, style, marker=marker, markersize=3, label=split)
        if key == "loss" and train_samples > 1:
            name = f"{name} (train: −L_{train_samples}, the IW bound)"
        if key == "loss" and semi_supervised:
            name = f"{name} (train: M2's J^α per image)"
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("nats per image")
        axes.grid(True, alpha=0.3)
        axes.legend()
    if semi_supervised:
        _plot_q_error(figure.add_subplot(1, n_panels, n_panels), epochs, rows)
    figure.tight_layout()
    _save_figure(path, figure)


def _plot_q_error(axes, epochs: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> None:
    """M2's classifier q(y|x): its validation error per epoch, in percent."""
    values = [float(row["valid_q_error"]) for row in rows]
    marker = "o" if len(rows) <= 20 else None
    axes.plot(epochs, values, "--", marker=marker, markersize=3, label="valid")
    axes.set_title("q(y|x) error (%)")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("% of validation images")
    axes.grid(True, alpha=0.3)
    axes.legend()


# --- The canvases: what each shows, drawn once per run, then decoded at each canvas epoch ---

N_SHOWN = 100  # Test images in original/noised/restored: a 10x10 grid.
N_LATENT_MAP = 5_000  # Test images in the latent map.
N_STYLES = 10  # Fixed latent samples (columns) of the generation canvas.
MANIFOLD_SIDE = 20  # Tiles per side of a manifold canvas.
# The canvases drawn once per run (original.png, noised.png), not at every canvas epoch.
FIXED_CANVASES = ("original", "noised")


class CanvasModel(NamedTuple):
    """The model as the canvases use it, NumPy in and out, dropout off (`train.canvas_model`)."""

    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """images (n, D) and int labels (n,) -> the posterior means of q(z|x,y), (n, n_z)"""
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """z (n, n_z) and int labels (n,) -> the mean images E[x|z,y], (n, D) in [0, 1]"""
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    """M2 (--n_labeled): images (n, D) -> the labels argmax q(y|x) (n,); else None"""


@dataclass(frozen=True)
class CanvasInputs:
    """What the canvases show, drawn once per run so that every epoch shows the same tiles.

    Images are flattened (n, D) floats in [0, 1]; `*_inputs` are what the encoder
    sees in training (noised with --add_noise, binarised with --binarize dynamic).
    """

    images: np.ndarray  # (100, D) test images for original/noised/restored
    labels: np.ndarray  # (100,)
    encoder_inputs: np.ndarray  # (100, D)
    map_inputs: np.ndarray  # (5000, D) encoder inputs of the latent map
    map_labels: np.ndarray  # (5000,)
    analogy_images: np.ndarray  # (10, D) one test image per label, 0 to 9
    analogy_inputs: np.ndarray  # (10, D)
    analogy_labels: np.ndarray  # (10,)
    z_samples: np.ndarray  # (10, n_z) from the prior N(0, I), one per generation column (100
    # for a plain VAE, the whole grid)


def make_canvas_inputs(
    test_images: np.ndarray,
    test_labels: np.ndarray,
    n_z: int,
    rng_seed: Sequence[int],
    corrupt: Callable[[np.ndarray, int], np.ndarray],
    n_samples: int = N_STYLES,
) -> CanvasInputs:
    """Draw the canvases' fixed test images and latent samples from `rng_seed`.

    Args:
      test_images: uint8 pixels (data_utils.Splits); the inputs hold [0, 1] floats.
      test_labels: their labels.
      n_z: the latent size, for the generation canvas's prior samples.
      rng_seed: seeds NumPy's generator of the images' order and the prior samples.
      corrupt: (clean images, stream) -> the encoder's inputs, as in training; the
        three streams (shown images, latent map, analogies) draw independently.
      n_samples: prior samples of the generation canvas: one per column of a
        conditional model's rows of labels, or the whole grid of a plain VAE's.
    """
    test_x = data_utils.scale(test_images)
    rng = np.random.default_rng(list(rng_seed))
    order = rng.permutation(len(test_x))
    shown, mapped = order[:N_SHOWN], order[:N_LATENT_MAP]
    # The first image of each label in the shuffled order: one source per digit.
    analogy = np.array([order[np.flatnonzero(test_labels[order] == k)[0]] for k in range(10)])
    z_samples = rng.standard_normal((n_samples, n_z)).astype(np.float32)
    return CanvasInputs(
        images=test_x[shown],
        labels=test_labels[shown],
        encoder_inputs=corrupt(test_x[shown], 0),
        map_inputs=corrupt(test_x[mapped], 1),
        map_labels=test_labels[mapped],
        analogy_images=test_x[analogy],
        analogy_inputs=corrupt(test_x[analogy], 2),
        analogy_labels=test_labels[analogy],
        z_samples=z_samples,
    )


def manifold_latents(
    n_z: int, dims: Sequence[int], z_range: float, side: int = MANIFOLD_SIDE
) -> np.ndarray:
    """The manifold's z grid, (side, side, n_z): z[dims[0]] grows left to right and
    z[dims[1]] bottom to top over [-z_range, z_range], as the latent map's axes; the
    other dimensions are 0. With n_z == 1, one row (1, side, 1) along z[0].
    """
    values = np.linspace(-z_range, z_range, side, dtype=np.float32)
    if n_z == 1:
        return values.reshape(1, side, 1)
    z = np.zeros((side, side, n_z), dtype=np.float32)
    z[:, :, dims[0]] = values[np.newaxis, :]
    z[:, :, dims[1]] = values[::-1, np.newaxis]
    return z


def generation_latents(z_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row r = label r, column j = z_samples[j]: -> z (10, S, n_z), labels (10, S)."""
    n_styles = len(z_samples)
    z = np.broadcast_to(z_samples, (10, *z_samples.shape)).copy()
    labels = np.repeat(np.arange(10, dtype=np.int32)[:, np.newaxis], n_styles, axis=1)
    return z, labels


@dataclass(frozen=True)
class Canvases:
    """The arrays behind one epoch's pictures."""

    grids: dict[str, np.ndarray]  # name -> (rows, cols, D) decoder mean images in [0, 1]
    latent_points: np.ndarray  # (5000, n_z) encoder means of inputs.map_inputs
    latent_labels: np.ndarray  # (5000,) their labels, row for row


def canvas_arrays(model: CanvasModel, inputs: CanvasInputs, config) -> Canvases:
    """Everything the canvases show (a main.Config gives n_z, manifold_dims, z_range).

    Reconstructions and analogies decode the posterior mean of their input.
    """

    def decode(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """z (..., n_z) and labels (...) -> mean images (..., D), one decoder call."""
        flat = model.decode(z.reshape(-1, z.shape[-1]), labels.reshape(-1))
        return flat.reshape(*labels.shape, -1)

    grids = {}
    restored = decode(model.encode(inputs.encoder_inputs, inputs.labels), inputs.labels)
    grids["restored"] = restored.reshape(10, N_SHOWN // 10, -1)
    z_grid = manifold_latents(config.n_z, config.manifold_dims, config.z_range)
    if not config.conditional:  # A plain VAE: one manifold, a grid of prior samples.
        no_label = np.zeros(z_grid.shape[:2], np.int32)  # Ignored by the model.
        grids["manifold"] = decode(z_grid, no_label)
        samples = inputs.z_samples.reshape(10, -1, config.n_z)
        grids["generation"] = decode(samples, np.zeros(samples.shape[:2], np.int32))
        return Canvases(
            grids=grids,
            latent_points=model.encode(inputs.map_inputs, inputs.map_labels),
            latent_labels=inputs.map_labels,
        )
    for k in range(10):
        grids[f"manifold_label{k}"] = decode(z_grid, np.full(z_grid.shape[:2], k, np.int32))
    grids["generation"] = decode(*generation_latents(inputs.z_samples))
    # Analogies: row i keeps image i's encoded z (its style) and sweeps the label. An
    # M2 model treats the test image as unlabelled: it is encoded with q(y|x)'s label.
    style_labels = (
        inputs.analogy_labels if model.predict is None else model.predict(inputs.analogy_inputs)
    )
    z_style = model.encode(inputs.analogy_inputs, style_labels)  # (10, n_z)
    z_rows = np.repeat(z_style[:, np.newaxis], 10, axis=1)  # (10, 10, n_z)
    transferred = decode(z_rows, np.tile(np.arange(10, dtype=np.int32), (10, 1)))
    grids["analogy"] = np.concatenate([inputs.analogy_images[:, np.newaxis], transferred], 1)
    return Canvases(
        grids=grids,
        latent_points=model.encode(inputs.map_inputs, inputs.map_labels),
        latent_labels=inputs.map_labels,
    )


def epoch_canvas_path(run_dir: str | os.PathLike, kind: str, epoch: int) -> Path:
    """Where a canvas of one epoch goes: `<run_dir>/epochs/<kind>_epochNNN.png`."""
    return Path(run_dir) / utils.EPOCHS_DIR / f"{kind}_epoch{epoch:03d}.png"


def write_canvases(
    model: CanvasModel, inputs: CanvasInputs, run_dir: str | os.PathLike, epoch: int, config
) -> Canvases:
    """Write the canvases of `epoch` into `run_dir`'s epochs/, from the model as it is now.

    Independent of the training loop: a finished run's restored checkpoint works
    as well. original.png (and noised.png with --add_noise) are written once per
    run, at the top of `run_dir`; `write_latest_and_animations` then puts the newest
    epoch's canvases there too.
    """
    run_dir = Path(run_dir)
    fixed = {FIXED_CANVASES[0]: inputs.images}
    if config.add_noise:
        fixed[FIXED_CANVASES[1]] = inputs.encoder_inputs
    for name, images in fixed.items():
        if not (run_dir / f"{name}.png").exists():
            save_grid(run_dir / f"{name}.png", images, 10, len(images) // 10)

    (run_dir / utils.EPOCHS_DIR).mkdir(exist_ok=True)
    canvases = canvas_arrays(model, inputs, config)
    for name, grid in canvases.grids.items():
        n_rows, n_cols = grid.shape[:2]
        save_grid(
            epoch_canvas_path(run_dir, name, epoch),
            grid.reshape(n_rows * n_cols, -1),
            n_rows,
            n_cols,
        )
    shown = min(config.n_z, 2)
    title = f"Encoder means of {len(canvases.latent_labels):,} test images, epoch {epoch}"
    if config.n_z > 2:
        title += f"\n(first two of {config.n_z} dimensions)"
    plot_latent(
        epoch_canvas_path(run_dir, "latent", epoch),
        canvases.latent_points[:, :shown],
        canvases.latent_labels,
        data_utils.DATASETS[config.dataset].class_names,
        title,
    )
    return canvases


# A canvas of one epoch: <kind>_epochNNN.png, as write_canvases names them.
CANVAS_FILE = re.compile(r"(?P<kind>.+)_epoch(?P<epoch>\d{3,})\.png")


def canvas_files(run_dir: str | os.PathLike) -> dict[int, dict[str, Path]]:
    """The canvases in a run folder: {epoch: {kind: path}}, epochs in ascending order.

    The kind is the name before `_epochNNN.png`: restored, latent, manifold_label3, ...
    They are in epochs/; a run folder made before epochs/ existed has them at its top,
    where they are read too (a resumed one has both), epochs/ first.
    """
    run_dir = Path(run_dir)
    found: dict[int, dict[str, Path]] = {}
    for folder in (run_dir, run_dir / utils.EPOCHS_DIR):  # The later wins.
        for path in folder.glob("*_epoch*.png"):
            match = CANVAS_FILE.fullmatch(path.name)
            if match:
                found.setdefault(int(match["epoch"]), {})[match["kind"]] = path
    return {epoch: found[epoch] for epoch in sorted(found)}


FRAME_MS = 500  # Each canvas epoch of an animation, in milliseconds,
LAST_FRAME_MS = 2000  # and the last one longer, so that the final state can be seen.


def _gif_frame(path: Path) -> Image.Image:
    """A canvas PNG as a GIF frame: grey canvases as they are (256 grey levels, exact),
    colour ones (the latent map) reduced to a palette of 256 colours.

    Fast octree, not the encoder's default median cut: several times faster on the
    latent map (the GIFs are rebuilt at every canvas epoch), and close to the PNG's
    colours; a map of up to 256 colours stays exact.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("L", "P"):
            return image.copy()
        return image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)


def gif_bytes(paths: Sequence[Path]) -> bytes:
    """An endlessly looping GIF with one frame per PNG of `paths`, in that order.

    Pillow merges a frame identical to the one before it into that one (one frame,
    shown for both durations), so an animation has fewer frames than PNGs only if two
    consecutive canvases are equal to the last pixel.
    """
    first = _gif_frame(paths[0])
    rest = (_gif_frame(path) for path in paths[1:])  # Read one by one, as the encoder goes.
    durations = [FRAME_MS] * (len(paths) - 1) + [LAST_FRAME_MS]
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=durations, loop=0)
    return buffer.getvalue()


def canvases_by_kind(run_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """{kind: its PNGs of every canvas epoch, in epoch order}, kinds sorted."""
    by_kind: dict[str, list[Path]] = {}
    for canvases in canvas_files(run_dir).values():
        for kind, path in canvases.items():
            by_kind.setdefault(kind, []).append(path)
    return dict(sorted(by_kind.items()))


def write_latest(run_dir: str | os.PathLike) -> list[Path]:
    """Copy the newest epoch's canvas of every kind to the top of the run folder as
    <kind>.png (restored.png, latent.png, ...), where it is not that already; returns
    the copies written. Atomic, as every file of a run."""
    run_dir = Path(run_dir)
    written = []
    for kind, paths in canvases_by_kind(run_dir).items():
        latest, data = run_dir / f"{kind}.png", paths[-1].read_bytes()
        if not latest.is_file() or latest.read_bytes() != data:
            utils.atomic_write_bytes(latest, data)
            written.append(latest)
    return written


def write_latest_and_animations(run_dir: str | os.PathLike) -> list[Path]:
    """At the top of the run folder, every canvas kind's newest picture and its animation
    (`write_latest`, `write_animations`); returns the files written."""
    return write_latest(run_dir) + write_animations(run_dir)


def write_animations(run_dir: str | os.PathLike) -> list[Path]:
    """Write <kind>.gif for every canvas kind of a run folder (restored.gif,
    manifold_label7.gif, ...) from its PNGs of all canvas epochs so far, one frame per
    epoch in epoch order; returns the GIFs written.

    Each GIF is written atomically, so a kill leaves the previous one whole. A PNG that
    cannot be read leaves its kind's GIF as it was, with one warning line.
    """
    run_dir = Path(run_dir)
    written = []
    for kind, paths in canvases_by_kind(run_dir).items():
        try:
            data = gif_bytes(paths)
        except (OSError, ValueError) as err:  # A damaged or foreign PNG; PIL's errors are these.
            print(
                f"warning: {kind}.gif not updated: cannot read its frames ({err})", file=sys.stderr
            )
            continue
        utils.atomic_write_bytes(run_dir / f"{kind}.gif", data)
        written.append(run_dir / f"{kind}.gif")
    return written


def draw_missing_canvases(
    run_dir: Path,
    model: CanvasModel,
    make_inputs: Callable[[], CanvasInputs],
    config,
    epoch: int,
) -> bool:
    """Draw the canvases of `epoch` and the curves if the run folder lacks them (and then
    the newest pictures and the animations again, with the new frames); a folder made
    before the newest pictures were copied to its top gets them.

    Existing pictures are left alone: they are the record of the run (and equal
    to what would be drawn, since the canvases' inputs are fixed by the seed).
    `make_inputs` is called only if canvases are missing. Returns whether
    canvases were drawn.
    """
    if not (run_dir / utils.CURVES_PNG).exists():
        rows = utils.read_csv(run_dir / utils.METRICS_CSV)
        plot_curves(run_dir / utils.CURVES_PNG, rows, config.train_samples)
    if "latent" in canvas_files(run_dir).get(epoch, {}):
        write_latest(run_dir)
        return False
    write_canvases(model, make_inputs(), run_dir, epoch, config)
    write_latest_and_animations(run_dir)
    return True
