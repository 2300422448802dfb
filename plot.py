"""Pictures from arrays: image grids (OpenCV) and the latent map and curves (matplotlib).

This module never imports the model or TensorFlow: `main.py` computes the
arrays with the model and hands them over, so every picture here can be made
and tested from plain NumPy arrays.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

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


def plot_curves(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Train and validation −ELBO, reconstruction and KL per epoch; write a PNG.

    Args:
      rows: the metrics rows (as in metrics.csv; strings or numbers), each with
        "epoch" and "train_/valid_" + "loss", "recon", "kl".
    """
    if not rows:
        raise ValueError("no metrics rows to plot")
    epochs = np.array([float(row["epoch"]) for row in rows])
    figure = Figure(figsize=(13, 3.8))
    for index, (key, name) in enumerate(CURVE_PANELS):
        axes = figure.add_subplot(1, len(CURVE_PANELS), index + 1)
        for split, style in (("train", "-"), ("valid", "--")):
            values = [float(row[f"{split}_{key}"]) for row in rows]
            marker = "o" if len(rows) <= 20 else None  # Dots help only on short runs.
            axes.plot(epochs, values, style, marker=marker, markersize=3, label=split)
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("nats per image")
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    _save_figure(path, figure)
