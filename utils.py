"""Small shared helpers: seeding, run folders, atomic writes, flag parsing."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_TRUE = {"true", "yes", "1", "y", "t", "on"}
_FALSE = {"false", "no", "0", "n", "f", "off"}


def str_to_bool(text: str) -> bool:
    """Parse a boolean flag value; `type=bool` would turn "False" into True."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean (True/False, yes/no, 1/0, any case), got {text!r}"
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (via Keras) in one place."""
    import keras  # Imported here so that utils stays cheap for plot-only callers.

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def device_description() -> str:
    """Say what TensorFlow will train on: the GPU names, or the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            names.append(details.get("device_name", gpu.name))
        return f"GPU x{len(gpus)} ({', '.join(names)})"
    return f"CPU ({_cpu_name()}, {os.cpu_count()} logical cores)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write dict rows as CSV; the first row's keys are the header."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a CSV written by `write_csv`; an absent file reads as no rows."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_run_dir(results_dir: str | os.PathLike, tags: Iterable[str]) -> Path:
    """Create a new, empty run folder `<results_dir>/<timestamp>_<tags>`.

    `os.mkdir` is atomic and fails on an existing name, so two runs started in
    the same second get `_2`, `_3`, ... and never share or overwrite a folder.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "_".join([time.strftime("%Y%m%d-%H%M%S"), *tags])
    return create_fresh(results_dir, stem, "", folder=True)


def create_fresh(parent: str | os.PathLike, stem: str, suffix: str, folder: bool) -> Path:
    """Create a new, empty folder or file `<parent>/<stem><suffix>`, else `<stem>_2<suffix>`, ...

    Creation is exclusive (`mkdir`, `O_EXCL`), so two processes never get the
    same name and nothing that exists is ever overwritten.
    """
    parent = Path(parent)
    for attempt in range(1, 1000):
        candidate = parent / (f"{stem}{suffix}" if attempt == 1 else f"{stem}_{attempt}{suffix}")
        try:
            if folder:
                candidate.mkdir()
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"no free name {stem}*{suffix} in {parent}")


def check_can_create_in(folder: str | os.PathLike) -> None:
    """Raise ValueError (saying why) unless a run folder can be created in `folder`.

    The test is real: a temporary folder is made and removed in the nearest
    existing ancestor, since permission bits mislead (root, read-only or
    virtual file systems). Nothing is left behind, and `folder` itself is not
    created here.
    """
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, not a folder; pass a folder.")
    try:
        Path(tempfile.mkdtemp(dir=existing, prefix=".write-test-")).rmdir()
    except OSError as err:
        raise ValueError(
            f"cannot create folders in {existing} ({err.strerror}); pass a folder you can write to."
        ) from err


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers, for config.json."""
    import cv2
    import keras
    import matplotlib
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "matplotlib": matplotlib.__version__,
    }


# --- Image-quality measures for denoising (pure NumPy; images flattened, values in [0, 1]) ---

PSNR_MSE_FLOOR = 1e-10  # A perfect restoration scores 100 dB rather than infinity.
BCE_EPS = 1e-7  # Keras' clip for probabilities of exactly 0 or 1.


def psnr(reference: np.ndarray, estimate: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image, 10 log10(peak² / MSE), in dB: (n, ...) -> (n,)."""
    diff = np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)
    mse = np.mean(np.square(diff.reshape(len(diff), -1)), axis=1)
    return 10.0 * np.log10(peak**2 / np.maximum(mse, PSNR_MSE_FLOOR))


def binary_cross_entropy(
    target: np.ndarray, probability: np.ndarray, eps: float = BCE_EPS
) -> np.ndarray:
    """Mean over pixels of −[t log p + (1−t) log(1−p)] per image, in nats: (n, ...) -> (n,).

    p is clipped to [eps, 1 − eps], so a hard 0/1 image that is wrong at a
    pixel costs −log eps there: BCE judges how confidently an image is wrong.
    """
    t = np.asarray(target, np.float64).reshape(len(target), -1)
    p = np.clip(np.asarray(probability, np.float64).reshape(len(t), -1), eps, 1.0 - eps)
    return -np.mean(t * np.log(p) + (1.0 - t) * np.log1p(-p), axis=1)


def median_filter(images: np.ndarray, size: int = 3, side: int = 28) -> np.ndarray:
    """OpenCV's median filter (`cv2.medianBlur`, edges replicated) on each flattened image."""
    import cv2

    flat = np.asarray(images, np.float32)
    squares = flat.reshape(-1, side, side)
    filtered = np.stack([cv2.medianBlur(image, size) for image in squares])
    return filtered.reshape(flat.shape)


def denoising_metrics(
    clean: np.ndarray, noised: np.ndarray, restored: np.ndarray, chunk: int = 1000
) -> dict:
    """Mean PSNR (dB) and BCE (nats per pixel) against the clean images of three candidates.

    The candidates: the noised input itself, its 3×3 median filter, and the
    model's restoration. Keys `denoise_{psnr,bce}_{noised,median,cvae}`.
    Computed `chunk` images at a time: the float64 work arrays of all 10,000
    test images at once added about 360 MB to a run's peak memory.
    """
    per_image: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(clean), chunk):
        part = slice(start, start + chunk)
        candidates = {
            "noised": noised[part],
            "median": median_filter(noised[part]),
            "cvae": restored[part],
        }
        for measure, fn in (("psnr", psnr), ("bce", binary_cross_entropy)):
            for name, images in candidates.items():
                key = f"denoise_{measure}_{name}"
                per_image.setdefault(key, []).append(fn(clean[part], images))
    return {key: float(np.mean(np.concatenate(values))) for key, values in per_image.items()}
