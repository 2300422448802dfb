"""Train a conditional VAE on MNIST: `python main.py --add_noise True`.

A TensorFlow 2 re-implementation of a TensorFlow 1.4 CVAE. Each run gets its
own folder under results/ with its config, per-epoch metrics, checkpoints and
canvases; `--resume RUN_DIR` continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TensorFlow's C++ start-up chatter.

import utils

PROJECT_DIR = Path(__file__).resolve().parent
# Measured with benchmarks/bench_eval.py: see the README's "Evaluation" section.
DEFAULT_IW_SAMPLES = 25
DATASET_NAMES = ("mnist", "fashion_mnist")
BINARIZE_MODES = ("none", "dynamic")
# Settings of the final evaluation, not of the model: free to change on --resume
# and --eval_only.
EVAL_SETTINGS = ("iw_samples", "n_eval")
# Flags that may differ when resuming: the rest must match the saved config.
RESUME_OVERRIDABLE = ("epochs", "resume", *EVAL_SETTINGS)
# Flags that may differ with --eval_only (the data may have moved).
EVAL_ONLY_OVERRIDABLE = ("eval_only", "data_dir", *EVAL_SETTINGS)


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

    def __post_init__(self) -> None:
        from data_utils import N_TEST, N_TRAIN

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
    if config.eval_only is not None:
        explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
        config = _eval_only_config(config, explicit, parser)
    return config


def _saved_config(run_dir: str, flag: str, parser: argparse.ArgumentParser) -> Config:
    """The Config saved in `run_dir`/config.json; a parser error names `flag` if unreadable."""
    path = Path(run_dir) / "config.json"
    try:
        return Config.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        parser.error(f"{flag} {run_dir}: no config.json there; is it a run folder?")
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"{flag} {run_dir}: cannot read {path}: {err}")


def _eval_only_config(config: Config, explicit: dict, parser: argparse.ArgumentParser) -> Config:
    """The run's saved config, with this command's evaluation settings."""
    others = sorted(set(explicit) - set(EVAL_ONLY_OVERRIDABLE))
    if others:
        parser.error(
            "--eval_only evaluates the run with its own config; drop "
            + ", ".join(f"--{name}" for name in others)
            + " (only --iw_samples, --n_eval and --data_dir may change)."
        )
    saved = _saved_config(config.eval_only, "--eval_only", parser)
    data_dir = config.data_dir if "data_dir" in explicit else saved.data_dir
    return dataclasses.replace(
        saved,
        iw_samples=config.iw_samples,
        n_eval=config.n_eval,
        data_dir=data_dir,
        resume=None,
        eval_only=config.eval_only,
    )


def _resumed_config(config: Config, explicit: dict, parser: argparse.ArgumentParser) -> Config:
    """The saved config of the run to resume, with `--epochs` allowed to extend it."""
    saved = _saved_config(config.resume, "--resume", parser)
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
    epochs = config.epochs if "epochs" in explicit else saved.epochs
    evaluation = {name: getattr(config, name) for name in EVAL_SETTINGS if name in explicit}
    return dataclasses.replace(saved, epochs=epochs, resume=config.resume, **evaluation)


# Fixed seeds for the held-out splits: every epoch and every run sees the same
# noise, binarisation and ε there, so their numbers compare across both.
VALID_SEED = 1_000_003
TEST_SEED = 2_000_003
IW_SEED = 3_000_017  # The importance samples of the test evaluation.


class UserError(RuntimeError):
    """A problem the user can fix; reported as one line, without a traceback."""


def train_one_epoch(train_step, images, labels, generator, batch_size: int) -> dict[str, float]:
    """One shuffled pass over (images, labels) with a progress bar; returns the means."""
    import keras
    import tensorflow as tf

    n = int(images.shape[0])
    n_batches = -(-n // batch_size)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=generator.make_seeds(1)[:, 0]
    )
    means = {name: keras.metrics.Mean(name) for name in ("loss", "recon", "kl")}
    progbar = keras.utils.Progbar(n_batches, stateful_metrics=list(means))
    for step in range(n_batches):
        index = order[step * batch_size : (step + 1) * batch_size]
        terms = train_step(tf.gather(images, index), tf.gather(labels, index))
        for name, metric in means.items():
            metric.update_state(terms[name], sample_weight=tf.size(index))
        if step % 20 == 19 or step == n_batches - 1:
            progbar.update(step + 1, [(name, m.result()) for name, m in means.items()])
    return {name: float(metric.result()) for name, metric in means.items()}


def build_state(config: Config) -> tuple:
    """A fresh (model, optimizer, generator, epoch, checkpoint) for `config`.

    The checkpoint's layout is fixed (model=, optimizer=, generator=, epoch=).
    Restore through the whole of it: the CVAE's hidden layers (kept in Python
    lists) are saved only under optimizer/_trainable_variables, so a
    Checkpoint(model=...) alone silently leaves them at their initial values.
    """
    import keras
    import tensorflow as tf

    import cvae

    model = cvae.CVAE(config.n_z, config.hidden_sizes, config.keep_prob, seed=config.seed)
    optimizer = keras.optimizers.Adam(config.learning_rate)
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

    utils.set_seed(config.seed)
    print(f"Device: {utils.device_description()}")
    splits = load_splits(config)
    n_train = config.n_train or len(splits.train_x)
    train_x = tf.constant(splits.train_x[:n_train])
    train_y = tf.constant(splits.train_y[:n_train])
    valid_x, valid_y = tf.constant(splits.valid_x), tf.constant(splits.valid_y)

    model, optimizer, generator, epoch, checkpoint = build_state(config)

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

    train_step = cvae.make_train_step(
        model, optimizer, generator, config.add_noise, config.binarize == "dynamic"
    )
    eval_step = cvae.make_eval_step(model, config.add_noise, config.binarize == "dynamic")
    for index in range(int(epoch), config.epochs):
        learning_rate = config.learning_rate * config.lr_decay**index
        optimizer.learning_rate.assign(learning_rate)
        start = time.perf_counter()
        train = train_one_epoch(train_step, train_x, train_y, generator, config.batch_size)
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

    evaluate_into(run_dir, model, splits, config, int(epoch), manager.latest_checkpoint)
    print(f"outputs in {run_dir}")
    return 0


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
    import numpy as np
    import tensorflow as tf

    import cvae

    start = time.perf_counter()
    n = config.n_eval or len(splits.test_x)
    x, labels = tf.constant(splits.test_x[:n]), tf.constant(splits.test_y[:n])
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
        log_px_y = cvae.evaluate_log_likelihoods(model, target, target, config.iw_samples, IW_SEED)
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
    print(format_metrics(metrics))
    return metrics


def evaluate_into(run_dir: Path, model, splits, config: Config, epochs: int, checkpoint: str):
    """Evaluate the model of `checkpoint` (after `epochs`) and write the run's metrics.json."""
    results = {"epochs": epochs, **evaluate_run(model, splits, config)}
    results["train_seconds"] = training_seconds(run_dir)
    results["checkpoint"] = Path(checkpoint).name
    write_metrics(run_dir, results)


