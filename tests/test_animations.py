"""The animations: one GIF per canvas kind, one frame per canvas epoch, in epoch order,
each frame the pixels of its PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import CANVAS_KINDS, TINY_FLAGS, read_canvas, single_run_dir
from PIL import Image, ImageSequence

import main
import plot


def gif_frames(path: Path, mode: str = "L") -> list[np.ndarray]:
    """Every frame of a GIF as Pillow composes it, converted to `mode`."""
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        return [np.asarray(frame.convert(mode)) for frame in ImageSequence.Iterator(gif)]


def png_pixels(path: Path, mode: str = "L") -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


def test_a_gif_per_kind_with_a_frame_per_epoch_in_epoch_order(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # Epochs whose names sort otherwise as text (epoch1000 before epoch200): numeric order.
    epochs = [5, 200, 1000]
    canvases = {epoch: rng.uniform(size=(6, 28, 28)) for epoch in epochs}
    for epoch, images in canvases.items():
        plot.save_grid(tmp_path / f"restored_epoch{epoch:03d}.png", images, 2, 3)
        plot.save_grid(tmp_path / f"manifold_label3_epoch{epoch:03d}.png", images[::-1], 3, 2)
    plot.save_grid(tmp_path / "original.png", canvases[5], 2, 3)  # Not an epoch's canvas.

    written = plot.write_animations(tmp_path)
    assert sorted(p.name for p in written) == ["manifold_label3.gif", "restored.gif"]
    for kind in ("restored", "manifold_label3"):
        frames = gif_frames(tmp_path / f"{kind}.gif")
        assert len(frames) == len(epochs)
        for frame, epoch in zip(frames, epochs, strict=True):
            np.testing.assert_array_equal(
                frame, read_canvas(tmp_path / f"{kind}_epoch{epoch:03d}.png")
            )
    with Image.open(tmp_path / "restored.gif") as gif:
        assert gif.info["loop"] == 0  # Loops for ever.
    assert not list(tmp_path.glob(".*"))  # No temporary file left.
    assert capsys.readouterr().err == ""


def test_a_colour_canvas_keeps_its_size_and_colours(tmp_path):
    # Like the latent map: an RGBA figure from matplotlib; a GIF holds 256 colours a frame.
    for epoch in (1, 2):
        rgba = np.zeros((40, 60, 4), np.uint8)
        rgba[..., 3] = 255
        rgba[:, : 20 * epoch, 0] = 200  # A red band that grows.
        Image.fromarray(rgba).save(tmp_path / f"latent_epoch{epoch:03d}.png")
    plot.write_animations(tmp_path)
    frames = gif_frames(tmp_path / "latent.gif", "RGB")
    assert len(frames) == 2
    for frame, epoch in zip(frames, (1, 2), strict=True):
        np.testing.assert_array_equal(
            frame, png_pixels(tmp_path / f"latent_epoch{epoch:03d}.png", "RGB")
        )


def test_an_unreadable_png_keeps_the_previous_gif_and_warns_once(tmp_path, capsys):
    images = np.random.default_rng(1).uniform(size=(4, 28, 28))
    plot.save_grid(tmp_path / "generation_epoch001.png", images, 2, 2)
    plot.write_animations(tmp_path)
    before = (tmp_path / "generation.gif").read_bytes()
    (tmp_path / "generation_epoch002.png").write_bytes(b"\x89PNG cut short")
    assert plot.write_animations(tmp_path) == []
    assert (tmp_path / "generation.gif").read_bytes() == before
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: generation.gif not updated")


@pytest.mark.slow
def test_a_run_writes_every_animation_with_one_frame_per_canvas_epoch(tmp_path):
    argv = [*TINY_FLAGS, "--epochs", "3", "--plot_every", "1", "--iw_samples", "0"]
    assert main.main([*argv, "--results_dir", str(tmp_path)]) == 0
    run_dir = single_run_dir(tmp_path)
    assert {p.name for p in run_dir.glob("*.gif")} == {f"{kind}.gif" for kind in CANVAS_KINDS}
    for kind in CANVAS_KINDS:
        mode = "RGB" if kind == "latent" else "L"  # The latent map is a colour figure.
        frames = gif_frames(run_dir / f"{kind}.gif", mode)
        assert len(frames) == 3, kind
        for epoch, frame in enumerate(frames, start=1):
            png = png_pixels(run_dir / "epochs" / f"{kind}_epoch{epoch:03d}.png", mode)
            assert frame.shape == png.shape, kind
            if mode == "L":  # Grey canvases: the very pixels (the latent map's are quantised).
                np.testing.assert_array_equal(frame, png, err_msg=f"{kind}, epoch {epoch}")
