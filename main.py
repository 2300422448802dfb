"""Train a conditional VAE on MNIST: `python main.py --add_noise True`.

A TensorFlow 2 re-implementation of a TensorFlow 1.4 CVAE. Each run gets its
own folder under results/ with its config, per-epoch metrics, checkpoints and
canvases; `--resume RUN_DIR` continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TensorFlow's C++ start-up chatter.

import utils

PROJECT_DIR = Path(__file__).resolve().parent
# Measured with benchmarks/bench_eval.py: see the README's "Evaluation" section.
DEFAULT_IW_SAMPLES = 25
DATASET_NAMES = ("mnist", "fashion_mnist")
BINARIZE_MODES = ("none", "dynamic")
STRATEGIES = ("none", "mirrored", "multi_worker")
XLA_MODES = ("auto", "on", "off")
# Settings of the final evaluation, not of the model: free to change on --resume
# and --eval_only.
EVAL_SETTINGS = ("iw_samples", "n_eval")
# Flags that may differ when resuming: the rest must match the saved config.
# The canvas settings only change pictures, never the training; how the run is
# spread over devices changes no variable of the checkpoint.
RESUME_OVERRIDABLE = (
    "epochs",
    "resume",
    "data_dir",  # The data may have moved; the errors about missing data suggest it.
    "plot_every",
    "z_range",
    "manifold_dims",
    "strategy",
    "xla",
    *EVAL_SETTINGS,
)
# Flags that may differ with --eval_only (the data may have moved).
EVAL_ONLY_OVERRIDABLE = ("eval_only", "data_dir", *EVAL_SETTINGS)
TUPLE_FIELDS = ("n_hidden", "manifold_dims")  # Lists in JSON and argparse, tuples in Config.
# Compiled training steps between two looks from Python (progress bar, Ctrl-C,
# NaN check): about a second of training for the default run on a 2-core CPU.
STEPS_PER_CHUNK = 50
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C.
MAX_SEED = 2**32 - 1  # NumPy's seeding limit.


def _help(text: str, **argparse_kwargs) -> dict:
    return {"help": text, **argparse_kwargs}


def _bool_help(text: str) -> dict:
    # Never type=bool (argparse would read "False" as True); the flag alone means True.
    return _help(text, type=utils.str_to_bool, nargs="?", const=True)


@dataclass(frozen=True)
class Config:
    """Every setting of a run; saved as config.json in the run folder."""

    add_noise: bool = field(
        default=False,
        metadata=_bool_help(
            "train as a denoiser: corrupt the encoder's input with salt-and-pepper noise"
        ),
    )
    binarize: str = field(
        default="none",
        metadata=_help(
            "'dynamic' resamples binary pixels every batch (Burda et al. 2015); "
            "'none' keeps grey levels as targets, as the original",
            choices=BINARIZE_MODES,
        ),
    )
    n_z: int = field(default=2, metadata=_help("dimension of the latent z"))
    n_hidden: tuple[int, ...] = field(
        default=(500,),
        metadata=_help(
            "hidden units: one size for all four layers, or four (enc1 enc2 dec1 dec2)",
            nargs="+",
        ),
    )
    keep_prob: float = field(
        default=0.6, metadata=_help("dropout: probability of keeping a hidden unit, in (0, 1]")
    )
    epochs: int = field(default=100, metadata=_help("passes over the training images"))
    batch_size: int = field(default=128, metadata=_help("images per training step"))
    learning_rate: float = field(default=1e-4, metadata=_help("Adam's initial learning rate"))
    lr_decay: float = field(
        default=0.98, metadata=_help("learning rate factor per epoch, in (0, 1]; 1.0 = no decay")
    )
    seed: int = field(default=0, metadata=_help("seeds every random draw of the run"))
    dataset: str = field(
        default="mnist", metadata=_help("which MNIST-format data set", choices=DATASET_NAMES)
    )
    data_dir: str | None = field(
        default=None,
        metadata=_help(
            "folder with the four IDX files (default: data/mnist, or for fashion_mnist "
            "/usr/share/datasets/fashion-mnist if installed, else data/fashion_mnist); "
            "missing files are downloaded"
        ),
    )
    results_dir: str = field(
        default=str(PROJECT_DIR / "results"),
        metadata=_help("parent folder of the run folders"),
    )
    n_train: int | None = field(
        default=None,
        metadata=_help("use only the first N training images, for quick runs (default: all)"),
    )
    plot_every: int = field(
        default=5, metadata=_help("write the canvases every N epochs (and after the last)")
    )
    z_range: float = field(
        default=2.0, metadata=_help("manifold canvases decode z on a grid over [-R, R]^2")
    )
    manifold_dims: tuple[int, ...] = field(
        default=(0, 1),
        metadata=_help(
            "the two z dimensions the manifolds vary (the others held at 0); "
            "with --n_z 1 the manifold is one row along z[0]",
            nargs=2,
        ),
    )
    resume: str | None = field(
        default=None,
        metadata=_help("continue the run in this folder from its last checkpoint, with its config"),
    )
    iw_samples: int = field(
        default=DEFAULT_IW_SAMPLES,
        metadata=_help(
            "K, importance samples per image and label for -log p(x|y), -log p(x) and the "
            "classifier (0 skips them). The default keeps the end-of-training evaluation "
            "of the default run near 2 minutes on a 2-core CPU; Burda et al. used 5000"
        ),
    )
    n_eval: int | None = field(
        default=None,
        metadata=_help("evaluate on the first N test images only (default: all 10,000)"),
    )
    eval_only: str | None = field(
        default=None,
        metadata=_help(
            "evaluate the run in this folder from its last checkpoint and (re)write its "
            "metrics.json; only --iw_samples, --n_eval and --data_dir may be given with it"
        ),
    )
    mixed_precision: bool = field(
        default=False,
        metadata=_bool_help(
            "compute in float16 with float32 weights, loss and outputs (Keras mixed_float16, "
            "with loss scaling): for GPUs; on a CPU it works but is slower"
        ),
    )
    strategy: str = field(
        default="none",
        metadata=_help(
            "'mirrored': data-parallel over all visible GPUs of this machine; "
            "'multi_worker': over several machines described by TF_CONFIG; "
            "--batch_size stays the global batch",
            choices=STRATEGIES,
        ),
    )
    xla: str = field(
        default="auto",
        metadata=_help(
            "compile each chunk of training steps with XLA; 'auto' = on a GPU only "
            "(on the CPU it measured no faster and takes seconds to compile)",
            choices=XLA_MODES,
        ),
    )

    def __post_init__(self) -> None:
        from data_utils import N_TEST, N_TRAIN

        checks = [
            (self.n_z >= 1, f"--n_z must be >= 1, got {self.n_z}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}], got {self.seed}"),
            (
                len(self.n_hidden) in (1, 4) and min(self.n_hidden) >= 1,
                f"--n_hidden takes one or four sizes >= 1, got {list(self.n_hidden)}",
            ),
            (0.0 < self.keep_prob <= 1.0, f"--keep_prob must be in (0, 1], got {self.keep_prob}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (
                1 <= self.batch_size <= N_TRAIN,
                f"--batch_size must be between 1 and {N_TRAIN} (the training split), "
                f"got {self.batch_size}",
            ),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning_rate must be a finite number > 0, got {self.learning_rate}",
            ),
            (0.0 < self.lr_decay <= 1.0, f"--lr_decay must be in (0, 1], got {self.lr_decay}"),
            (
                self.n_train is None or 1 <= self.n_train <= N_TRAIN,
                f"--n_train must be between 1 and {N_TRAIN} (the training split), "
                f"got {self.n_train}",
            ),
            (self.dataset in DATASET_NAMES, f"--dataset must be one of {DATASET_NAMES}"),
            (self.binarize in BINARIZE_MODES, f"--binarize must be one of {BINARIZE_MODES}"),
            (self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}"),
            (self.xla in XLA_MODES, f"--xla must be one of {XLA_MODES}"),
            (self.plot_every >= 1, f"--plot_every must be >= 1, got {self.plot_every}"),
            (
                math.isfinite(self.z_range) and self.z_range > 0,
                f"--z_range must be a finite number > 0, got {self.z_range}",
            ),
            (self._manifold_dims_ok(), self._manifold_dims_error()),
            (self.iw_samples >= 0, f"--iw_samples must be >= 0 (0 skips), got {self.iw_samples}"),
            (
                self.n_eval is None or 1 <= self.n_eval <= N_TEST,
                f"--n_eval must be between 1 and {N_TEST} (the test split), got {self.n_eval}",
            ),
            (
                self.resume is None or self.eval_only is None,
                "--resume and --eval_only exclude each other: give one run folder to one",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _manifold_dims_ok(self) -> bool:
        dims = tuple(self.manifold_dims)
        if self.n_z == 1:  # Only z[0] exists: the manifold is one row; accept the default.
            return dims == (0, 1)
        return len(dims) == 2 and dims[0] != dims[1] and all(0 <= d < self.n_z for d in dims)

    def _manifold_dims_error(self) -> str:
        if self.n_z == 1:
            return "--manifold_dims has no use with --n_z 1 (the manifold varies z[0]); drop it"
        return (
            f"--manifold_dims takes two different dimensions in 0..{self.n_z - 1} "
            f"(--n_z {self.n_z}), got {list(self.manifold_dims)}"
        )

    @property
    def hidden_sizes(self) -> tuple[int, int, int, int]:
        """The four layer sizes (enc1, enc2, dec1, dec2)."""
        sizes = self.n_hidden * 4 if len(self.n_hidden) == 1 else self.n_hidden
        return tuple(sizes)

    def run_tags(self) -> list[str]:
        """The main flags, for the run folder's name."""
        tags = [self.dataset, f"nz{self.n_z}", f"h{'-'.join(map(str, self.n_hidden))}"]
        if self.add_noise:
            tags.append("noise")
        if self.binarize != "none":
            tags.append(f"bin-{self.binarize}")
        return tags

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, values: dict) -> Config:
        """Rebuild a Config from config.json, ignoring keys it does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names}
        for name in TUPLE_FIELDS:
            if name in kept:
                kept[name] = tuple(kept[name])
        return cls(**kept)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per Config field, its help line and default taken from the field."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}
    for f in dataclasses.fields(Config):
        kwargs = dict(f.metadata)
        if f.name in TUPLE_FIELDS:
            kwargs["type"] = int
        kwargs.setdefault("type", hints.get(str(f.type)))
        default = argparse.SUPPRESS if suppress_defaults else f.default
        parser.add_argument(f"--{f.name}", default=default, **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Flags -> validated Config; bad values exit with an argparse error (code 2).

    With --resume or --eval_only the flags are first merged with the run's
    saved config, and only then validated: a flag's valid values may depend on
    the run (--manifold_dims on its --n_z).
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    for name in TUPLE_FIELDS:
        args[name] = tuple(args[name])
    # Both at once: left to Config, which refuses the pair.
    if args["eval_only"] is not None and args["resume"] is None:
        args = _eval_only_values(args, explicit, parser)
    elif args["resume"] is not None and args["eval_only"] is None:
        args = _resumed_values(args, explicit, parser)
    try:
        return Config(**args)
    except ValueError as err:
        parser.error(str(err))


def _saved_config(run_dir: str, flag: str, parser: argparse.ArgumentParser) -> Config:
    """The Config saved in `run_dir`/config.json; a parser error names `flag` if unreadable."""
    path = Path(run_dir) / "config.json"
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("it does not hold a JSON object")
        return Config.from_json(values)
    except FileNotFoundError:
        parser.error(f"{flag} {run_dir}: no config.json there; is it a run folder?")
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"{flag} {run_dir}: cannot read {path}: {err}")


def _eval_only_values(args: dict, explicit: set, parser: argparse.ArgumentParser) -> dict:
    """The run's saved config, with this command's evaluation settings."""
    others = sorted(explicit - set(EVAL_ONLY_OVERRIDABLE))
    if others:
        parser.error(
            "--eval_only evaluates the run with its own config; drop "
            + ", ".join(f"--{name}" for name in others)
            + " (only --iw_samples, --n_eval and --data_dir may change)."
        )
    saved = _saved_config(args["eval_only"], "--eval_only", parser).to_json()
    data_dir = args["data_dir"] if "data_dir" in explicit else saved["data_dir"]
    return {
        **saved,
        **{name: args[name] for name in EVAL_SETTINGS},
        "data_dir": data_dir,
        "resume": None,
        "eval_only": args["eval_only"],
    }


def _resumed_values(args: dict, explicit: set, parser: argparse.ArgumentParser) -> dict:
    """The saved config of the run to resume, with the flags of RESUME_OVERRIDABLE given."""
    saved = _saved_config(args["resume"], "--resume", parser).to_json()
    clashes = [
        f"--{name} {_shown(args[name])} (the run has {_shown(saved[name])})"
        for name in sorted(explicit)
        if name not in RESUME_OVERRIDABLE and args[name] != saved[name]
    ]
    if clashes:
        parser.error(
            "--resume uses the run's own config; these flags contradict it: "
            + ", ".join(clashes)
            + ". Drop them, or start a new run."
        )
    overrides = {name: args[name] for name in explicit if name in RESUME_OVERRIDABLE}
    return {**saved, **overrides, "resume": args["resume"]}


def _shown(value: object) -> object:
    """A flag's value as the user typed it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


