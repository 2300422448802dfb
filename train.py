"""Training and evaluation of one run: `run(config)` and `evaluate_only(config)`.

A run's life: its state (model, optimizer, random generator, checkpoints) is
built, its folder opened (or resumed), its epochs trained in compiled chunks
of steps with a progress bar and Ctrl-C between chunks, each epoch recorded
(metrics.csv, curves, canvases and their animations, a checkpoint, then its
TensorBoard events in tb/), and the final model scored on the test split into
metrics.json. `config` is a `main.Config`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import keras
import numpy as np
import tensorflow as tf

import cvae
import data_utils
import plot
import summaries
import utils

if TYPE_CHECKING:
    from main import Config

# Compiled training steps between two looks from Python (progress bar, Ctrl-C,
# NaN check): about a second of training for the default run on a CPU.
STEPS_PER_CHUNK = 50

# Fixed seeds, combined with --seed where a run's own draws are meant. The
# held-out splits draw from seeds of their own, so that every epoch and every
# run sees the same noise, binarisation and ε there and their numbers compare.
VALID_SEED = 1_000_003
TEST_SEED = 2_000_003
CANVAS_SEED = 3_000_003  # With --seed: the canvases' test images, noise and prior samples.
IW_SEED = 3_000_017  # The importance samples of the test evaluation.


class UserError(RuntimeError):
    """A problem the user can fix; reported as one line, without a traceback."""


class NonFiniteLoss(UserError):
    """A loss term or a weight became NaN or Inf: the run has diverged."""


def non_finite_terms(terms: Mapping[str, float]) -> str | None:
    """ "name=value, ..." for every NaN or Inf term, or None if all are finite.

    All bad terms are listed, so that a message shows whether the
    reconstruction, the KL or both broke.
    """
    bad = [f"{name}={value}" for name, value in terms.items() if not math.isfinite(value)]
    return ", ".join(bad) or None


# --- The run's state ---


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The tf.distribute strategy that `--strategy` names (the default one for 'none')."""
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if config.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError(
                "--strategy multi_worker needs the TF_CONFIG environment variable that "
                "lists the machines and this one's index (see the README's GPU section)."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def objective(config: Config) -> cvae.Objective:
    """What the training steps optimise: noise, binarisation, K, KL warm-up and weight,
    and with --n_labeled M2's labelled rows per step, their share and α."""
    n_train = config.n_train or data_utils.N_TRAIN
    return cvae.Objective(
        add_noise=config.add_noise,
        binarize=config.binarized,
        train_samples=config.train_samples,
        kl_warmup_steps=config.kl_warmup * config.steps_per_epoch,
        kl_weight=config.kl_weight,
        labelled_batch=config.labelled_batch,
        labelled_share=(config.n_labeled or 0) / n_train,
        alpha=config.alpha,
    )


def use_xla(config: Config, replicas: int) -> bool:
    """Whether the training chunks are compiled with XLA: with `--xla auto` or `on`, when
    the run has one replica (the compiled loop does not take a strategy's several).

    On the CPU too: an epoch measured 27 % faster, for about 3 s of compiling at
    start-up (README, "Speed")."""
    return config.xla != "off" and replicas == 1


def load_splits(config: Config) -> data_utils.Splits:
    """The train/validation/test splits of the run's dataset; a data problem is a UserError."""
    try:
        return data_utils.load_dataset(config.dataset, config.data_dir)
    except data_utils.DataError as err:
        raise UserError(str(err)) from err


class TrainingTensors(NamedTuple):
    train_images: tf.Tensor  # (n_train, D) uint8 on a CPU, float32 in [0, 1] on a GPU
    train_labels: tf.Tensor  # (n_train,)
    valid_images: tf.Tensor  # (N_VALID, D) float32 in [0, 1]
    valid_labels: tf.Tensor  # (N_VALID,)


def training_tensors(splits: data_utils.Splits, config: Config) -> TrainingTensors:
    """The training split (its first `--n_train` images) and the validation split as tensors.

    The training images stay uint8 on a CPU (4× smaller; each batch is scaled in
    the graph, to the same floats); with a GPU they are scaled once, since a
    uint8 gather without a GPU kernel would run on the host at every step.
    """
    n_train = config.n_train or len(splits.train_images)
    train_x = splits.train_images[:n_train]
    if tf.config.list_physical_devices("GPU"):
        train_x = data_utils.scale(train_x)
    return TrainingTensors(
        tf.constant(train_x),
        tf.constant(splits.train_y[:n_train]),
        tf.constant(data_utils.scale(splits.valid_images)),
        tf.constant(splits.valid_y),
    )


class LabelledSplit(NamedTuple):
    """M2's training images (--n_labeled): indices into the training tensors."""

    labelled: tf.Tensor  # (N_l,) int32, sorted: the images whose labels are kept
    unlabelled: tf.Tensor  # (N_u,) int32, sorted: the others; an epoch is a pass over them
    batch: int  # B_l, labelled rows per step


def labelled_split(train_labels: np.ndarray, config: Config) -> LabelledSplit | None:
    """The run's labelled and unlabelled training images (None without --n_labeled), the
    same at every resume (drawn from --seed alone); prints the count per class."""
    if not config.n_labeled:
        return None
    try:
        labelled = data_utils.labelled_subset(train_labels, config.n_labeled, config.seed)
    except ValueError as err:
        raise UserError(str(err)) from err
    unlabelled = np.setdiff1d(np.arange(len(train_labels), dtype=np.int32), labelled)
    counts = np.bincount(train_labels[labelled], minlength=data_utils.N_CLASSES)
    print(
        f"M2: {len(labelled)} labelled training images (per class {counts.tolist()}), "
        f"{len(unlabelled)} unlabelled; {config.labelled_batch} labelled per step"
    )
    return LabelledSplit(tf.constant(labelled), tf.constant(unlabelled), config.labelled_batch)


def epoch_batches(
    n_images: int, batch_size: int, seed: tf.Tensor, split: LabelledSplit | None = None
) -> tf.Tensor:
    """One row of image indices per step of an epoch, (steps, batch_size [+ B_l]), int32.

    A shuffle of the images from `seed`; the short last batch is padded with −1
    (rows that weigh nothing), so that every step has the same static shape and
    the compiled chunk is traced once. With `split` (M2), the shuffled images
    are the unlabelled ones (`n_images` of them), and each row continues with
    B_l labelled indices: reshuffled cycles of the labelled set, each cycle a
    permutation drawn from fold_in(seed, 1), so every labelled image is seen
    equally often.
    """
    n_steps = -(-n_images // batch_size)
    order = tf.random.experimental.stateless_shuffle(tf.range(n_images), seed=seed)
    if split is not None:
        order = tf.gather(split.unlabelled, order)
    batches = tf.reshape(
        tf.pad(order, [[0, n_steps * batch_size - n_images]], constant_values=-1),
        (n_steps, batch_size),
    )
    if split is None:
        return batches
    n_labelled, needed = int(split.labelled.shape[0]), n_steps * split.batch
    cycles = -(-needed // n_labelled)
    keys = tf.random.stateless_uniform(
        [cycles, n_labelled], seed=tf.random.experimental.stateless_fold_in(seed, 1)
    )
    drawn = tf.reshape(tf.gather(split.labelled, tf.argsort(keys, axis=1)), [-1])[:needed]
    return tf.concat([batches, tf.reshape(drawn, (n_steps, split.batch))], axis=1)


def make_epoch_progress() -> tf.Module:
    """Variables that say where the current epoch stands, for a mid-epoch checkpoint.

    step: steps of the epoch done (0 = not started); shuffle_seed and
    step_seed: the epoch's two seeds (its order, and the random draws of its
    steps); sums: Σ over the images seen of each term of `cvae.TERMS`, in
    float64. With these, a resumed epoch takes the same batches with the same
    draws and reports the same means as an uninterrupted one.
    """
    progress = tf.Module(name="epoch_progress")
    progress.step = tf.Variable(0, dtype=tf.int64, trainable=False)
    progress.shuffle_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.step_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.sums = tf.Variable(tf.zeros(len(cvae.TERMS), tf.float64), trainable=False)
    return progress


class State(NamedTuple):
    """Everything a checkpoint holds, and the two checkpoints that hold it."""

    model: cvae.CVAE
    optimizer: keras.optimizers.Optimizer
    learning_rate: keras.optimizers.schedules.LearningRateSchedule  # The optimizer's, by step.
    generator: tf.random.Generator  # The run's random stream: epoch seeds, in order.
    epoch: tf.Variable  # Epochs done.
    progress: tf.Module  # Where the current epoch stands (make_epoch_progress).
    checkpoint: tf.train.Checkpoint  # Saved at each epoch's end.
    interrupted: tf.train.Checkpoint  # The same plus `progress`: saved on Ctrl-C mid-epoch.


# Float32 copies of every parameter that training holds at once: the weights,
# their gradients and Adam's two slots (m and v).
TRAINING_COPIES = 4


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: /proc/meminfo's MemAvailable,
    else the free physical pages; None if the system says neither."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # In kB.
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(n_bytes: float) -> str:
    if n_bytes < 1e9:
        return f"{n_bytes / 1e6:,.0f} MB"
    return f"{n_bytes / 1e9:,.0f} GB" if n_bytes >= 10e9 else f"{n_bytes / 1e9:.1f} GB"


def check_model_fits_in_memory(config: Config) -> None:
    """Refuse, before any weight is made, a model whose training copies cannot fit in memory."""
    n_weights = cvae.parameter_count(
        config.n_z, config.hidden_sizes, classifier=config.n_labeled is not None
    )
    needed = n_weights * 4 * TRAINING_COPIES
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(
            f"--n_z {config.n_z} with --n_hidden {' '.join(map(str, config.n_hidden))} needs "
            f"{_gigabytes(needed)} for the weights, gradients and Adam's slots; this machine "
            f"has {_gigabytes(available)} available: choose a smaller --n_z or --n_hidden."
        )


def build_state(config: Config, strategy: tf.distribute.Strategy | None = None) -> State:
    """A fresh state for `config`; training, --resume, --eval_only and the benchmarks
    all build and restore through here.

    The model and the optimizer are made under `strategy`'s scope (their
    variables then live on every replica). The epoch-end checkpoint's layout is
    fixed (model=, optimizer=, generator=, epoch=); the Ctrl-C one adds
    progress= and lives in a folder of its own.
    """
    strategy = strategy or tf.distribute.get_strategy()
    policy = "mixed_float16" if config.mixed_precision else "float32"
    learning_rate = cvae.learning_rate_schedule(
        config.learning_rate, config.lr_decay, config.steps_per_epoch
    )
    with strategy.scope():
        model = cvae.CVAE(
            config.n_z, config.hidden_sizes, config.keep_prob, seed=config.seed,
            dtype_policy=policy, classifier=config.n_labeled is not None,
        )  # fmt: skip
        optimizer = cvae.FusedAdam(learning_rate)
        if config.mixed_precision:
            # Scales the loss up so that float16 gradients do not underflow.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # So that a restore has slots to fill.
    generator = tf.random.Generator.from_seed(config.seed)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    progress = make_epoch_progress()
    saved = dict(model=model, optimizer=optimizer, generator=generator, epoch=epoch)
    return State(
        model, optimizer, learning_rate, generator, epoch, progress,
        checkpoint=tf.train.Checkpoint(**saved),
        interrupted=tf.train.Checkpoint(**saved, progress=progress),
    )  # fmt: skip


class CheckpointManagers(NamedTuple):
    epoch_end: tf.train.CheckpointManager  # The last three epochs, in checkpoints/.
    interrupted: tf.train.CheckpointManager  # The last Ctrl-C, in checkpoints/interrupted/.


def checkpoint_managers(state: State, run_dir: Path) -> CheckpointManagers:
    folder = run_dir / "checkpoints"
    return CheckpointManagers(
        tf.train.CheckpointManager(state.checkpoint, folder, max_to_keep=3),
        tf.train.CheckpointManager(state.interrupted, folder / "interrupted", max_to_keep=1),
    )


# --- A full disk ---

# The errors of a write refused for want of space, and what to call them.
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_cause(err: BaseException) -> str | None:
    """Why a write failed, if it was for want of space (DISK_FULL's words), else None.

    Python's writes say so by errno. TensorFlow's (the checkpoints) raise an
    OpError, usually ResourceExhaustedError, whose message holds the system's
    words: they are matched, since an OpError of the same class may also be
    an out-of-memory error of the model.
    """
    if isinstance(err, OSError):
        return DISK_FULL.get(err.errno)
    if isinstance(err, tf.errors.OpError):
        for code, cause in DISK_FULL.items():
            if os.strerror(code) in (err.message or ""):
                return cause
    return None


@contextlib.contextmanager
def outputs_written_to(folder: Path, then: str | Callable[[], str]) -> Iterator[None]:
    """Report a write under `folder` that fails for want of space as one UserError.

    The message names the folder and the cause, then says `then` (what is kept,
    and how to continue once space is freed; a callable is asked at the
    failure). Every other error passes unchanged.
    """
    try:
        yield
    except (OSError, tf.errors.OpError) as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise UserError(
            disk_full_message(folder, cause, then() if callable(then) else then)
        ) from err


def disk_full_message(folder: Path, cause: str, then: str) -> str:
    return f"cannot write to {folder}: {cause}; {then}"


def resume_after_disk_full(run_dir: Path) -> str:
    """What a training run that hit a full disk keeps, and how it goes on: --resume from
    its last checkpoint on disk, or, before the first one, a new run."""
    folder = run_dir / "checkpoints"
    if not any(tf.train.latest_checkpoint(f) for f in (folder, folder / "interrupted")):
        return "no epoch had been saved yet: free space, then start the run again"
    return (
        "the run stopped with its last checkpoint and metrics.csv intact: free space, "
        f"then continue with: python main.py --resume {run_dir}"
    )


# --- Checkpoints ---


def save_checkpoint(manager: tf.train.CheckpointManager, model: cvae.CVAE, number: int) -> str:
    """Save through `manager`, unless a weight is NaN or Inf (a bad step never overwrites).

    A failed save (a full disk, say) leaves the previous checkpoints and the
    `checkpoint` file that names them as they were, TensorFlow rewriting that
    file last; the failed save's own half-written shard folder is removed, so
    as to give back its space.
    """
    for variable in model.trainable_variables:
        if not bool(tf.reduce_all(tf.math.is_finite(variable))):
            raise NonFiniteLoss(f"the weights {variable.path} became NaN or Inf")
    try:
        return manager.save(checkpoint_number=number)
    except Exception:
        partial = os.path.join(manager.directory, f"ckpt-{number}_temp")
        with contextlib.suppress(Exception):
            if tf.io.gfile.isdir(partial):
                tf.io.gfile.rmtree(partial)
        raise


def restore_latest(run_dir: Path, state: State, managers: CheckpointManagers) -> str:
    """Restore the newest checkpoint of a run; returns its path.

    A Ctrl-C checkpoint is newer than the last epoch-end one when it was saved
    after that epoch ended, i.e. when its epoch count is not lower.
    """

    def epochs_done(path: str) -> int:
        return int(tf.train.load_variable(path, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))

    latest = managers.epoch_end.latest_checkpoint
    interrupted = managers.interrupted.latest_checkpoint
    if interrupted is not None and (
        latest is None or epochs_done(interrupted) >= epochs_done(latest)
    ):
        restore_checkpoint(state.interrupted, interrupted, f"--resume {run_dir}")
        return interrupted
    if latest is None:
        raise UserError(
            f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'} (the run stopped "
            "before its first epoch ended); start a new run."
        )
    restore_checkpoint(state.checkpoint, latest, f"--resume {run_dir}")
    return latest


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, context: str) -> None:
    """Restore `path` into `checkpoint`, every saved object matched.

    A checkpoint that does not fit the model of the run's config.json (say,
    n_hidden edited by hand) is a UserError that starts with `context`.
    """
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise UserError(
            f"{context}: {path} does not fit the model of its config.json ({err}); "
            "was config.json edited?"
        ) from err


def record_resumed_config(run_dir: Path, config: Config, done: int, step: int) -> None:
    """Check that a resumed run has `config.epochs` to aim at, and record in config.json
    the flags this resume changed.

    `done` epochs have ended, and `step` steps of the next one are done (0
    unless a Ctrl-C checkpoint was restored). Writing the new --epochs (and any
    other flag a resume may change: --data_dir, the canvas and evaluation
    settings, --strategy, --xla) into config.json makes a later plain
    `--resume` or `--eval_only` use them too, e.g. after a Ctrl-C during the
    extension.
    """
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    needed = done + 1 if step else done  # A started epoch must be finished.
    if config.epochs < needed:
        where = (
            f"stopped in epoch {done + 1} (after step {step})"
            if step
            else f"has done {done} epochs"
        )
        if config.epochs != saved.get("epochs"):  # --epochs was given.
            advice = f"pass --epochs {needed} or more"
            if saved.get("epochs", 0) >= needed:
                advice += ", or drop it"
            raise UserError(f"--epochs {config.epochs} is too few: {run_dir} {where}; {advice}.")
        raise UserError(
            f"{path} asks for {config.epochs} epochs, but {run_dir} {where}; "
            f"pass --epochs {needed} or more."
        )
    # The resumed config is the saved one with this command's overrides; `resume`
    # itself is not a setting of the run.
    updated = {**saved, **config.to_json(), "resume": saved.get("resume")}
    if json.loads(json.dumps(updated)) != saved:  # Compared as JSON: tuples are lists there.
        utils.write_json(path, updated)


def divergence_advice(manager: tf.train.CheckpointManager, resume_hint: str) -> str:
    """What to do after a NaN: the checkpoints saved so far are good."""
    if manager.latest_checkpoint is None:
        return "No epoch had ended: start a new run with a smaller --learning_rate."
    return (
        f"The checkpoints up to {manager.latest_checkpoint} are untouched: start a new run "
        f"with a smaller --learning_rate, or `{resume_hint}` to retry from the last one "
        "(with the same flags it repeats the same steps)."
    )


# --- One epoch ---


def train_one_epoch(
    train_chunk: cvae.ChunkFn,
    n_images: int,
    generator: tf.random.Generator,
    batch_size: int,
    epoch: int = 1,
    progress: tf.Module | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    steps_per_chunk: int | None = None,
    split: LabelledSplit | None = None,
) -> dict[str, float] | None:
    """One shuffled pass over the training images with a progress bar; returns the means.

    At step 0 the epoch draws two seeds from `generator` (checkpointed, so
    resuming repeats the draws): one shuffles, one is split into a seed per
    step. The numbers therefore do not depend on `steps_per_chunk`, which only
    sets how often Python looks in: after each chunk it updates the progress
    bar, raises NonFiniteLoss if a step was not finite (the chunk stops right
    after it) and asks `stop_requested()`; if that says yes before the last
    chunk, it returns None, `progress` holding the state after that chunk.

    Args:
      train_chunk: from `cvae.make_train_chunk`.
      n_images: how many training images `train_chunk` holds.
      epoch: the epoch's number, for messages.
      progress: where the epoch stands (see make_epoch_progress), to continue
        an interrupted epoch; None starts a fresh one.
      steps_per_chunk: compiled steps between two looks from Python
        (default STEPS_PER_CHUNK).
      split: M2's labelled and unlabelled images (`n_images` is then the number
        of unlabelled ones); see `epoch_batches`.

    Raises:
      NonFiniteLoss: naming the epoch, the step and the terms that were not finite.
    """
    progress = progress or make_epoch_progress()
    steps_per_chunk = steps_per_chunk or STEPS_PER_CHUNK
    n_steps = -(-n_images // batch_size)
    if int(progress.step) == 0:
        shuffle_seed, step_seed = tf.unstack(generator.make_seeds(2), axis=1)
        progress.shuffle_seed.assign(shuffle_seed)
        progress.step_seed.assign(step_seed)
        progress.sums.assign(tf.zeros_like(progress.sums))
    batches = epoch_batches(n_images, batch_size, progress.shuffle_seed.read_value(), split)
    seeds = tf.random.experimental.stateless_split(progress.step_seed, n_steps)  # (n_steps, 2)
    progress_bar = keras.utils.Progbar(n_steps, stateful_metrics=list(cvae.TERMS))
    for start in range(int(progress.step), n_steps, steps_per_chunk):
        stop = min(start + steps_per_chunk, n_steps)
        # The running sums go through the chunk, so that they are added in
        # the same order however the epoch is cut into chunks or resumed.
        sums, done = train_chunk(
            batches, seeds, tf.constant(start), tf.constant(stop), progress.sums.read_value()
        )
        bad = non_finite_terms(dict(zip(cvae.TERMS, sums.numpy().tolist(), strict=True)))
        if bad is not None:
            raise NonFiniteLoss(
                f"non-finite training terms at epoch {epoch}, step {start + int(done)} of "
                f"{n_steps}: {bad}"
            )
        progress.sums.assign(sums)
        progress.step.assign(stop)
        seen = min(stop * batch_size, n_images)
        progress_bar.update(stop, list(zip(cvae.TERMS, (sums / seen).numpy(), strict=True)))
        if stop < n_steps and stop_requested():
            return None
    means = (progress.sums / n_images).numpy()
    return {name: float(value) for name, value in zip(cvae.TERMS, means, strict=True)}


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """While active, a first Ctrl-C only sets a flag, read by the returned callable.

    The training loop checks it between chunks of compiled steps, so that it
    can stop at the end of the current chunk and save; a second Ctrl-C quits
    at once, as usual.
    """
    state = {"requested": False}

    def handler(signum, frame) -> None:
        if state["requested"]:
            raise KeyboardInterrupt
        state["requested"] = True
        # os.write, not print: a handler may interrupt a print of the main thread.
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):  # stderr replaced (tests, notebooks)
            fd = 2
        os.write(
            fd,
            b"\nCtrl-C: stopping at the end of the current chunk of steps to save a "
            b"checkpoint (press Ctrl-C again to quit without saving).\n",
        )

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # Only the main thread may install signal handlers.
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["requested"]
    finally:
        signal.signal(signal.SIGINT, previous)


# --- A training run ---


@dataclass
class Run:
    """A training run in progress: what `open_run` set up, and its history so far."""

    config: Config
    run_dir: Path
    state: State
    managers: CheckpointManagers
    splits: data_utils.Splits
    tensors: TrainingTensors
    train_chunk: cvae.ChunkFn
    eval_step: Callable[..., dict]
    canvas_inputs: plot.CanvasInputs
    events: summaries.EventLog  # Its TensorBoard events, in tb/.
    split: LabelledSplit | None = None  # M2's labelled and unlabelled images (--n_labeled).
    history: list[dict] = field(default_factory=list)  # The rows of metrics.csv.
    # False for a multi_worker worker other than worker 0: run_dir is then its
    # temporary folder (see _run_folder), and a resume starts from worker 0's.
    chief: bool = True

    @property
    def resume_hint(self) -> str:
        folder = self.run_dir if self.chief else "<worker 0's run folder>"
        return f"python main.py --resume {folder}"


def run(config: Config, strategy: tf.distribute.Strategy | None = None) -> int:
    """Train (or resume) the run described by `config`; returns the exit code.

    `strategy` replaces the one `--strategy` names (a process can hold only one
    MirroredStrategy: tests that compare several runs share it).
    """
    current = open_run(config, strategy)
    try:
        with outputs_written_to(current.run_dir, lambda: resume_after_disk_full(current.run_dir)):
            with stop_on_sigint() as stop_requested:
                for number in range(int(current.state.epoch) + 1, config.epochs + 1):
                    exit_code = train_epoch(current, number, stop_requested)
                    if exit_code is not None:
                        return exit_code
            return final_evaluation(current)
    finally:
        current.events.close()


def _check_output_folder(config: Config) -> None:
    """Refuse, before anything is created, a run whose folder cannot be written."""
    target = Path(config.resume or config.results_dir)
    try:
        utils.check_can_create_in(target)
    except ValueError as err:
        cause = disk_full_cause(err.__cause__) if err.__cause__ is not None else None
        if cause is not None:  # Its test folder did not fit: the disk is full, not the folder bad.
            raise UserError(
                disk_full_message(target, cause, "free space, then run the command again")
            ) from err
        flag = "--resume" if config.resume else "--results_dir"
        raise UserError(f"{flag} {target}: {err}") from err


def _new_run_dir(config: Config) -> Path:
    """Create the run's folder and its config.json (every flag and the library versions)."""
    try:
        run_dir = utils.make_run_dir(config.results_dir, config.run_tags())
    except OSError as err:
        raise UserError(f"--results_dir {config.results_dir}: {err}") from err
    with outputs_written_to(Path(config.results_dir), "free space, then start the run again"):
        try:
            utils.write_json(
                run_dir / "config.json", {**config.to_json(), "versions": utils.library_versions()}
            )
        except BaseException:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # The new folder, empty: a failed write leaves nothing in it.
            raise
    return run_dir


def _run_folder(config: Config, strategy: tf.distribute.Strategy) -> Path:
    """The folder the run writes: --resume's, or a new one under --results_dir.

    Under --strategy multi_worker only worker 0 (the chief) writes it. Every
    worker still saves what the chief saves, as TensorFlow asks (a save may
    aggregate variables across workers), and does the same work, so that the
    workers stay in step; the others write into a private temporary folder,
    removed when the process ends: a new run there, or a copy of --resume's
    folder, which they read but never write.
    """
    if strategy.extended.should_checkpoint:
        return Path(config.resume) if config.resume else _new_run_dir(config)
    scratch = Path(tempfile.mkdtemp(prefix="cvae_worker_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    print(
        f"Worker {strategy.cluster_resolver.task_id}: worker 0 writes the run folder; "
        f"this worker's copy goes to {scratch}, removed at the end."
    )
    if not config.resume:
        return _new_run_dir(dataclasses.replace(config, results_dir=str(scratch)))
    copy = scratch / Path(config.resume).name
    shutil.copytree(config.resume, copy)
    return copy


def print_device(details: str = "") -> None:
    """The run's first line: what it trains on. On a machine without a GPU, say that
    TensorFlow's CUDA lines printed above it (its search for a GPU) are harmless."""
    print(f"Device: {utils.device_description()}{details}")
    if not tf.config.list_physical_devices("GPU"):
        print(utils.CPU_ONLY_NOTE)


def open_run(config: Config, strategy: tf.distribute.Strategy | None = None) -> Run:
    """Everything a run needs before its first step: checks, data, state, folder, resume."""
    _check_output_folder(config)
    check_model_fits_in_memory(config)
    utils.set_seed(config.seed)
    strategy = strategy or make_strategy(config)
    print_device(
        f"; {strategy.num_replicas_in_sync} replica(s), "
        f"{'mixed_float16' if config.mixed_precision else 'float32'}, "
        f"XLA {'on' if use_xla(config, strategy.num_replicas_in_sync) else 'off'}"
    )
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        print("Note: --mixed_precision on a CPU runs, but float16 is slower there than float32.")
    splits = load_splits(config)
    tensors = training_tensors(splits, config)
    split = labelled_split(splits.train_y[: int(tensors.train_labels.shape[0])], config)
    canvas_inputs = make_canvas_inputs(splits.test_images, splits.test_y, config)
    state = build_state(config, strategy)
    run_dir = _run_folder(config, strategy)
    managers = checkpoint_managers(state, run_dir)
    history: list[dict] = []
    events = summaries.EventLog(run_dir)  # Reads the events a resumed run wrote.
    if config.resume:
        with outputs_written_to(run_dir, lambda: resume_after_disk_full(run_dir)):  # config.json
            history = _resume(run_dir, config, state, managers)
            _complete_records(run_dir, events, history, int(state.epoch))
    print(f"Run folder: {run_dir}")
    train_chunk = cvae.make_train_chunk(
        state.model, state.optimizer, tensors.train_images, tensors.train_labels,
        objective(config), strategy, jit_compile=use_xla(config, strategy.num_replicas_in_sync),
    )  # fmt: skip
    eval_step = cvae.make_eval_step(state.model, config.add_noise, config.binarized)
    return Run(
        config, run_dir, state, managers, splits, tensors, train_chunk, eval_step,
        canvas_inputs, events, split, history, chief=strategy.extended.should_checkpoint,
    )  # fmt: skip


def _resume(run_dir: Path, config: Config, state: State, managers: CheckpointManagers) -> list:
    """Restore the run's newest checkpoint; returns the metrics rows up to it."""
    restored = restore_latest(run_dir, state, managers)
    epochs_done, steps_done = int(state.epoch), int(state.progress.step)
    record_resumed_config(run_dir, config, epochs_done, steps_done)
    where = f"after epoch {epochs_done}"
    if steps_done:
        where += f", step {steps_done} of epoch {epochs_done + 1}"
    print(f"Resuming {restored} {where} of {config.epochs}")
    # Rows after the checkpoint belong to an epoch that will be trained again.
    return [
        row for row in utils.read_csv(run_dir / "metrics.csv") if int(row["epoch"]) <= epochs_done
    ]


def _complete_records(
    run_dir: Path, events: summaries.EventLog, rows: list[dict], epochs_done: int
) -> None:
    """On resume: rebuild the animations from the PNGs, and write the TensorBoard values of
    the committed epochs (`rows`, up to `epochs_done`) that the events lack, as after a
    kill between an epoch's checkpoint and the end of its events."""
    plot.write_animations(run_dir)
    filled = events.backfill(rows, epochs_done)
    if filled:
        print(f"TensorBoard: wrote the values of epoch(s) {filled} that {events.folder} lacked")


def train_epoch(current: Run, number: int, stop_requested: Callable[[], bool]) -> int | None:
    """Train epoch `number` (1-based) and record it; returns an exit code if the run must stop.

    A Ctrl-C mid-epoch saves the Ctrl-C checkpoint and returns EXIT_INTERRUPTED;
    one during the epoch's last chunk lets the epoch end and be recorded first.
    """
    config, state = current.config, current.state
    start = time.perf_counter()
    split = current.split
    n_images = int((split.unlabelled if split else current.tensors.train_images).shape[0])
    try:
        train = train_one_epoch(
            current.train_chunk, n_images, state.generator, config.batch_size, number,
            state.progress, stop_requested, split=split,
        )  # fmt: skip
        if train is None:
            path = save_checkpoint(
                current.managers.interrupted, state.model, int(state.optimizer.iterations)
            )
            print(  # From a new line: the progress bar's line is unfinished.
                f"\nInterrupted: saved the state after step {int(state.progress.step)} of "
                f"epoch {number} in {path}. Continue with: {current.resume_hint}",
                file=sys.stderr,
            )
            return utils.EXIT_INTERRUPTED
        valid = cvae.heldout_elbo(
            current.eval_step, current.tensors.valid_images, current.tensors.valid_labels,
            VALID_SEED,
        )  # fmt: skip
        bad = non_finite_terms(valid)
        if bad is not None:
            raise NonFiniteLoss(f"non-finite validation terms after epoch {number}: {bad}")
        seconds = time.perf_counter() - start
        learning_rate = last_learning_rate(state)
        record_epoch(current, number, train, valid, learning_rate, seconds)
    except NonFiniteLoss as err:
        raise NonFiniteLoss(
            f"training diverged: {err}; nothing was saved after the last good "
            f"step. {divergence_advice(current.managers.epoch_end, current.resume_hint)}"
        ) from None
    except LOST_WORKER_ERRORS as err:
        if config.strategy != "multi_worker":
            raise
        raise UserError(lost_worker_message(current, number, err)) from None
    print(epoch_line(config, number, train, valid, learning_rate, seconds))
    if stop_requested():
        print(
            f"Interrupted: saved the state after epoch {number} in "
            f"{current.managers.epoch_end.latest_checkpoint}. Continue with: "
            f"{current.resume_hint}",
            file=sys.stderr,
        )
        return utils.EXIT_INTERRUPTED
    return None


def epoch_line(
    config: Config, number: int, train: dict, valid: dict, learning_rate: float, seconds: float
) -> str:
    """An epoch's log line: the train bound (−ELBO, −L_K, or M2's J^α/N), its terms, the
    validation −ELBO (and M2's q(y|x) error), the learning rate and the seconds."""
    bound = "-elbo" if config.train_samples == 1 else f"-L_{config.train_samples}"
    if config.n_labeled:
        bound = "J^a/N"
    q_error = f"  valid q(y|x) error {valid['q_error']:.2f}%" if "q_error" in valid else ""
    return (
        f"epoch {number:3d}/{config.epochs}  train {bound} {train['loss']:.3f} "
        f"(recon {train['recon']:.3f}, kl {train['kl']:.3f})  "
        f"valid -elbo {valid['loss']:.3f}{q_error}  lr {learning_rate:.3g}  {seconds:.1f}s"
    )


# How a collective of --strategy multi_worker fails when another worker is gone:
# UNAVAILABLE when its connection breaks (a killed worker), or when TensorFlow's
# coordination service has missed a worker's heartbeats for 10 s (a hung one, a
# cut network) and aborts the collectives; DEADLINE_EXCEEDED under a collective timeout.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


def _abort_cause(err: tf.errors.OpError) -> str:
    """TensorFlow's cause of a collective's abort in one line: its words after "aborted
    by:", and the next line when they end in a colon (the tasks lost)."""
    lines = [line.strip() for line in (err.message or "").splitlines()]
    for i, line in enumerate(lines):
        if "aborted by:" in line:
            cause = line.split("aborted by:", 1)[1].strip()
            if cause.endswith(":") and i + 1 < len(lines):
                cause = f"{cause} {lines[i + 1]}"
            return cause
    return type(err).__name__


def lost_worker_message(current: Run, number: int, err: tf.errors.OpError) -> str:
    """One line for a worker that lost the cluster in epoch `number`: TensorFlow's cause
    (not its many-line message), and how to go on."""
    cause = _abort_cause(err)
    latest = current.managers.epoch_end.latest_checkpoint
    if latest is None:
        then = "no epoch had ended: start the run again on every worker"
    else:
        name = Path(latest).name if current.chief else f"{Path(latest).name} of worker 0"
        then = f"{name} is saved: restart every worker with: {current.resume_hint}"
    return (
        f"lost contact with another worker in epoch {number} ({cause}): a worker stopped or "
        f"cannot be reached, and the others cannot go on without it; {then}"
    )


def last_learning_rate(state: State) -> float:
    """The learning rate of the optimizer's last step (its schedule at step count − 1)."""
    # Under loss scaling, the inner optimizer counts the steps it applied.
    optimizer = getattr(state.optimizer, "inner_optimizer", state.optimizer)
    return float(state.learning_rate(optimizer.iterations - 1))


def record_epoch(
    current: Run, number: int, train: dict, valid: dict, learning_rate: float, seconds: float
) -> None:
    """Epoch `number`'s row in metrics.csv, the curves, its canvases and the animations,
    its checkpoint, then its TensorBoard events."""
    current.history.append(
        {
            "epoch": number,
            **{f"train_{k}": round(v, 6) for k, v in train.items()},
            **{f"valid_{k}": round(v, 6) for k, v in valid.items()},
            "learning_rate": learning_rate,
            "seconds": round(seconds, 3),
        }
    )
    # The checkpoint last: it commits the epoch. A crash or a full disk before
    # it re-trains the epoch on resume (its stale row is dropped there, and its
    # pictures are drawn again, the same), so no epoch lacks its records.
    run_dir, state, config = current.run_dir, current.state, current.config
    utils.write_csv(run_dir / "metrics.csv", current.history)
    plot.plot_curves(run_dir / "curves.png", current.history, config.train_samples)
    if number % config.plot_every == 0 or number == config.epochs:
        plot.write_canvases(
            canvas_model(state.model), current.canvas_inputs, run_dir, number, config
        )
        plot.write_animations(run_dir)
    state.epoch.assign(number)
    state.progress.step.assign(0)
    save_checkpoint(current.managers.epoch_end, state.model, number)
    # After the commit, so that the events never hold an epoch that will be trained
    # again; a kill before they are flushed is made good by the resume (_complete_records).
    current.events.write_epoch(current.history[-1], plot.canvas_files(run_dir).get(number, {}))


# --- The canvases' model and inputs (plot.py draws them without TensorFlow) ---


def canvas_model(model: cvae.CVAE) -> plot.CanvasModel:
    """The model's posterior means and mean images as NumPy functions, for plot.py, and
    for an M2 model q(y|x)'s labels."""

    def encode(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return cvae.posterior_mean(model, tf.constant(x), tf.constant(labels)).numpy()

    def decode(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return cvae.mean_image(model, tf.constant(z), tf.constant(labels)).numpy()

    def predict(x: np.ndarray) -> np.ndarray:
        return tf.argmax(model.classifier_logits(tf.constant(x)), axis=-1).numpy()

    return plot.CanvasModel(encode, decode, predict if model.has_classifier else None)


def make_canvas_inputs(
    test_images: np.ndarray, test_y: np.ndarray, config: Config
) -> plot.CanvasInputs:
    """The canvases' fixed inputs, drawn from the run's seed; the encoder inputs are
    noised and binarised by the same function as in training."""

    def corrupt(x: np.ndarray, stream: int) -> np.ndarray:
        seed = tf.constant([config.seed, CANVAS_SEED + stream], dtype=tf.int64)
        x_input, _ = cvae.prepare_batch(tf.constant(x), seed, config.add_noise, config.binarized)
        return x_input.numpy()

    return plot.make_canvas_inputs(
        test_images, test_y, config.n_z, (config.seed, CANVAS_SEED), corrupt
    )


# --- The test evaluation ---


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
    clean: np.ndarray | tf.Tensor,
    noised: np.ndarray | tf.Tensor,
    restored: np.ndarray | tf.Tensor,
    chunk: int = 1000,
) -> dict:
    """Mean PSNR (dB) and BCE (nats per pixel) against the clean images of three candidates.

    The candidates: the noised input itself, its 3×3 median filter, and the
    model's restoration. Keys `denoise_{psnr,bce}_{noised,median,cvae}`.
    Computed `chunk` images at a time, so that the float64 work arrays stay small;
    tensors are converted a chunk at a time too (a whole test split's `.numpy()`
    copies cost 90 MB at the run's memory peak), uint8 pixels scaled then.
    """
    per_image: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(clean), chunk):
        part = slice(start, start + chunk)
        reference = data_utils.as_floats(clean[part])
        noised_part = data_utils.as_floats(noised[part])
        candidates = {
            "noised": noised_part,
            "median": median_filter(noised_part),
            "cvae": np.asarray(restored[part]),
        }
        for measure, fn in (("psnr", psnr), ("bce", binary_cross_entropy)):
            for name, images in candidates.items():
                key = f"denoise_{measure}_{name}"
                per_image.setdefault(key, []).append(fn(reference, images))
    return {key: float(np.mean(np.concatenate(values))) for key, values in per_image.items()}


def iw_metrics(
    model: cvae.CVAE, x_input: tf.Tensor, target: tf.Tensor, labels: tf.Tensor, n_samples: int
) -> dict[str, float]:
    """−log p(x|y), −log p(x) and the generative classifier's error (%) of the images
    `target`, by importance weighting with `n_samples` samples per image and label
    from the encoder given `x_input`."""
    print(f"Importance-weighted log p(x|y), K={n_samples}, {len(labels)} images x 10 labels")
    log_px_y = cvae.iw_log_likelihoods(model, target, n_samples, IW_SEED, x_input=x_input)
    predicted = cvae.classify(log_px_y)  # (N,) from (N, C)
    return {
        "test_nll_x_given_y": -float(
            tf.reduce_mean(cvae.log_likelihood_of_labels(log_px_y, labels))
        ),
        "test_nll_x": -float(tf.reduce_mean(cvae.log_marginal_over_labels(log_px_y))),
        "test_classifier_error": 100.0 * float(np.mean(predicted.numpy() != labels.numpy())),
    }


def likelihood_metrics(
    model: cvae.CVAE,
    x: tf.Tensor,
    labels: tf.Tensor,
    config: Config,
    heldout: tuple[tf.Tensor, tf.Tensor],
    noised_input: bool,
) -> dict[str, float | None]:
    """The test −ELBO with its terms and the importance-weighted metrics of the clean
    (binarised, with --binarize dynamic) test images x, the encoder seeing them clean
    or, with `noised_input`, with the training noise.

    `heldout` is `cvae.prepare_heldout` of x at TEST_SEED: (encoder inputs,
    targets), the inputs noised with --add_noise; the targets do not depend on
    the noise, so one draw serves both encoder inputs.
    """
    eval_step = cvae.make_eval_step(model, add_noise=noised_input, binarize=config.binarized)
    elbo = cvae.heldout_elbo(eval_step, x, labels, TEST_SEED)
    metrics = {f"test_{k}": v for k, v in elbo.items()}
    metrics.update(dict.fromkeys(("test_nll_x_given_y", "test_nll_x", "test_classifier_error")))
    if config.iw_samples:
        x_input, target = heldout
        encoder_input = x_input if noised_input else target
        metrics.update(iw_metrics(model, encoder_input, target, labels, config.iw_samples))
    return metrics


def _bound(metrics: dict) -> float:
    """The bound on −log p(x|y) that says which encoder input is tighter: IW if computed."""
    iw = metrics["test_nll_x_given_y"]
    return metrics["test_loss"] if iw is None else iw


def compute_test_metrics(model: cvae.CVAE, splits: data_utils.Splits, config: Config) -> dict:
    """Every test metric of a trained model; the keys of metrics.json (README, "Evaluation").

    The test images (the first `config.n_eval`) are binarised (with
    `--binarize dynamic`) and noised (with `--add_noise`) once, from TEST_SEED,
    and dropout is off. The likelihood metrics (−ELBO, −log p(x|y), −log p(x),
    classifier) are those of the clean image x. The encoder sees x; for a
    denoising run they are also computed with the encoder seeing the noised x
    (the proposal differs, the quantity bounded is the same), both kept under
    `by_encoder_input`, and the tighter of the two is the headline
    (`test_encoder_input` says which). Metrics a run cannot have (denoising
    without noise, likelihoods with `--iw_samples 0`) are None.
    """
    start = time.perf_counter()
    n = config.n_eval or len(splits.test_images)
    # uint8 pixels, and so the copies prepare_heldout draws: 63 MB less at the run's
    # memory peak (the importance-weighted pass) than float32 ones.
    x = tf.constant(splits.test_images[:n].reshape(n, -1))
    labels = tf.constant(splits.test_y[:n])
    heldout = cvae.prepare_heldout(x, TEST_SEED, config.add_noise, config.binarized)
    inputs = ("clean", "noised") if config.add_noise else ("clean",)
    scored = {
        name: likelihood_metrics(model, x, labels, config, heldout, noised_input=name == "noised")
        for name in inputs
    }
    headline = min(inputs, key=lambda name: _bound(scored[name]))
    metrics = {
        "n_eval": n,
        "iw_samples": config.iw_samples,
        **scored[headline],
        "test_encoder_input": headline,
        "by_encoder_input": scored if config.add_noise else None,
    }
    denoising = ("psnr", "bce")
    names = ("noised", "median", "cvae")
    metrics.update({f"denoise_{m}_{c}": None for m in denoising for c in names})
    if config.add_noise:
        x_input, target = heldout
        restored = cvae.reconstruct(model, x_input, labels)
        metrics.update(denoising_metrics(target, x_input, restored))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    print(format_metrics(metrics, config.binarize))
    return metrics


GREY_LEVEL_NOTE = (
    "(grey-level targets, --binarize none: these 'likelihoods' are cross-entropies, "
    "not comparable with the literature; --binarize dynamic gives true ones)"
)


def format_metrics(metrics: dict, binarize: str) -> str:
    """The evaluation as a small text table (None for what was not computed)."""
    rows = [
        ("test -ELBO (nats)", "test_loss"),
        ("  reconstruction", "test_recon"),
        ("  KL", "test_kl"),
        (f"-log p(x|y), K={metrics['iw_samples']}", "test_nll_x_given_y"),
        (f"-log p(x), K={metrics['iw_samples']}", "test_nll_x"),
        ("classifier error (%)", "test_classifier_error"),
    ]
    if "test_q_error" in metrics:  # M2 (--n_labeled): its classifier q(y|x), argmax.
        rows.append(("q(y|x) error (%)", "test_q_error"))
    lines = [f"Test metrics over {metrics['n_eval']} images"]
    by_input = metrics.get("by_encoder_input")
    if by_input:  # A denoising run: both encoder inputs; the tighter one is the headline.
        headline = metrics["test_encoder_input"]
        lines.append(f"  {'encoder input:':<24} {'clean':>10} {'noised':>10}")
        for label, key in rows:
            clean, noised = by_input["clean"][key], by_input["noised"][key]
            lines.append(f"  {label:<24} {_cell(clean):>10} {_cell(noised):>10}")
        lines.append(
            f"  (metrics.json's test_* keys: the tighter bound, with the {headline} input)"
        )
    else:
        lines += [f"  {label:<24} {_cell(metrics[key])}" for label, key in rows]
    if binarize == "none":
        lines.append(f"  {GREY_LEVEL_NOTE}")
    if metrics["denoise_psnr_cvae"] is not None:
        lines.append(f"  {'denoising':<24} {'PSNR (dB)':>10} {'BCE (nats/pixel)':>17}")
        for name in ("noised", "median", "cvae"):
            psnr_db, bce = metrics[f"denoise_psnr_{name}"], metrics[f"denoise_bce_{name}"]
            lines.append(f"    {name:<22} {psnr_db:>10.2f} {bce:>17.4f}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.3f}"


def training_seconds(run_dir: Path) -> float:
    """Wall time of the run's epochs, summed from metrics.csv (start-up excluded)."""
    return round(sum(float(row["seconds"]) for row in utils.read_csv(run_dir / "metrics.csv")), 1)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Write metrics.json; a previous one is kept as metrics.<its time>.json, never lost."""
    path = run_dir / "metrics.json"
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = utils.create_fresh(run_dir, f"metrics.{stamp}", ".json", folder=False)
        try:
            utils.atomic_write_bytes(kept, path.read_bytes())
        except BaseException:
            kept.unlink(missing_ok=True)  # The empty name just reserved; metrics.json stays.
            raise
    utils.write_json(path, metrics)


def write_test_metrics(
    run_dir: Path,
    model: cvae.CVAE,
    splits: data_utils.Splits,
    config: Config,
    epochs: int,
    checkpoint: str,
) -> None:
    """Evaluate the model of `checkpoint` (after `epochs`) and write the run's metrics.json."""
    results = {"epochs": epochs, **compute_test_metrics(model, splits, config)}
    results["train_seconds"] = training_seconds(run_dir)
    results["checkpoint"] = Path(checkpoint).name
    write_metrics(run_dir, results)


def final_evaluation(current: Run) -> int:
    """The end of a training run: evaluate its last epoch into metrics.json; returns the
    exit code.

    A Ctrl-C here comes after every checkpoint was saved: it says so, and how to
    evaluate again.
    """
    run_dir, state = current.run_dir, current.state
    checkpoint = current.managers.epoch_end.latest_checkpoint
    try:
        write_test_metrics(
            run_dir, state.model, current.splits, current.config, int(state.epoch), checkpoint
        )
        summaries.record_final(current.events, run_dir, int(state.epoch))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted during the final evaluation; the training finished and its "
            f"checkpoints are saved. Evaluate with: python main.py --eval_only {run_dir}",
            file=sys.stderr,
        )
        return utils.EXIT_INTERRUPTED
    print(f"outputs in {run_dir}" if current.chief else "outputs in worker 0's run folder")
    return 0


def check_eval_only_folder(run_dir: Path) -> None:
    """Refuse, before the evaluation, a run folder that --eval_only could not complete."""
    if not (run_dir / "metrics.csv").is_file():
        raise UserError(
            f"--eval_only {run_dir}: no metrics.csv there (the training curves and times); "
            "is it a complete run folder?"
        )
    try:
        utils.check_can_create_in(run_dir)
    except ValueError as err:
        raise UserError(f"--eval_only {run_dir}: metrics.json cannot be written: {err}") from err


def evaluate_only(config: Config) -> int:
    """`--eval_only RUN_DIR`: evaluate the run's last checkpoint into its metrics.json,
    and draw that epoch's canvases if the folder lacks them."""
    run_dir = Path(config.eval_only)
    utils.set_seed(config.seed)
    print_device()
    latest = tf.train.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise UserError(f"--eval_only {run_dir}: no checkpoint in {run_dir / 'checkpoints'}.")
    check_eval_only_folder(run_dir)
    check_model_fits_in_memory(config)
    state = build_state(config)
    restore_checkpoint(state.checkpoint, latest, f"--eval_only {run_dir}")
    epochs = int(state.epoch)
    print(f"Evaluating {latest} (epoch {epochs})")
    splits = load_splits(config)
    again = f"its checkpoints are intact: free space, then: python main.py --eval_only {run_dir}"
    with outputs_written_to(run_dir, again):
        write_test_metrics(run_dir, state.model, splits, config, epochs, latest)
        print(f"wrote {run_dir / 'metrics.json'}")
        drawn = plot.draw_missing_canvases(
            run_dir,
            canvas_model(state.model),
            lambda: make_canvas_inputs(splits.test_images, splits.test_y, config),
            config,
            epochs,
        )
        # The TensorBoard values the events lack (say, of a run stopped in its final
        # evaluation), read from the files as a resume writes them.
        events = summaries.EventLog(run_dir)
        try:
            rows = utils.read_csv(run_dir / "metrics.csv")
            events.backfill(rows, epochs)
            summaries.record_final(events, run_dir, epochs)
        finally:
            events.close()
    if drawn:
        print(f"drew the canvases of epoch {epochs} in {run_dir}")
    return 0
