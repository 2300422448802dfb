"""Small shared helpers with no model knowledge: seeding, run folders, atomic writes,
JSON and CSV, the device description, progress reports."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
# Set here, before any module imports TensorFlow (every entry point and the
# tests import utils first): hides TensorFlow's C++ start-up chatter, not its errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C.


# The run folder's files, named once (../shared/DESIGN.md, "The run folder").
CONFIG_FILE = "config.json"  # Every flag, the library versions, the code's commit.
METRICS_CSV = "metrics.csv"  # One row per epoch, the epoch number first.
METRICS_JSON = "metrics.json"  # The final evaluation.
CURVES_PNG = "curves.png"
CHECKPOINTS_DIR = "checkpoints"  # The last epochs' checkpoints (tf.train.CheckpointManager).
INTERRUPTED_DIR = "interrupted"  # Inside CHECKPOINTS_DIR: the last Ctrl-C's mid-epoch one.
TB_DIR = "tb"  # TensorBoard events.
# The canvases of every canvas epoch, <kind>_epochNNN.png; the newest of each kind is
# also at the top of the run folder as <kind>.png, beside its animation <kind>.gif.
EPOCHS_DIR = "epochs"
EXPORT_DIR = "export"  # The SavedModel (export.write_export), for use without this project.
LOCK_FILE = ".lock"  # Names the process that holds the folder (run_folder.lock_run_folder).


class UserError(RuntimeError):
    """A problem the user can fix; reported as one line, without a traceback."""


class NonFiniteLoss(UserError):
    """A loss term or a weight became NaN or Inf: the run has diverged."""


def ceil_div(n: int, d: int) -> int:
    """⌈n / d⌉ for positive integers: batches of d that hold n items, the last one short."""
    return -(-n // d)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (via Keras) in one place."""
    import keras  # Imported here so that utils stays cheap for plot-only callers.

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


# TensorFlow's pip package looks for CUDA at start-up and logs the failure on a
# CPU-only machine, at error level for cuInit. TF_CPP_MIN_LOG_LEVEL=3 would hide it,
# but it would hide every real C++ error too, so the run explains it instead, in its
# own words: a log that quoted TensorFlow's lines would hold them twice.
CPU_ONLY_NOTE = (
    "No GPU found: training runs on the CPU; TensorFlow's start-up messages about CUDA "
    "(on stderr) are its search for a GPU, harmless."
)


def interactive() -> bool:
    """Whether stdout is a terminal. Progress bars redraw their line with carriage returns
    and colour codes: on a terminal that is a bar, in a file (nohup, a cluster job's log)
    it is hundreds of lines of escapes, so a run whose output goes to a file prints plain
    lines only."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # stdout replaced (tests) or closed.
        return False


class Progress:
    """Progress through `total` units of work, as fits where stdout goes.

    On a terminal, Keras' progress bar. In a file, no bar: nothing, or with `every`
    (seconds) a plain line at most that often, so that a long pass (the final
    evaluation's) shows it is alive without filling the log.
    """

    def __init__(
        self,
        total: int,
        unit: str = "step",
        what: str = "",
        every: float | None = None,
        stateful_metrics: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.unit, self.what, self.every = total, unit, what, every
        self._clock = clock
        self._start = self._last = clock()
        self._bar = None
        if interactive():
            import keras

            self._bar = keras.utils.Progbar(
                total, unit_name=unit, stateful_metrics=list(stateful_metrics or [])
            )

    def update(self, done: int, values: Sequence[tuple[str, float]] | None = None) -> None:
        """`done` of the `total` units are done; `values` are shown beside a bar."""
        if self._bar is not None:
            self._bar.update(done, values)
            return
        if self.every is None or done >= self.total:
            return
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            elapsed = now - self._start
            left = elapsed / max(done, 1) * (self.total - done)
            print(
                f"{self.what}: {self.unit} {done} of {self.total} after {elapsed:.0f} s, "
                f"about {left:.0f} s to go",
                flush=True,
            )


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


def reserve_aside(path: Path) -> Path:
    """A new, empty name beside `path` for its previous version, stamped with its time:
    `<stem>.<YYYYmmdd-HHMMSS><suffix>` (a folder for a folder), never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    return create_fresh(path.parent, f"{path.stem}.{stamp}", path.suffix, folder=path.is_dir())


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
