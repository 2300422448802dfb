"""`Config`: every flag of a run as a frozen dataclass, its validation, derived sizes and JSON.

One field per flag, each with its help line; main.py builds the parser from
the fields. No TensorFlow here: parsing and checking flags stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import utils
from data_utils import N_CLASSES, N_TEST, N_TRAIN

# Keeps the default run's final evaluation to minutes on a CPU (benchmarks/bench_eval.py).
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


MAX_SEED = 2**32 - 1  # NumPy's seeding limit.


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


def _help(text: str, **argparse_kwargs) -> dict:
    return {"help": text, **argparse_kwargs}


def _bool_help(text: str) -> dict:
    # Never type=bool (argparse would read "False" as True); the flag alone means True.
    return _help(text, type=str_to_bool, nargs="?", const=True)


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
        default=0.98,
        metadata=_help(
            "learning-rate factor per epoch, in (0, 1], applied smoothly at every step "
            "as the original: rate · decay^(step / steps per epoch); 1.0 = no decay"
        ),
    )
    train_samples: int = field(
        default=1,
        metadata=_help(
            "K: train on the importance-weighted bound with K samples per image (Burda et al. "
            "2015, eq. 8); 1 = the ELBO. Costs about K decoder passes per image"
        ),
    )
    kl_warmup: int = field(
        default=0,
        metadata=_help(
            "the KL term's weight rises linearly from 0 to 1 over the first N epochs "
            "(Sønderby et al. 2016); 0 = off. Validation and test always use the full KL"
        ),
    )
    kl_weight: float = field(
        default=1.0,
        metadata=_help(
            "β, the KL term's weight in the training objective (β-VAE, Higgins et al. 2017); "
            "1 = the ELBO. Below 1 the encoder keeps more of its input: sharper restorations, "
            "a looser bound. Validation and test always use the full KL"
        ),
    )
    n_labeled: int | None = field(
        default=None,
        metadata=_help(
            "semi-supervised M2 (Kingma et al. 2014): keep the labels of N training images, "
            "N/10 per class drawn from --seed, and train a classifier q(y|x) on all the "
            "images (default: every label, no q(y|x))"
        ),
    )
    alpha: float = field(
        default=0.1,
        metadata=_help(
            "with --n_labeled: the paper's α/N, weight of q(y|x)'s cross-entropy per image; "
            "the paper's α = 0.1·N"
        ),
    )
    conditional: bool = field(
        default=True,
        metadata=_bool_help(
            "False: a plain VAE, q(z|x) and p(x|z) without the label (M1 of Kingma et al. "
            "2014); its per-label canvases are not drawn"
        ),
    )
    features: str | None = field(
        default=None,
        metadata=_help(
            "a finished --conditional False run (M1): train on z1 ~ q(z1|x) of its encoder, "
            "drawn afresh each batch, with a Gaussian likelihood (M1+M2 with --n_labeled)"
        ),
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
        default="results",
        metadata=_help("parent folder of the run folders, relative to the working directory"),
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
            "of the default run to a few minutes on a CPU; Burda et al. used 5000"
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
            "compile each chunk of training steps with XLA, random draws by threefry "
            "(else Philox): 'on' always, and refuses a run of several replicas (a "
            "strategy's), which XLA cannot compile; 'auto' compiles a run of one "
            "replica and not one of several; 'off' never",
            choices=XLA_MODES,
        ),
    )

    def __post_init__(self) -> None:

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
                self.train_samples >= 1,
                f"--train_samples must be >= 1 (1 = the ELBO), got {self.train_samples}",
            ),
            (self.kl_warmup >= 0, f"--kl_warmup must be >= 0 (0 = off), got {self.kl_warmup}"),
            (
                math.isfinite(self.kl_weight) and self.kl_weight >= 0,
                f"--kl_weight must be a finite number >= 0 (1 = the ELBO), got {self.kl_weight}",
            ),
            *self._m2_checks(),
            *self._m1_checks(),
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

    def _m2_checks(self) -> list[tuple[bool, str]]:
        """--alpha's and --n_labeled's checks that need no data (the classes' counts are
        checked on the data, by data_utils.labelled_subset)."""

        alpha_ok = (
            math.isfinite(self.alpha) and self.alpha >= 0,
            f"--alpha must be a finite number >= 0, got {self.alpha}",
        )
        n = self.n_labeled
        if n is None:
            return [alpha_ok]
        n_train = self.n_train or N_TRAIN
        return [
            alpha_ok,
            (
                n >= N_CLASSES and n % N_CLASSES == 0,
                f"--n_labeled must be a positive multiple of {N_CLASSES} (balanced over the "
                f"classes), got {n}",
            ),
            (
                n < n_train,
                f"--n_labeled {n} leaves no unlabelled image of the {n_train} training "
                "images: lower it, or drop it to train on every label",
            ),
            (
                self.train_samples == 1,
                "--n_labeled trains on the ELBO only for now: drop --train_samples",
            ),
            (
                self.strategy == "none",
                f"--n_labeled runs on one device for now: drop --strategy {self.strategy}",
            ),
            (self.batch_size >= 4, "--n_labeled needs --batch_size >= 4"),
        ]

    def _m1_checks(self) -> list[tuple[bool, str]]:
        """What a plain VAE (--conditional False) and a run on M1's features exclude."""
        feature_flags = [
            flag for flag, on in (
                ("--add_noise True", self.add_noise),
                ("--binarize dynamic", self.binarize != "none"),
                (f"--strategy {self.strategy}", self.strategy != "none"),
            ) if on
        ]  # fmt: skip
        return [
            (
                self.conditional or self.n_labeled is None,
                "--n_labeled trains M2, which is conditional: drop --conditional False",
            ),
            (
                self.conditional or self.features is None,
                "--features trains on M1's features a conditional model: drop "
                "--conditional False (M1 itself is the --conditional False run)",
            ),
            (
                self.features is None or not feature_flags,
                f"--features: drop {', '.join(feature_flags)}: the features are M1's "
                "posterior on grey-level images, drawn afresh each batch, on one device",
            ),
        ]

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
    def steps_per_epoch(self) -> int:
        """Training steps per epoch: the last, short batch is padded, not dropped. With
        --n_labeled an epoch is a pass over the unlabelled images."""

        n_images = (self.n_train or N_TRAIN) - (self.n_labeled or 0)
        return utils.ceil_div(n_images, self.batch_size)

    @property
    def labelled_batch(self) -> int:
        """With --n_labeled, the labelled images per step (B_l): a quarter of the batch, at
        most all of them; 0 without."""
        return min(self.n_labeled, self.batch_size // 4) if self.n_labeled else 0

    @property
    def binarized(self) -> bool:
        """Whether training and evaluation resample binary pixels (`--binarize dynamic`)."""
        return self.binarize == "dynamic"

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
        if self.train_samples > 1:
            tags.append(f"k{self.train_samples}")
        if self.kl_weight != 1.0:
            tags.append(f"beta{self.kl_weight:g}")
        if self.n_labeled:
            tags.append(f"labels{self.n_labeled}")
        if not self.conditional:
            tags.append("vae")
        if self.features:
            tags.append("m1-features")
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default once, as the flag is typed: "(default: 500)", not
    "(default: (500,))". A flag whose default is None has no value to show: its help says
    what leaving it out does (such as "default: all")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        shown = action.default
        if isinstance(shown, tuple):
            shown = " ".join(map(str, shown))
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def build_parser(description: str = "", suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per Config field, its help line and default taken from the field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}
    for f in dataclasses.fields(Config):
        kwargs = dict(f.metadata)
        if f.name in TUPLE_FIELDS:
            kwargs["type"] = int
        kwargs.setdefault("type", hints.get(str(f.type)))
        default = argparse.SUPPRESS if suppress_defaults else f.default
        parser.add_argument(f"--{f.name}", default=default, **kwargs)
    return parser


def parse_flags(argv: Sequence[str]) -> Config:
    """Flags -> validated Config, without a run's saved config (main.parse_args merges
    --resume's); for scripts that make runs of their own, such as the benchmarks."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    for name in TUPLE_FIELDS:
        args[name] = tuple(args[name])
    try:
        return Config(**args)
    except ValueError as err:
        parser.error(str(err))
