"""Train a conditional VAE on MNIST: `python main.py --add_noise True`.

A TensorFlow 2 re-implementation of a TensorFlow 1.4 CVAE. Each run gets its
own folder under results/ with its config, per-epoch metrics, checkpoints and
canvases; `--resume RUN_DIR` continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TensorFlow's C++ start-up chatter.

import utils

PROJECT_DIR = Path(__file__).resolve().parent
DATASET_NAMES = ("mnist", "fashion_mnist")
BINARIZE_MODES = ("none", "dynamic")
STRATEGIES = ("none", "mirrored", "multi_worker")
XLA_MODES = ("auto", "on", "off")
# Flags that may differ when resuming: the rest must match the saved config.
# (How the run is spread over devices changes no variable of the checkpoint.)
RESUME_OVERRIDABLE = ("epochs", "resume", "strategy", "xla")


def _help(text: str, **argparse_kwargs) -> dict:
    return {"help": text, **argparse_kwargs}


@dataclass(frozen=True)
class Config:
    """Every setting of a run; saved as config.json in the run folder."""

    add_noise: bool = field(
        default=False,
        metadata=_help(
            "train as a denoiser: corrupt the encoder's input with salt-and-pepper noise",
            type=utils.str_to_bool, nargs="?", const=True,
        ),
    )  # fmt: skip
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
    resume: str | None = field(
        default=None,
        metadata=_help("continue the run in this folder from its last checkpoint, with its config"),
    )
    mixed_precision: bool = field(
        default=False,
        metadata=_help(
            "compute in float16 with float32 weights, loss and outputs (Keras mixed_float16, "
            "with loss scaling): for GPUs; on a CPU it works but is slower",
            type=utils.str_to_bool, nargs="?", const=True,
        ),
    )  # fmt: skip
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
        from data_utils import N_TRAIN

        checks = [
            (self.n_z >= 1, f"--n_z must be >= 1, got {self.n_z}"),
            (
                len(self.n_hidden) in (1, 4) and min(self.n_hidden) >= 1,
                f"--n_hidden takes one or four sizes >= 1, got {list(self.n_hidden)}",
            ),
            (0.0 < self.keep_prob <= 1.0, f"--keep_prob must be in (0, 1], got {self.keep_prob}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (
                self.learning_rate > 0,
                f"--learning_rate must be > 0, got {self.learning_rate}",
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

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
        if "n_hidden" in kept:
            kept["n_hidden"] = tuple(kept["n_hidden"])
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
        if f.name == "n_hidden":
            kwargs["type"] = int
        kwargs.setdefault("type", hints.get(str(f.type)))
        default = argparse.SUPPRESS if suppress_defaults else f.default
        parser.add_argument(f"--{f.name}", default=default, **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Flags -> validated Config; bad values exit with an argparse error (code 2)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args["n_hidden"] = tuple(args["n_hidden"])
    try:
        config = Config(**args)
    except ValueError as err:
        parser.error(str(err))
    if config.resume is not None:
        explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
        config = _resumed_config(config, explicit, parser)
    return config


def _resumed_config(config: Config, explicit: dict, parser: argparse.ArgumentParser) -> Config:
    """The saved config of the run to resume, with `--epochs` allowed to extend it."""
    path = Path(config.resume) / "config.json"
    try:
        saved = Config.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        parser.error(f"--resume {config.resume}: no config.json there; is it a run folder?")
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--resume {config.resume}: cannot read {path}: {err}")
    clashes = [
        f"--{name} {getattr(config, name)} (the run has {getattr(saved, name)})"
        for name in explicit
        if name not in RESUME_OVERRIDABLE and getattr(config, name) != getattr(saved, name)
    ]
    if clashes:
        parser.error(
            "--resume uses the run's own config; these flags contradict it: "
            + ", ".join(clashes)
            + ". Drop them, or start a new run."
        )
    overrides = {name: getattr(config, name) for name in RESUME_OVERRIDABLE if name in explicit}
    return dataclasses.replace(saved, **{**overrides, "resume": config.resume})


# Fixed seeds for the held-out splits: every epoch and every run sees the same
# noise, binarisation and ε there, so their numbers compare across both.
VALID_SEED = 1_000_003
TEST_SEED = 2_000_003


class UserError(RuntimeError):
    """A problem the user can fix; reported as one line, without a traceback."""


class NonFiniteLoss(UserError):
    """A training step produced NaN or infinity."""


def train_one_epoch(
    train_chunk, n_images: int, generator, batch_size: int, steps_per_chunk: int = 50
) -> dict[str, float]:
    """One shuffled pass over the training images with a progress bar; returns the means.

    The epoch draws two seeds from `generator` (checkpointed, so resuming
    repeats the draws): one shuffles, one is split into a seed per step. The
    numbers therefore do not depend on `steps_per_chunk`, which only sets how
    often Python looks in (the progress bar, a stop request, the NaN check).

    Args:
      train_chunk: from `cvae.make_train_chunk`.
      n_images: how many training images `train_chunk` holds.
      steps_per_chunk: compiled steps between two looks from Python.

    Raises:
      NonFiniteLoss: naming the step and the terms that were not finite.
    """
    import keras
    import tensorflow as tf

    shuffle_seed, step_seed = tf.unstack(generator.make_seeds(2), axis=1)
    order = tf.random.experimental.stateless_shuffle(tf.range(n_images), seed=shuffle_seed)
    n_steps = -(-n_images // batch_size)
    # One row of image indices per step; the short last batch is padded with
    # -1 (rows that weigh nothing), so that every step has the same static shape
    # and the compiled chunk is traced once.
    batches = tf.reshape(
        tf.pad(order, [[0, n_steps * batch_size - n_images]], constant_values=-1),
        (n_steps, batch_size),
    )
    seeds = tf.random.experimental.stateless_split(step_seed, n_steps)  # (n_steps, 2)
    totals = {name: 0.0 for name in ("loss", "recon", "kl")}
    progbar = keras.utils.Progbar(n_steps, stateful_metrics=list(totals))
    for start in range(0, n_steps, steps_per_chunk):
        stop = min(start + steps_per_chunk, n_steps)
        sums, done = train_chunk(batches, seeds, tf.constant(start), tf.constant(stop))
        sums = {name: float(value) for name, value in sums.items()}
        bad = [name for name, value in sums.items() if not math.isfinite(value)]
        if bad:
            raise NonFiniteLoss(
                f"step {start + int(done)} of {n_steps} gave a non-finite {', '.join(bad)}; "
                "try a smaller --learning_rate."
            )
        for name, value in sums.items():
            totals[name] += value
        seen = min(stop * batch_size, n_images)
        progbar.update(stop, [(name, total / seen) for name, total in totals.items()])
    return {name: total / n_images for name, total in totals.items()}


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


def build_training(config: Config, strategy=None):
    """The model, its optimizer and the run's random generator, as `config` says.

    Returns (cvae.CVAE, optimizer, tf.random.Generator). The model and the
    optimizer are made under `strategy`'s scope (their variables then live on
    every replica). The benchmark builds its model through here too.
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
    return model, optimizer, generator