# Fixed seeds for the held-out splits: every epoch and every run sees the same
# noise, binarisation and ε there, so their numbers compare across both.
VALID_SEED = 1_000_003
TEST_SEED = 2_000_003
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


def make_epoch_progress():
    """Variables that say where the current epoch stands, for a mid-epoch checkpoint.

    step: steps of the epoch done (0 = not started); shuffle_seed and
    step_seed: the epoch's two seeds (its order, and the random draws of its
    steps); sums: Σ over the images seen of each term of `cvae.TERMS`, in
    float64. With these, a resumed epoch takes the same batches with the same
    draws and reports the same means as an uninterrupted one.
    """
    import tensorflow as tf

    import cvae

    progress = tf.Module(name="epoch_progress")
    progress.step = tf.Variable(0, dtype=tf.int64, trainable=False)
    progress.shuffle_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.step_seed = tf.Variable([0, 0], dtype=tf.int64, trainable=False)
    progress.sums = tf.Variable(tf.zeros(len(cvae.TERMS), tf.float64), trainable=False)
    return progress


def train_one_epoch(
    train_chunk,
    n_images: int,
    generator,
    batch_size: int,
    epoch: int = 1,
    progress=None,
    stop_requested: Callable[[], bool] = lambda: False,
    steps_per_chunk: int | None = None,
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

    Raises:
      NonFiniteLoss: naming the epoch, the step and the terms that were not finite.
    """
    import keras
    import tensorflow as tf

    import cvae

    progress = progress or make_epoch_progress()
    steps_per_chunk = steps_per_chunk or STEPS_PER_CHUNK
    n_steps = -(-n_images // batch_size)
    if int(progress.step) == 0:
        shuffle_seed, step_seed = tf.unstack(generator.make_seeds(2), axis=1)
        progress.shuffle_seed.assign(shuffle_seed)
        progress.step_seed.assign(step_seed)
        progress.sums.assign(tf.zeros_like(progress.sums))
    order = tf.random.experimental.stateless_shuffle(tf.range(n_images), seed=progress.shuffle_seed)
    # One row of image indices per step; the short last batch is padded with
    # -1 (rows that weigh nothing), so that every step has the same static shape
    # and the compiled chunk is traced once.
    batches = tf.reshape(
        tf.pad(order, [[0, n_steps * batch_size - n_images]], constant_values=-1),
        (n_steps, batch_size),
    )
    seeds = tf.random.experimental.stateless_split(progress.step_seed, n_steps)  # (n_steps, 2)
    progbar = keras.utils.Progbar(n_steps, stateful_metrics=list(cvae.TERMS))
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
        progbar.update(stop, list(zip(cvae.TERMS, (sums / seen).numpy(), strict=True)))
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


def save_checkpoint(manager, model, number: int) -> str:
    """Save through `manager`, unless a weight is NaN or Inf (a bad step never overwrites)."""
    import tensorflow as tf

    for variable in model.trainable_variables:
        if not bool(tf.reduce_all(tf.math.is_finite(variable))):
            raise NonFiniteLoss(f"the weights {variable.path} became NaN or Inf")
    return manager.save(checkpoint_number=number)


def restore_latest(run_dir: Path, checkpoint, manager, mid_epoch, mid_manager) -> str:
    """Restore the newest checkpoint of a run; returns its path.

    A Ctrl-C checkpoint (`mid_epoch`) is newer than the last epoch-end one when
    it was saved after that epoch ended, i.e. when its epoch count is not lower.
    """
    import tensorflow as tf

    def epochs_done(path: str) -> int:
        return int(tf.train.load_variable(path, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))

    latest, mid = manager.latest_checkpoint, mid_manager.latest_checkpoint
    if mid is not None and (latest is None or epochs_done(mid) >= epochs_done(latest)):
        restore_checkpoint(mid_epoch, mid, f"--resume {run_dir}")
        return mid
    if latest is None:
        raise UserError(
            f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'} (the run stopped "
            "before its first epoch ended); start a new run."
        )
    restore_checkpoint(checkpoint, latest, f"--resume {run_dir}")
    return latest


def restore_checkpoint(checkpoint, path: str, context: str) -> None:
    """Restore `path` into `checkpoint`, every saved object matched.

    A checkpoint that does not fit the model of the run's config.json (say,
    n_hidden edited by hand) is a UserError that starts with `context`.
    """
    import tensorflow as tf

    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise UserError(
            f"{context}: {path} does not fit the model of its config.json ({err}); "
            "was config.json edited?"
        ) from err


def record_resumed_epochs(run_dir: Path, config: Config, done: int, step: int) -> None:
    """Check that a resumed run has `config.epochs` to aim at, and record it in config.json.

    `done` epochs have ended, and `step` steps of the next one are done (0
    unless a Ctrl-C checkpoint was restored). Writing the new --epochs into
    config.json (all other keys kept) makes a later plain `--resume` aim at it
    too, e.g. after a Ctrl-C during the extension.
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
    if config.epochs != saved.get("epochs"):
        utils.write_json(path, {**saved, "epochs": config.epochs})