def format_metrics(metrics: dict) -> str:
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
        utils.atomic_write_bytes(
            _free_name(run_dir, f"metrics.{stamp}", ".json"), path.read_bytes()
        )
    utils.write_json(path, metrics)


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    for attempt in range(1, 1000):
        candidate = folder / (f"{stem}{suffix}" if attempt == 1 else f"{stem}_{attempt}{suffix}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"no free file name {stem}*{suffix} in {folder}")


def evaluate_only(config: Config) -> int:
    """`--eval_only RUN_DIR`: evaluate the run's last checkpoint into its metrics.json."""
    import tensorflow as tf

    run_dir = Path(config.eval_only)
    utils.set_seed(config.seed)
    print(f"Device: {utils.device_description()}")
    latest = tf.train.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise UserError(f"--eval_only {run_dir}: no checkpoint in {run_dir / 'checkpoints'}.")
    model, _, _, epoch, checkpoint = build_state(config)
    try:
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise UserError(
            f"--eval_only {run_dir}: {latest} does not fit the model of its config.json ({err})."
        ) from err
    print(f"Evaluating {latest} (epoch {int(epoch)})")
    splits = load_splits(config)
    evaluate_into(run_dir, model, splits, config, int(epoch), latest)
    print(f"wrote {run_dir / 'metrics.json'}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