def use_xla(config: Config) -> bool:
    """Whether to compile the training chunks with XLA (`--xla`)."""
    import tensorflow as tf

    if config.xla == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return config.xla == "on"


def run(config: Config) -> int:
    """Train (or resume) the run described by `config`; returns the exit code."""
    import tensorflow as tf

    import cvae
    import data_utils

    utils.set_seed(config.seed)
    strategy = make_strategy(config)
    print(
        f"Device: {utils.device_description()}; {strategy.num_replicas_in_sync} replica(s), "
        f"{'mixed_float16' if config.mixed_precision else 'float32'}, "
        f"XLA {'on' if use_xla(config) else 'off'}"
    )
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        print("Note: --mixed_precision on a CPU runs, but float16 is slower there than float32.")
    try:
        splits = data_utils.load_dataset(config.dataset, config.data_dir)
    except data_utils.DataError as err:
        raise UserError(str(err)) from err
    n_train = config.n_train or len(splits.train_x)
    train_x = tf.constant(splits.train_x[:n_train])
    train_y = tf.constant(splits.train_y[:n_train])
    valid_x, valid_y = tf.constant(splits.valid_x), tf.constant(splits.valid_y)

    model, optimizer, generator = build_training(config, strategy)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, generator=generator, epoch=epoch
    )

    if config.resume:
        run_dir = Path(config.resume)
    else:
        run_dir = utils.make_run_dir(config.results_dir, config.run_tags())
        utils.write_json(
            run_dir / "config.json", {**config.to_json(), "versions": utils.library_versions()}
        )
    manager = tf.train.CheckpointManager(checkpoint, run_dir / "checkpoints", max_to_keep=3)
    history: list[dict] = []
    if config.resume:
        if manager.latest_checkpoint is None:
            raise UserError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'}.")
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        # Rows after the checkpoint belong to an epoch that will be trained again.
        history = [
            row
            for row in utils.read_csv(run_dir / "metrics.csv")
            if int(row["epoch"]) <= int(epoch)
        ]
        print(f"Resuming {run_dir} after epoch {int(epoch)} of {config.epochs}")
    print(f"Run folder: {run_dir}")

    train_chunk = cvae.make_train_chunk(
        model, optimizer, train_x, train_y, config.add_noise, config.binarize == "dynamic",
        strategy, jit_compile=use_xla(config),
    )  # fmt: skip
    eval_step = cvae.make_eval_step(model, config.add_noise, config.binarize == "dynamic")
    for index in range(int(epoch), config.epochs):
        learning_rate = config.learning_rate * config.lr_decay**index
        optimizer.learning_rate.assign(learning_rate)
        start = time.perf_counter()
        train = train_one_epoch(train_chunk, n_train, generator, config.batch_size)
        valid = cvae.evaluate_elbo(eval_step, valid_x, valid_y, VALID_SEED)
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
        # Metrics first, then the checkpoint: a crash in between re-trains the
        # epoch on resume, and its stale row is dropped above.
        utils.write_csv(run_dir / "metrics.csv", history)
        epoch.assign(index + 1)
        manager.save(checkpoint_number=index + 1)
        print(
            f"epoch {index + 1:3d}/{config.epochs}  train -elbo {train['loss']:.3f} "
            f"(recon {train['recon']:.3f}, kl {train['kl']:.3f})  "
            f"valid -elbo {valid['loss']:.3f}  lr {learning_rate:.3g}  {seconds:.1f}s"
        )

    test = cvae.evaluate_elbo(
        eval_step, tf.constant(splits.test_x), tf.constant(splits.test_y), TEST_SEED
    )
    results = {"epochs": int(epoch), **{f"test_{k}": v for k, v in test.items()}}
    utils.write_json(run_dir / "metrics.json", results)
    print(
        f"test -elbo {test['loss']:.3f} nats (recon {test['recon']:.3f}, kl {test['kl']:.3f}); "
        f"outputs in {run_dir}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the process exit code."""
    config = parse_args(argv)
    try:
        return run(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
