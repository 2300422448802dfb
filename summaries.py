"""A run's TensorBoard events, in `<run folder>/tb/`: `tensorboard --logdir results`.

Every epoch (step = the epoch's number): its row of metrics.csv, the train and
validation −ELBO, reconstruction and KL, the learning rate and the seconds; at each
canvas epoch the canvases as images, read from the PNGs just written (the same
pixels); at the end of the final evaluation the test metrics and the run's flags
(config.json) as text.

TensorBoard must show one curve per run, also after a kill -9 and `--resume`, so each
(tag, step) is written at most once. An epoch's values are written only after its
checkpoint committed it (an epoch trained again after a crash was never written),
and a resumed run first reads the events back and writes, from metrics.csv and the
PNGs, only the values of committed epochs that they lack (those of a write the kill
cut short). The events are a record beside the run's files, never a reason to stop
it: a damaged events file or a failed write is one warning line, and the next
`--resume` writes what is missing.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import tensorflow as tf
from google.protobuf.message import DecodeError

# The Event protocol buffer of the event files; TensorFlow 2 has no public reader of
# them but tf.compat.v1.train.summary_iterator, which is deprecated and reads this way.
from tensorflow.core.util import event_pb2

import plot
import utils

FOLDER = utils.TB_DIR  # In the run folder.
CONFIG_TAG = "config"
# What the scalar groups mean, shown by TensorBoard beside their charts.
DESCRIPTIONS = {
    "loss": "−ELBO in nats per image (train: −L_K with --train_samples K > 1)",
    "recon": "reconstruction −log p(x|z,y), nats per image",
    "kl": "KL(q(z|x,y) ‖ p(z)), nats per image",
    "learning_rate": "Adam's learning rate at the epoch's last step",
    "seconds": "wall time of the epoch's training and validation",
}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cause(err: BaseException) -> str:
    """An error's message without what TensorFlow adds around it (the op, the device)."""
    text = err.message if isinstance(err, tf.errors.OpError) else str(err)
    text = re.sub(r"\{\{.*?\}\}", "", text)
    return re.sub(r"\s*\[Op:.*", "", text, flags=re.S).strip()


# --- What is written: pure functions of the run's records ---


class Summary(NamedTuple):
    """One value to write: a scalar (float), an image (the path of a PNG) or a text (str)."""

    tag: str
    kind: str  # "scalar", "image" or "text"
    value: float | Path | str


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.csv row (strings or numbers) -> {tag: value}.

    train_loss -> loss/train, valid_kl -> kl/valid, ...: TensorBoard groups the
    charts by the part before the slash, so train and validation sit side by side;
    learning_rate and seconds keep their names. The epoch is the step, not a value.
    """
    values = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        split, _, term = key.partition("_")
        tag = f"{term}/{split}" if split in ("train", "valid") else key
        values[tag] = float(value)
    return values


def final_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json -> {tag: value} of its numbers: test_loss -> test/loss,
    denoise_psnr_cvae -> denoise/psnr_cvae, ...; metrics not computed (None) are left out."""
    values = {}
    for key, value in metrics.items():
        group, _, name = key.partition("_")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if group in ("test", "denoise") and number:
            values[f"{group}/{name}"] = float(value)
    return values


