"""A run's TensorBoard events, in `<run folder>/tb/`: `tensorboard --logdir results`.

Every epoch (step = the epoch's number): its row of metrics.csv, the train and
validation −ELBO, reconstruction and KL, the learning rate and the seconds; at each
canvas epoch the canvases as images, read from the PNGs just written (the same
pixels); at the end of the final evaluation the test metrics and the run's flags
(config.json) as text. For the HParams dashboard, which compares runs by flag, the
flags that define the run, once per run, at its start (step 0, as TensorBoard keeps
hparams), with the metrics its columns show: the test metrics, and the epochs trained
and the evaluation's settings (eval/...), which a resume or --eval_only may change.

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

import dataclasses
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

# The Event protocol buffer of the event files; TensorFlow 2 has no public reader of
# them but tf.compat.v1.train.summary_iterator, which is deprecated and reads this way.
from tensorflow.core.util import event_pb2

import plot
import utils
from config import RESUME_OVERRIDABLE, Config
from data_utils import N_TRAIN

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
    """One value to write: a scalar (float), an image (the path of a PNG), a text (str),
    the hparams' columns (None) or a run's hparams ((values, the run's name))."""

    tag: str
    kind: str  # "scalar", "image", "text", "hparams_config" or "hparams"
    value: float | Path | str | tuple[dict, str] | None


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


# metrics.json's settings of the evaluation: how far the run had trained, on how many
# test images, with how many importance samples.
EVAL_SETTINGS = ("epochs", "n_eval", "iw_samples")


def final_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json -> {tag: value} of its numbers: test_loss -> test/loss,
    denoise_psnr_cvae -> denoise/psnr_cvae, ..., and the evaluation's settings epochs ->
    eval/epochs, ...; metrics not computed (None) are left out."""
    values = {}
    for key, value in metrics.items():
        group, _, name = key.partition("_")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if group in ("test", "denoise") and number:
            values[f"{group}/{name}"] = float(value)
        elif key in EVAL_SETTINGS and number:
            values[f"eval/{key}"] = float(value)
    return values


# --- The HParams dashboard: runs compared by flag ---

# The flags that are not a run's hparams: those a resume may change (--epochs, the
# pictures', the devices', the evaluation's settings; hparams are written once and must
# stay true, so the epochs trained and the evaluation's settings are metrics instead),
# and where the run's files are.
NOT_HPARAMS = frozenset((*RESUME_OVERRIDABLE, "eval_only", "results_dir"))
# The columns the dashboard shows until others are ticked (it shows five, and orders the
# columns by whether the runs' values differ, then by name). The experiment says that
# these differ, the flags runs are mostly compared by, so that they come first.
FIRST_HPARAMS = ("n_z", "kl_weight", "binarize", "add_noise", "train_samples")
# The dashboard's metrics, in its columns' order (the first five shown): each the last
# value of its tag.
HPARAMS_METRICS = {
    "test/loss": "test −ELBO",
    "test/nll_x_given_y": "test −log p(x|y)",
    "test/classifier_error": "test error (%)",
    "eval/epochs": "epochs",
    "loss/valid": "valid −ELBO",
    "test/nll_x": "test −log p(x)",
    "test/q_error": "test q(y|x) error (%)",
    "denoise/psnr_cvae": "restored PSNR (dB)",
    "eval/n_eval": "test images",
    "eval/iw_samples": "IW samples K",
}
# A numeric flag's domain: any number. The dashboard needs to know a column is numeric
# (to filter it by range and sort it as numbers), not its bounds: its filters start open.
ANY_NUMBER = hp.RealInterval(-sys.float_info.max, sys.float_info.max)
HPARAMS_TAG = hparams_metadata.SESSION_START_INFO_TAG  # The run's values.
EXPERIMENT_TAG = hparams_metadata.EXPERIMENT_TAG  # The columns, the same in every run.


def hparam_fields() -> list[dataclasses.Field]:
    """The Config fields that are hparams."""
    return [f for f in dataclasses.fields(Config) if f.name not in NOT_HPARAMS]


def experiment_summary() -> summary_pb2.Summary:
    """The dashboard's columns, as TensorBoard's hparams_config writes them: each hparam
    with its domain (the choices of a flag that has them, True/False, any number; a free
    string has none) and its help line, FIRST_HPARAMS marked as differing; then the
    metrics. TensorBoard reads the first run's: every run writes the same."""
    hparams = []
    for f in hparam_fields():
        if f.metadata.get("choices"):
            domain = hp.Discrete(list(f.metadata["choices"]))
        elif f.type == "bool":
            domain = hp.Discrete([False, True])
        elif f.type in ("int", "float", "int | None", "float | None"):
            domain = ANY_NUMBER
        else:  # n_hidden's sizes and --features' folder, as text.
            domain = None
        hparams.append(hp.HParam(f.name, domain, description=f.metadata.get("help")))
    metrics = [hp.Metric(tag, display_name=name) for tag, name in HPARAMS_METRICS.items()]
    summary = hp.hparams_config_pb(hparams, metrics)
    plugin_data = summary.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in FIRST_HPARAMS
    plugin_data.content = data.SerializeToString()
    return summary


def hparams_of(config: Config) -> dict[str, bool | int | float | str]:
    """A run's hparams: each flag as one bool, number or string (the types TensorBoard
    takes): --n_hidden as typed ("500", "500 500 300 300"); the absent --n_train and
    --n_labeled as the counts they mean (every training image, all labelled); an absent
    --features as ""."""
    n_train = config.n_train or N_TRAIN
    values: dict[str, bool | int | float | str] = {}
    for f in hparam_fields():
        value = getattr(config, f.name)
        if f.name == "n_train":
            value = n_train
        elif f.name == "n_labeled":
            value = config.n_labeled or n_train
        elif isinstance(value, tuple):
            value = " ".join(map(str, value))
        elif value is None:
            value = ""
        values[f.name] = value
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
        not these: TensorBoard keeps the first. The evaluation's settings (eval/...) go
        only with the metrics they describe: not beside an earlier evaluation's metrics
        (in the events of a run made before the settings were written).
        """
        scalars = final_scalars(metrics)
        earlier = any(
            step in self.logged.get(tag, ()) for tag in scalars if not tag.startswith("eval/")
        )
        summaries = [
            Summary(tag, "scalar", value)
            for tag, value in scalars.items()
            if not (earlier and tag.startswith("eval/"))
        ]
        summaries.append(Summary(CONFIG_TAG, "text", flags_text(flags)))
        return self.write(step, summaries)

    def write_hparams(self, config: Config) -> list[str]:
        """The run's hparams and the dashboard's columns, at step 0, once per run: a
        resumed or evaluated run that has them writes nothing, one made before them
        gets them. The run is named by its folder."""
        return self.write(
            0,
            [
                Summary(EXPERIMENT_TAG, "hparams_config", None),
                Summary(HPARAMS_TAG, "hparams", (hparams_of(config), self.run_dir.name)),
            ],
        )

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
    elif summary.kind == "hparams_config":
        tf.summary.experimental.write_raw_pb(experiment_summary().SerializeToString(), step=0)
    elif summary.kind == "hparams":
        values, trial_id = summary.value
        hp.hparams(values, trial_id=trial_id)
    else:
        tf.summary.text(summary.tag, summary.value)
    return True


def record_final(events: EventLog, run_dir: Path, epochs: int) -> None:
    """Write the test metrics and the flags, read from the run's metrics.json and config.json."""
    metrics = json.loads((run_dir / utils.METRICS_JSON).read_text())
    flags = json.loads((run_dir / utils.CONFIG_FILE).read_text())
    events.write_final(epochs, metrics, flags)
