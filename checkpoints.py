"""A run's state and its checkpoints: build it, check it fits, save it, restore it.

The state is everything a checkpoint holds (model, optimizer, random stream,
epoch count, and mid-epoch progress after a Ctrl-C), so that a resumed run
takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import keras
import tensorflow as tf

import cvae
import steps
import utils

if TYPE_CHECKING:
    from config import Config


def make_epoch_progress() -> tf.Module:
    """Variables that say where the current epoch stands, for a mid-epoch checkpoint.

    step: steps of the epoch done (0 = not started); shuffle_seed and
    step_seed: the epoch's two seeds (its order, and the random draws of its
    steps); sums: Σ over the images seen of each term of `steps.TERMS`, in
    float64. With these, a resumed epoch takes the same batches with the same
    draws and reports the same means as an uninterrupted one.
    """
    progress = tf.Module(name="epoch_progress")
    progress.step = tf.Variable(0, dtype=tf.int64, trainable=False)
    progress.shuffle_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.step_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.sums = tf.Variable(tf.zeros(len(steps.TERMS), tf.float64), trainable=False)
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
        config.n_z, config.hidden_sizes, classifier=config.n_labeled is not None,
        conditional=config.conditional,
    )  # fmt: skip
    needed = n_weights * 4 * TRAINING_COPIES
    available = available_memory()
    if available is not None and needed > available:
        raise utils.UserError(
            f"--n_z {config.n_z} with --n_hidden {' '.join(map(str, config.n_hidden))} needs "
            f"{_gigabytes(needed)} for the weights, gradients and Adam's slots; this machine "
            f"has {_gigabytes(available)} available: choose a smaller --n_z or --n_hidden."
        )


def build_state(
    config: Config, strategy: tf.distribute.Strategy | None = None, n_features: int | None = None
) -> State:
    """A fresh state for `config`; training, --resume, --eval_only and the benchmarks
    all build and restore through here.

    The model and the optimizer are made under `strategy`'s scope (their
    variables then live on every replica). The epoch-end checkpoint's layout is
    fixed (model=, optimizer=, generator=, epoch=); the Ctrl-C one adds
    progress= and lives in a folder of its own. With `n_features` (--features)
    the model reads that many of M1's latent dimensions, by a Gaussian likelihood.
    """
    strategy = strategy or tf.distribute.get_strategy()
    policy = "mixed_float16" if config.mixed_precision else "float32"
    learning_rate = steps.learning_rate_schedule(
        config.learning_rate, config.lr_decay, config.steps_per_epoch
    )
    with strategy.scope():
        model = cvae.CVAE(
            config.n_z, config.hidden_sizes, config.keep_prob, seed=config.seed,
            dtype_policy=policy, classifier=config.n_labeled is not None,
            conditional=config.conditional,
            **({"n_pixels": n_features, "likelihood": "gaussian"} if n_features else {}),
        )  # fmt: skip
        optimizer = steps.FusedAdam(learning_rate)
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
    folder = run_dir / utils.CHECKPOINTS_DIR
    return CheckpointManagers(
        tf.train.CheckpointManager(state.checkpoint, folder, max_to_keep=3),
        tf.train.CheckpointManager(
            state.interrupted, folder / utils.INTERRUPTED_DIR, max_to_keep=1
        ),
    )


def save_checkpoint(manager: tf.train.CheckpointManager, model: cvae.CVAE, number: int) -> str:
    """Save through `manager`, unless a weight is NaN or Inf (a bad step never overwrites).

    A failed save (a full disk, say) leaves the previous checkpoints and the
    `checkpoint` file that names them as they were, TensorFlow rewriting that
    file last; the failed save's own half-written shard folder is removed, so
    as to give back its space.
    """
    for variable in model.trainable_variables:
        if not bool(tf.reduce_all(tf.math.is_finite(variable))):
            raise utils.NonFiniteLoss(f"the weights {variable.path} became NaN or Inf")
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
        raise utils.UserError(
            f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'} (the run stopped "
            "before its first epoch ended); start a new run."
        )
    restore_checkpoint(state.checkpoint, latest, f"--resume {run_dir}")
    return latest


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, context: str) -> None:
    """Restore `path` into `checkpoint`, every saved object matched.

    A checkpoint that does not fit the model of the run's config.json (say,
    n_hidden edited by hand) is a utils.UserError that starts with `context`.
    """
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise utils.UserError(
            f"{context}: {path} does not fit the model of its config.json ({err}); "
            "was config.json edited?"
        ) from err