def flags_text(flags: Mapping[str, Any]) -> str:
    """config.json as a Markdown table of flag and value (the text tab renders it);
    nested values (the library versions) as flattened names."""
    rows = ["| flag | value |", "| --- | --- |"]

    def add(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{name}.{key}", inner)
            return
        shown = value if isinstance(value, str) else json.dumps(value)
        rows.append(f"| {_cell(name)} | {_cell(shown)} |")

    for name, value in flags.items():
        add(name, value)
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # A pipe would end the Markdown table's cell.


def canvas_tag(kind: str) -> str:
    return f"canvas/{kind}"


# --- Reading the events back ---


def read_tags(path: Path) -> list[tuple[str, int]]:
    """The (tag, step) of every value in one events file, up to its first damaged record.

    A kill -9 may cut the last record short: what precedes it is read (TensorBoard
    reads it as far) and one warning line says where it stops.
    """
    found: list[tuple[str, int]] = []
    records = 0
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            found += [(value.tag, int(event.step)) for value in event.summary.value]
            records += 1
    except (tf.errors.OpError, DecodeError) as err:
        warn(
            f"{path} is damaged after {records} records ({cause(err)}); TensorBoard reads "
            "it as far, and the values it lacks are written again"
        )
    return found


def read_logged(folder: Path) -> dict[str, set[int]]:
    """{tag: steps} of every value in the event files of `folder` (none if it is absent)."""
    logged: dict[str, set[int]] = defaultdict(set)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for tag, step in read_tags(path):
            logged[tag].add(step)
    return logged


def read_png(path: Path) -> tf.Tensor | None:
    """A PNG's pixels, (height, width, channels) uint8; None, with a warning, if unreadable."""
    try:
        return tf.io.decode_png(tf.io.read_file(str(path)))
    except tf.errors.OpError as err:
        warn(f"{path} left out of TensorBoard: cannot read it ({cause(err)})")
        return None


# --- Writing ---


class EventLog:
    """The events of one run folder: writes each (tag, step) at most once.

    It reads the existing events when made, and opens its writer (a new events file:
    TensorFlow never appends to an old one) only when it first has something to write.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.logged = read_logged(self.folder)
        self._writer: tf.summary.SummaryWriter | None = None
        self.failed = False  # After a failed write, nothing more in this process.

    def write(self, step: int, summaries: Iterable[Summary]) -> list[str]:
        """Write those of `summaries` whose tag lacks `step`, then flush; returns their tags."""
        new = [s for s in summaries if step not in self.logged.get(s.tag, ())]
        if not new or self.failed:
            return []
        written = []
        try:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.folder))
            with self._writer.as_default(step=step):
                for summary in new:
                    if _write_one(summary):
                        self.logged[summary.tag].add(step)
                        written.append(summary.tag)
            self._writer.flush()
        except (OSError, tf.errors.OpError) as err:
            self.failed = True
            warn(
                f"cannot write TensorBoard events in {self.folder} ({cause(err)}); the run "
                "goes on without them, and `--resume` or `--eval_only` writes what they lack"
            )
        return written

    def write_epoch(self, row: Mapping[str, Any], canvases: Mapping[str, Path]) -> list[str]:
        """An epoch's row of metrics.csv and its canvas PNGs ({kind: path}); with the first
        canvases, the fixed ones of the run (original.png, noised.png)."""
        step = int(row["epoch"])
        summaries = [Summary(tag, "scalar", value) for tag, value in epoch_scalars(row).items()]
        summaries += [
            Summary(canvas_tag(kind), "image", path) for kind, path in sorted(canvases.items())
        ]
        for name in plot.FIXED_CANVASES if canvases else ():
            path = self.run_dir / f"{name}.png"
            if path.is_file() and not self.logged.get(canvas_tag(name)):
                summaries.append(Summary(canvas_tag(name), "image", path))
        return self.write(step, summaries)

    def backfill(self, rows: Iterable[Mapping[str, Any]], epochs_done: int) -> list[int]:
        """Write what the events lack of the committed epochs (rows of metrics.csv up to
        `epochs_done`, and their canvases); returns the epochs that lacked something."""
        canvases = plot.canvas_files(self.run_dir)
        filled = []
        for row in rows:
            epoch = int(row["epoch"])
            if epoch <= epochs_done and self.write_epoch(row, canvases.get(epoch, {})):
                filled.append(epoch)
        return filled

    def write_final(
        self, step: int, metrics: Mapping[str, Any], flags: Mapping[str, Any]
    ) -> list[str]:
        """The test metrics (metrics.json) and the flags (config.json), at the epoch evaluated.

        A later evaluation of the same epoch (`--eval_only`) rewrites metrics.json but
        not these: TensorBoard keeps the first.
        """
        summaries = [Summary(tag, "scalar", value) for tag, value in final_scalars(metrics).items()]
        summaries.append(Summary(CONFIG_TAG, "text", flags_text(flags)))
        return self.write(step, summaries)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, tf.errors.OpError) as err:
                warn(f"cannot close the TensorBoard events in {self.folder} ({cause(err)})")
            self._writer = None


def _write_one(summary: Summary) -> bool:
    """Write one summary to the default writer at its default step; False if it could not
    be made (an unreadable PNG), which then stays missing, to be written by a later resume."""
    group = summary.tag.split("/")[0]
    if summary.kind == "scalar":
        tf.summary.scalar(summary.tag, summary.value, description=DESCRIPTIONS.get(group))
    elif summary.kind == "image":
        pixels = read_png(summary.value)
        if pixels is None:
            return False
        tf.summary.image(summary.tag, pixels[tf.newaxis], max_outputs=1)
    else:
        tf.summary.text(summary.tag, summary.value)
    return True


def record_final(events: EventLog, run_dir: Path, epochs: int) -> None:
    """Write the test metrics and the flags, read from the run's metrics.json and config.json."""
    metrics = json.loads((run_dir / utils.METRICS_JSON).read_text())
    flags = json.loads((run_dir / utils.CONFIG_FILE).read_text())
    events.write_final(epochs, metrics, flags)