CANVAS_SEED = 3_000_003  # Stream of the canvases' fixed noise, apart from validation's and test's.
N_SHOWN = 100  # Test images in original/noised/restored: a 10x10 grid.
N_LATENT_MAP = 5_000  # Test images in the latent map.
N_STYLES = 10  # Fixed latent samples (columns) of the generation canvas.
MANIFOLD_SIDE = 20  # Tiles per side of a manifold canvas.


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
    z_samples: np.ndarray  # (10, n_z) from the prior N(0, I), one per generation column


def make_canvas_inputs(test_images: np.ndarray, test_y: np.ndarray, config: Config) -> CanvasInputs:
    """Draw the canvases' fixed test images, their noise and latent samples from the run's seed.

    `test_images` are uint8 pixels (data_utils.Splits); the inputs hold [0, 1] floats.
    """
    import tensorflow as tf

    import cvae
    import data_utils

    test_x = data_utils.scale(test_images)
    rng = np.random.default_rng([config.seed, CANVAS_SEED])
    order = rng.permutation(len(test_x))
    shown, mapped = order[:N_SHOWN], order[:N_LATENT_MAP]
    # The first image of each label in the shuffled order: one source per digit.
    analogy = np.array([order[np.flatnonzero(test_y[order] == k)[0]] for k in range(10)])
    z_samples = rng.standard_normal((N_STYLES, config.n_z)).astype(np.float32)

    def encoder_input(x: np.ndarray, stream: int) -> np.ndarray:
        seed = tf.constant([config.seed, CANVAS_SEED + stream], dtype=tf.int64)
        x_input, _ = cvae.prepare_batch(
            tf.constant(x), seed, config.add_noise, config.binarize == "dynamic"
        )
        return x_input.numpy()

    return CanvasInputs(
        images=test_x[shown],
        labels=test_y[shown],
        encoder_inputs=encoder_input(test_x[shown], 0),
        map_inputs=encoder_input(test_x[mapped], 1),
        map_labels=test_y[mapped],
        analogy_images=test_x[analogy],
        analogy_inputs=encoder_input(test_x[analogy], 2),
        analogy_labels=test_y[analogy],
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


def canvas_arrays(model, inputs: CanvasInputs, config: Config) -> Canvases:
    """Everything the canvases show, computed with the model (dropout off).

    Images are the decoder's mean, sigmoid(logits); reconstructions and
    analogies decode the mean of q(z|x,y).
    """
    import tensorflow as tf

    import data_utils

    def encode(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        mean, _ = model.encode(tf.constant(x), data_utils.one_hot(labels), training=False)
        return mean.numpy()

    def decode(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """z (..., n_z) and labels (...) -> mean images (..., D)."""
        flat_z = tf.constant(z.reshape(-1, z.shape[-1]))
        logits = model.decode(flat_z, data_utils.one_hot(labels.reshape(-1)), training=False)
        return tf.sigmoid(logits).numpy().reshape(*labels.shape, -1)

    grids = {}
    grids["restored"] = decode(encode(inputs.encoder_inputs, inputs.labels), inputs.labels).reshape(
        10, N_SHOWN // 10, -1
    )
    z_grid = manifold_latents(config.n_z, config.manifold_dims, config.z_range)
    for k in range(10):
        grids[f"manifold_label{k}"] = decode(z_grid, np.full(z_grid.shape[:2], k, np.int32))
    grids["generation"] = decode(*generation_latents(inputs.z_samples))
    # Analogies: row i keeps image i's encoded z (its style) and sweeps the label.
    z_style = encode(inputs.analogy_inputs, inputs.analogy_labels)  # (10, n_z)
    z_rows = np.repeat(z_style[:, np.newaxis], 10, axis=1)  # (10, 10, n_z)
    transferred = decode(z_rows, np.tile(np.arange(10, dtype=np.int32), (10, 1)))
    grids["analogy"] = np.concatenate([inputs.analogy_images[:, np.newaxis], transferred], 1)
    return Canvases(
        grids=grids,
        latent_points=encode(inputs.map_inputs, inputs.map_labels),
        latent_labels=inputs.map_labels,
    )


def write_canvases(
    model, inputs: CanvasInputs, run_dir: str | os.PathLike, epoch: int, config: Config
) -> Canvases:
    """Write the canvases of `epoch` into `run_dir`, from the model as it is now.

    Independent of the training loop: a finished run's restored checkpoint works
    as well. original.png (and noised.png with --add_noise) are written once per run.
    """
    import data_utils
    import plot

    run_dir = Path(run_dir)
    fixed = {"original": inputs.images}
    if config.add_noise:
        fixed["noised"] = inputs.encoder_inputs
    for name, images in fixed.items():
        if not (run_dir / f"{name}.png").exists():
            plot.save_grid(run_dir / f"{name}.png", images, 10, len(images) // 10)

    canvases = canvas_arrays(model, inputs, config)
    for name, grid in canvases.grids.items():
        n_rows, n_cols = grid.shape[:2]
        plot.save_grid(
            run_dir / f"{name}_epoch{epoch:03d}.png",
            grid.reshape(n_rows * n_cols, -1),
            n_rows,
            n_cols,
        )
    shown = min(config.n_z, 2)
    title = f"Encoder means of {len(canvases.latent_labels):,} test images, epoch {epoch}"
    if config.n_z > 2:
        title += f"\n(first two of {config.n_z} dimensions)"
    plot.plot_latent(
        run_dir / f"latent_epoch{epoch:03d}.png",
        canvases.latent_points[:, :shown],
        canvases.latent_labels,
        data_utils.DATASETS[config.dataset].class_names,
        title,
    )
    return canvases


def make_strategy(config: Config):
    """The tf.distribute strategy that `--strategy` names (the default one for 'none')."""
    import tensorflow as tf

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


def use_xla(config: Config) -> bool:
    """Whether to compile the training chunks with XLA (`--xla`)."""
    import tensorflow as tf

    if config.xla == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return config.xla == "on"


def build_state(config: Config, strategy=None) -> tuple:
    """A fresh (model, optimizer, generator, epoch, checkpoint) for `config`.

    The model and the optimizer are made under `strategy`'s scope (their
    variables then live on every replica). The checkpoint's layout is fixed
    (model=, optimizer=, generator=, epoch=); `run()`, `--resume`,
    `--eval_only` and the benchmarks all build and restore through here.
    """
    import keras
    import tensorflow as tf

    import cvae

    strategy = strategy or tf.distribute.get_strategy()
    policy = "mixed_float16" if config.mixed_precision else "float32"
    with strategy.scope():
        model = cvae.CVAE(
            config.n_z, config.hidden_sizes, config.keep_prob, seed=config.seed, dtype_policy=policy
        )
        optimizer = cvae.FusedAdam(config.learning_rate)
        if config.mixed_precision:
            # Scales the loss up so that float16 gradients do not underflow.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # So that a restore has slots to fill.
    generator = tf.random.Generator.from_seed(config.seed)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, generator=generator, epoch=epoch
    )
    return model, optimizer, generator, epoch, checkpoint


def run(config: Config) -> int:
    """Train (or resume) the run described by `config`; returns the exit code."""
    import tensorflow as tf

    import cvae
    import plot

    # Whatever can refuse the run is checked before anything is created.
    target = Path(config.resume or config.results_dir)
    try:
        utils.check_can_create_in(target)
    except ValueError as err:
        flag = "--resume" if config.resume else "--results_dir"
        raise UserError(f"{flag} {target}: {err}") from err
    utils.set_seed(config.seed)
    strategy = make_strategy(config)
    print(
        f"Device: {utils.device_description()}; {strategy.num_replicas_in_sync} replica(s), "
        f"{'mixed_float16' if config.mixed_precision else 'float32'}, "
        f"XLA {'on' if use_xla(config) else 'off'}"
    )
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        print("Note: --mixed_precision on a CPU runs, but float16 is slower there than float32.")
    splits = load_splits(config)
    train_x, train_y, valid_x, valid_y = training_tensors(splits, config)
    n_train = int(train_x.shape[0])
    canvas_inputs = make_canvas_inputs(splits.test_images, splits.test_y, config)

    model, optimizer, generator, epoch, checkpoint = build_state(config, strategy)
    # Ctrl-C saves the same objects plus where the epoch stands, in a folder of
    # its own, so that the epoch-end checkpoints keep their layout.
    progress = make_epoch_progress()
    mid_epoch = tf.train.Checkpoint(
        model=model, optimizer=optimizer, generator=generator, epoch=epoch, progress=progress
    )

    if config.resume:
        run_dir = Path(config.resume)
    else:
        try:
            run_dir = utils.make_run_dir(config.results_dir, config.run_tags())
        except OSError as err:
            raise UserError(f"--results_dir {config.results_dir}: {err}") from err
        utils.write_json(
            run_dir / "config.json", {**config.to_json(), "versions": utils.library_versions()}
        )
    manager = tf.train.CheckpointManager(checkpoint, run_dir / "checkpoints", max_to_keep=3)
    mid_manager = tf.train.CheckpointManager(
        mid_epoch, run_dir / "checkpoints" / "interrupted", max_to_keep=1
    )
    history: list[dict] = []
    if config.resume:
        restored = restore_latest(run_dir, checkpoint, manager, mid_epoch, mid_manager)
        record_resumed_epochs(run_dir, config, int(epoch), int(progress.step))
        # Rows after the checkpoint belong to an epoch that will be trained again.
        history = [
            row
            for row in utils.read_csv(run_dir / "metrics.csv")
            if int(row["epoch"]) <= int(epoch)
        ]
        where = f"after epoch {int(epoch)}"
        if int(progress.step):
            where += f", step {int(progress.step)} of epoch {int(epoch) + 1}"
        print(f"Resuming {restored} {where} of {config.epochs}")
    print(f"Run folder: {run_dir}")

    train_chunk = cvae.make_train_chunk(
        model, optimizer, train_x, train_y, config.add_noise, config.binarize == "dynamic",
        strategy, jit_compile=use_xla(config),
    )  # fmt: skip
    eval_step = cvae.make_eval_step(model, config.add_noise, config.binarize == "dynamic")
    resume_hint = f"python main.py --resume {run_dir}"
    with stop_on_sigint() as stop_requested:
        for index in range(int(epoch), config.epochs):
            learning_rate = config.learning_rate * config.lr_decay**index
            optimizer.learning_rate.assign(learning_rate)
            start = time.perf_counter()
            try:
                train = train_one_epoch(
                    train_chunk, n_train, generator, config.batch_size,
                    index + 1, progress, stop_requested,
                )  # fmt: skip
                if train is None:
                    path = save_checkpoint(mid_manager, model, int(optimizer.iterations))
                    print(  # From a new line: the progress bar's line is unfinished.
                        f"\nInterrupted: saved the state after step {int(progress.step)} of "
                        f"epoch {index + 1} in {path}. Continue with: {resume_hint}",
                        file=sys.stderr,
                    )
                    return EXIT_INTERRUPTED
                valid = cvae.evaluate_elbo(eval_step, valid_x, valid_y, VALID_SEED)
                bad = non_finite_terms(valid)
                if bad is not None:
                    raise NonFiniteLoss(
                        f"non-finite validation terms after epoch {index + 1}: {bad}"
                    )
                seconds = time.perf_counter() - start
                history.append(
                    {
                        "epoch": index + 1,
                        **{f"train_{k}": round(v, 6) for k, v in train.items()},
                        **{f"valid_{k}": round(v, 6) for k, v in valid.items()},
                        "learning_rate": learning_rate,
                        "seconds": round(seconds, 3),
                    }
                )
                # Metrics first, then the checkpoint: a crash in between re-trains
                # the epoch on resume, and its stale row is dropped above.
                utils.write_csv(run_dir / "metrics.csv", history)
                epoch.assign(index + 1)
                progress.step.assign(0)
                save_checkpoint(manager, model, index + 1)
                plot.plot_curves(run_dir / "curves.png", history)
                if (index + 1) % config.plot_every == 0 or index + 1 == config.epochs:
                    write_canvases(model, canvas_inputs, run_dir, index + 1, config)
            except NonFiniteLoss as err:
                raise NonFiniteLoss(
                    f"training diverged: {err}; nothing was saved after the last good "
                    f"step. {_after_divergence(manager, resume_hint)}"
                ) from None
            print(
                f"epoch {index + 1:3d}/{config.epochs}  train -elbo {train['loss']:.3f} "
                f"(recon {train['recon']:.3f}, kl {train['kl']:.3f})  "
                f"valid -elbo {valid['loss']:.3f}  lr {learning_rate:.3g}  {seconds:.1f}s"
            )
            if stop_requested():
                print(
                    f"Interrupted: saved the state after epoch {index + 1} in "
                    f"{manager.latest_checkpoint}. Continue with: {resume_hint}",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED

    return final_evaluation(run_dir, model, splits, config, int(epoch), manager.latest_checkpoint)


def training_tensors(splits, config: Config) -> tuple:
    """(train images, train labels, validation images, validation labels) as tensors.

    The training images are the first `--n_train`, held as the compiled loop
    reads them: uint8 on a CPU (43 MB instead of 172 for MNIST, each batch
    scaled in the graph, to the same floats: tested); float32 when a GPU is
    visible, which has memory to spare, since a uint8 gather without a GPU
    kernel would be placed on the CPU, a host round trip per step (not
    checked: no GPU here). The validation images are scaled once.
    """
    import tensorflow as tf

    import data_utils

    n_train = config.n_train or len(splits.train_images)
    train_x = splits.train_images[:n_train]
    if tf.config.list_physical_devices("GPU"):
        train_x = data_utils.scale(train_x)
    return (
        tf.constant(train_x),
        tf.constant(splits.train_y[:n_train]),
        tf.constant(data_utils.scale(splits.valid_images)),
        tf.constant(splits.valid_y),
    )


def load_splits(config: Config):
    """The train/validation/test splits of the run's dataset; a data problem is a UserError."""
    import data_utils

    try:
        return data_utils.load_dataset(config.dataset, config.data_dir)
    except data_utils.DataError as err:
        raise UserError(str(err)) from err


def evaluate_run(model, splits, config: Config) -> dict:
    """Every test metric of a trained model; the keys of metrics.json (README, "Evaluation").

    The test images (the first `config.n_eval`) are binarised (with
    `--binarize dynamic`) and noised (with `--add_noise`) once, from TEST_SEED,
    and dropout is off. The likelihood metrics (−ELBO, −log p(x|y), −log p(x),
    classifier) are those of the clean image x, the encoder seeing x too, even
    for a denoising run: they then depend on the model and x alone, not on a
    noise draw, and are the usual VAE quantities (the encoder is only the
    importance sampler's proposal; on a denoising run its bound was measured
    about 0.5 nats tighter with clean than with noised input). Only the
    denoising metrics use the noised image. Metrics a run cannot have
    (denoising without noise, likelihoods with `--iw_samples 0`) are None.
    """
    import tensorflow as tf

    import cvae
    import data_utils

    start = time.perf_counter()
    n = config.n_eval or len(splits.test_images)
    x = tf.constant(data_utils.scale(splits.test_images[:n]))
    labels = tf.constant(splits.test_y[:n])
    binarize = config.binarize == "dynamic"
    eval_step = cvae.make_eval_step(model, add_noise=False, binarize=binarize)
    elbo = cvae.evaluate_elbo(eval_step, x, labels, TEST_SEED)
    metrics = {
        "n_eval": n,
        "iw_samples": config.iw_samples,
        **{f"test_{k}": v for k, v in elbo.items()},
        "test_nll_x_given_y": None,
        "test_nll_x": None,
        "test_classifier_error": None,
    }
    x_input, target = cvae.prepare_heldout(x, TEST_SEED, config.add_noise, binarize)
    if config.iw_samples:
        print(f"Importance-weighted log p(x|y), K={config.iw_samples}, {n} images x 10 labels")
        log_px_y = cvae.evaluate_log_likelihoods(model, target, config.iw_samples, IW_SEED)
        true_label = tf.gather(log_px_y, labels, batch_dims=1)
        predicted = tf.argmax(log_px_y, axis=1, output_type=labels.dtype)
        metrics["test_nll_x_given_y"] = -float(tf.reduce_mean(true_label))
        metrics["test_nll_x"] = -float(tf.reduce_mean(cvae.log_marginal_over_labels(log_px_y)))
        metrics["test_classifier_error"] = 100.0 * float(
            np.mean(predicted.numpy() != labels.numpy())
        )
    denoising = ("psnr", "bce")
    names = ("noised", "median", "cvae")
    metrics.update({f"denoise_{m}_{c}": None for m in denoising for c in names})
    if config.add_noise:
        restored = cvae.restore(model, x_input, labels)
        metrics.update(utils.denoising_metrics(target.numpy(), x_input.numpy(), restored.numpy()))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    print(format_metrics(metrics, config.binarize))
    return metrics


def evaluate_into(run_dir: Path, model, splits, config: Config, epochs: int, checkpoint: str):
    """Evaluate the model of `checkpoint` (after `epochs`) and write the run's metrics.json."""
    results = {"epochs": epochs, **evaluate_run(model, splits, config)}
    results["train_seconds"] = training_seconds(run_dir)
    results["checkpoint"] = Path(checkpoint).name
    write_metrics(run_dir, results)


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
    lines = [f"Test metrics over {metrics['n_eval']} images"]
    lines += [f"  {label:<24} {_cell(metrics[key])}" for label, key in rows]
    if binarize == "none":
        lines.append(f"  {GREY_LEVEL_NOTE}")
    if metrics["denoise_psnr_cvae"] is not None:
        lines.append(f"  {'denoising':<24} {'PSNR (dB)':>10} {'BCE (nats/pixel)':>17}")
        for name in ("noised", "median", "cvae"):
            psnr, bce = metrics[f"denoise_psnr_{name}"], metrics[f"denoise_bce_{name}"]
            lines.append(f"    {name:<22} {psnr:>10.2f} {bce:>17.4f}")
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
        utils.atomic_write_bytes(kept, path.read_bytes())
    utils.write_json(path, metrics)


def evaluate_only(config: Config) -> int:
    """`--eval_only RUN_DIR`: evaluate the run's last checkpoint into its metrics.json."""
    import tensorflow as tf

    run_dir = Path(config.eval_only)
    utils.set_seed(config.seed)
    print(f"Device: {utils.device_description()}")
    latest = tf.train.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise UserError(f"--eval_only {run_dir}: no checkpoint in {run_dir / 'checkpoints'}.")
    check_eval_only_folder(run_dir)
    model, _, _, epoch, checkpoint = build_state(config)
    restore_checkpoint(checkpoint, latest, f"--eval_only {run_dir}")
    print(f"Evaluating {latest} (epoch {int(epoch)})")
    splits = load_splits(config)
    evaluate_into(run_dir, model, splits, config, int(epoch), latest)
    print(f"wrote {run_dir / 'metrics.json'}")
    draw_missing_canvases(run_dir, model, splits, config, int(epoch))
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


def final_evaluation(run_dir: Path, model, splits, config: Config, epochs: int, checkpoint: str):
    """The end of a training run: evaluate into metrics.json; returns the exit code.

    A Ctrl-C here comes after every checkpoint was saved: it says so, and how to
    evaluate again.
    """
    try:
        evaluate_into(run_dir, model, splits, config, epochs, checkpoint)
    except KeyboardInterrupt:
        print(
            f"\nInterrupted during the final evaluation; the training finished and its "
            f"checkpoints are saved. Evaluate with: python main.py --eval_only {run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"outputs in {run_dir}")
    return 0


def draw_missing_canvases(run_dir: Path, model, splits, config: Config, epoch: int) -> None:
    """Draw the canvases of `epoch` and the curves if the run folder lacks them.

    Existing pictures are left alone: they are the record of the run (and equal
    to what would be drawn, since the canvases' inputs are fixed by the seed).
    """
    import plot

    if not (run_dir / "curves.png").exists():
        plot.plot_curves(run_dir / "curves.png", utils.read_csv(run_dir / "metrics.csv"))
    if (run_dir / f"latent_epoch{epoch:03d}.png").exists():
        return
    inputs = make_canvas_inputs(splits.test_images, splits.test_y, config)
    write_canvases(model, inputs, run_dir, epoch, config)
    print(f"drew the canvases of epoch {epoch} in {run_dir}")


def _after_divergence(manager, resume_hint: str) -> str:
    """What to do after a NaN: the checkpoints saved so far are good."""
    if manager.latest_checkpoint is None:
        return "No epoch had ended: start a new run with a smaller --learning_rate."
    return (
        f"The checkpoints up to {manager.latest_checkpoint} are untouched: start a new run "
        f"with a smaller --learning_rate, or `{resume_hint}` to retry from the last one "
        "(with the same flags it repeats the same steps)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the process exit code."""
    config = parse_args(argv)
    try:
        if config.eval_only is not None:
            return evaluate_only(config)
        return run(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if config.eval_only is not None:
            message = f"Interrupted: {config.eval_only}/metrics.json was not (re)written."
        else:
            message = (
                "Interrupted before a checkpoint could be saved; `python main.py --resume "
                "RUN_FOLDER` continues from the run's last checkpoint, if it has one."
            )
        print(f"\n{message}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
