"""Use a trained run: digits of the labels you choose, your own images restored, walks in z.

    python sample.py RUN --labels 3 7 --n 10     a row of prior samples per label
    python sample.py RUN --restore a.png b.png   your images, converted as MNIST's, restored
    python sample.py RUN --interpolate [A [B]]   between two test digits of label A (then B)
    python sample.py RUN --export                write RUN/export/, the SavedModel

RUN is a run folder (its latest checkpoint is read) or an export folder (RUN/export,
or a copy of one). With no action, a grid of every label. A plain VAE (--conditional
False) has no labels: its grid is --n samples, and label flags are refused.
Pictures go to RUN/samples/ (or --out), each under a new name: nothing is overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import utils
from data_utils import IMAGE_SIZE, N_CLASSES, N_PIXELS

SAMPLES_DIR = "samples"
EXPORT_DIR = utils.EXPORT_DIR
EXPORT_INFO = "model.json"  # export.INFO_FILE
MAX_N = 100  # Columns of a grid: a wider one is no longer a picture.
MAX_SEED = 2**32 - 1  # NumPy's seeding limit.

# Each picture draws from its own stream of --seed, so that it does not depend on the
# other pictures asked for in the same command.
PRIOR_STREAM, INTERPOLATE_STREAM = 1, 2

# How MNIST was made (LeCun et al.): the digit's bounding box scaled into 20 x 20
# keeping its aspect ratio, anti-aliased, then put in 28 x 28 with its centre of mass at
# the centre. The test split's centres of mass sit at (14.0, 14.0) in pixel-index
# coordinates, spread by 0.29 px, 1/sqrt(12): the spread of whole-pixel shifts.
MNIST_BOX, MNIST_CENTRE = 20, 14.0
# Fashion-MNIST (Xiao et al. 2017): the longest edge scaled to 28, the image centred by
# its bounding box; light on dark as MNIST (intensities negated).
FASHION_BOX = 28
INK = 0.2  # After the background is removed: the level that counts as the digit's.
MIN_CONTRAST = 0.1  # An image whose ink is fainter than this holds no digit to find.


# --- Flags (no TensorFlow) ------------------------------------------------------------


def _label(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a label is a number 0..9, got {text!r}") from None
    if not 0 <= value < N_CLASSES:
        raise argparse.ArgumentTypeError(f"a label is a number 0..9, got {value}")
    return value


def _label_or_all(text: str) -> int | str:
    return "all" if text.strip().lower() == "all" else _label(text)


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}..{high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description=__doc__,
        epilog="Exit codes: 0 done, 1 a bad run folder or image, 2 bad flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="a run folder, or an export folder (RUN/export)")
    parser.add_argument(
        "--labels", nargs="+", type=_label_or_all, metavar="LABEL",
        help="a grid of prior samples, one row per label (0..9, or 'all')",
    )  # fmt: skip
    parser.add_argument(
        "--n", type=_bounded_int(1, MAX_N), default=10,
        help="samples per label (a plain VAE's: samples, 10 a row); default 10",
    )  # fmt: skip
    parser.add_argument(
        "--restore", nargs="+", type=Path, metavar="IMAGE",
        help="image files (any size, grey or colour, either polarity) to restore, shown "
        "beside their conversion to the run's 28 x 28 format",
    )  # fmt: skip
    parser.add_argument(
        "--label", nargs="+", type=_label, metavar="LABEL",
        help="the label of each --restore image (one for all); default: the one the run's "
        "classifier picks (M2's q(y|x), else argmax_y log p(x|y) by importance weighting)",
    )  # fmt: skip
    parser.add_argument(
        "--interpolate", nargs="*", type=_label, metavar="LABEL",
        help="decode a straight line in z between two test digits of label A (default: "
        "drawn from --seed), and again with the label switched to B half-way",
    )  # fmt: skip
    parser.add_argument(
        "--steps",
        type=_bounded_int(2, MAX_N),
        default=10,
        help="points on the line in z; default 10",
    )
    parser.add_argument(
        "--seed", type=_bounded_int(0, MAX_SEED), default=0,
        help="seeds the latents and the test digits; default 0",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="folder of the pictures; default RUN/samples (made if needed)"
    )
    parser.add_argument(
        "--export", action="store_true",
        help="write RUN/export/ (the SavedModel) from the latest checkpoint, for a run that "
        "lacks it; an older export is kept as export.<its time>/",
    )  # fmt: skip
    return parser


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone; an error exits with code 2."""
    if args.labels and "all" in args.labels and len(args.labels) > 1:
        parser.error("--labels takes label numbers, or 'all' alone")
    if args.label is not None:
        if not args.restore:
            parser.error("--label gives the labels of --restore's images; add --restore")
        if len(args.label) not in (1, len(args.restore)):
            parser.error(
                f"--label takes one label for all images or one per image "
                f"({len(args.restore)}), got {len(args.label)}"
            )
    if args.interpolate is not None:
        if len(args.interpolate) > 2:
            parser.error("--interpolate takes at most two labels: A, then B half-way")
        if len(args.interpolate) == 2 and args.interpolate[0] == args.interpolate[1]:
            parser.error("--interpolate A B switches the label half-way: give two different")


# --- The run or export to read (no TensorFlow) ------------------------------------------


@dataclass(frozen=True)
class Target:
    """What RUN names: a run folder (its config.json) or an export (its model.json)."""

    folder: Path
    is_export: bool
    values: dict  # config.json's or model.json's
    conditional: bool
    dataset: str

    @property
    def default_out(self) -> Path:
        run_dir = self.folder.parent if self.is_export else self.folder
        return run_dir / SAMPLES_DIR


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise utils.UserError(f"cannot read {path} ({err})") from None
    if not isinstance(values, dict):
        raise utils.UserError(f"cannot read {path} (not a JSON object)")
    return values


def locate(folder: Path) -> Target:
    """The run folder or export that `folder` is, or a one-line refusal."""
    if not folder.is_dir():
        raise utils.UserError(f"{folder}: no such folder; give a run folder or its export/")
    if (folder / "saved_model.pb").exists():
        info = folder / EXPORT_INFO
        if not info.exists():
            raise utils.UserError(
                f"{folder}: a SavedModel without {EXPORT_INFO}; not this project's"
            )
        values = _read_json(info)
        conditional = bool(values.get("conditional", True))
        return Target(folder, True, values, conditional, values.get("dataset", "mnist"))
    if not (folder / utils.CONFIG_FILE).exists():
        raise utils.UserError(
            f"{folder}: not a run folder (no config.json) nor an export (no saved_model.pb)"
        )
    values = _read_json(folder / utils.CONFIG_FILE)
    if not (folder / utils.CHECKPOINTS_DIR / "checkpoint").exists():
        hint = ""
        if (folder / EXPORT_DIR / "saved_model.pb").exists():
            hint = f"; its export can be used: python sample.py {folder / EXPORT_DIR}"
        raise utils.UserError(
            f"{folder}: no checkpoint in {folder / utils.CHECKPOINTS_DIR} (the run stopped "
            f"before its first epoch ended){hint}"
        )
    return Target(
        folder, False, values, bool(values.get("conditional", True)),
        values.get("dataset", "mnist"),
    )  # fmt: skip


def check_flags_for(parser: argparse.ArgumentParser, args: argparse.Namespace, target: Target):
    """Flags that this run cannot take; an error exits with code 2."""
    if not target.conditional:
        given = [
            flag
            for flag, value in (
                ("--labels", args.labels), ("--label", args.label),
                ("--interpolate LABEL", args.interpolate),
            )
            if value
        ]  # fmt: skip
        if given:
            parser.error(
                f"{target.folder} is a plain VAE (--conditional False): it has no labels; "
                f"drop {', '.join(given)}"
            )
    if args.export and target.is_export:
        parser.error(f"--export writes a run folder's export; {target.folder} is one already")


# --- Your images, as MNIST's (OpenCV, no TensorFlow) -------------------------------------


def read_image(path: Path) -> np.ndarray:
    """An image file as grey levels (h, w) float32 in [0, 1]; transparency is shown over
    white, as a viewer shows it. A file OpenCV cannot read is a one-line UserError."""
    import cv2

    if not path.is_file():
        raise utils.UserError(f"--restore {path}: no such file")
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.size == 0:
        raise utils.UserError(
            f"--restore {path}: OpenCV cannot read it as an image (PNG, JPEG, BMP, TIFF, ...)"
        )
    if data.dtype == np.uint8 or data.dtype == np.uint16:
        image = data.astype(np.float32) / np.iinfo(data.dtype).max
    else:
        image = np.clip(np.nan_to_num(data.astype(np.float32)), 0.0, 1.0)
    if image.ndim == 3 and image.shape[2] in (2, 4):  # Grey or colour, then alpha.
        alpha = image[:, :, -1:]
        image = image[:, :, :-1] * alpha + (1.0 - alpha)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image.reshape(image.shape[:2]).astype(np.float32)


def as_mnist(grey: np.ndarray, dataset: str = "mnist", name: str = "the image") -> np.ndarray:
    """A grey image (h, w) in [0, 1] of any size -> a (784,) float32 image made as the
    dataset's were: light on dark (inverted if its border is light), the background
    removed and the ink stretched to 1, the bounding box scaled to fit MNIST's 20 x 20
    box keeping its aspect (Fashion-MNIST's 28), then placed in 28 x 28 with its centre
    of mass at the centre (Fashion-MNIST: its box centred)."""
    import cv2

    def border(image: np.ndarray) -> np.ndarray:
        return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])

    if np.median(border(grey)) > 0.5:  # Dark on light: make it MNIST's light on dark.
        grey = 1.0 - grey
    ink = np.clip(grey - np.median(border(grey)), 0.0, None)
    if ink.max() < MIN_CONTRAST:
        raise utils.UserError(f"--restore {name}: no digit found (the image is blank)")
    ink = ink / ink.max()
    rows, cols = np.nonzero(ink >= INK)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fashion = dataset == "fashion_mnist"
    box = FASHION_BOX if fashion else MNIST_BOX
    scale = box / max(crop.shape)
    height = min(box, max(1, round(crop.shape[0] * scale)))
    width = min(box, max(1, round(crop.shape[1] * scale)))
    # INTER_AREA averages the pixels each new one covers: the anti-aliasing of a shrink.
    method = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    digit = np.clip(cv2.resize(crop, (width, height), interpolation=method), 0.0, 1.0)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    top, left = (IMAGE_SIZE - height) // 2, (IMAGE_SIZE - width) // 2
    canvas[top : top + height, left : left + width] = digit
    if not fashion:  # Whole pixels, as MNIST's were shifted.
        moments = cv2.moments(canvas)
        shift_x = round(MNIST_CENTRE - moments["m10"] / moments["m00"])
        shift_y = round(MNIST_CENTRE - moments["m01"] / moments["m00"])
        shift = np.float32([[1, 0, shift_x], [0, 1, shift_y]])
        canvas = cv2.warpAffine(canvas, shift, canvas.shape[::-1], flags=cv2.INTER_NEAREST)
    return canvas.reshape(N_PIXELS)


def load_images(paths: Sequence[Path], dataset: str) -> np.ndarray:
    """The --restore images as the run's inputs, (n, 784) float32 in [0, 1]."""
    return np.stack([as_mnist(read_image(path), dataset, str(path)) for path in paths])


# --- The model, from a checkpoint or an export (TensorFlow from here on) ----------------


@dataclass
class Served:
    """The run's model as NumPy functions, dropout off; the export's signatures or the
    same functions (export.ServingModel) on the restored checkpoint."""

    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]  # images, labels -> z means
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]  # z, labels -> mean images
    classify: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None  # labels, p(y|x)
    n_z: int
    classifier: str | None  # What classify computes, in words.
    what: str  # Where the weights came from.


def _numpy_functions(encode, decode, classify) -> tuple[Callable, Callable, Callable | None]:
    import tensorflow as tf

    def to_labels(labels: np.ndarray) -> tf.Tensor:
        return tf.constant(np.asarray(labels, np.int32))

    def encode_np(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = encode(image=tf.constant(images, tf.float32), label=to_labels(labels))
        return out["mean"].numpy()

    def decode_np(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = decode(z=tf.constant(z, tf.float32), label=to_labels(labels))
        return out["probabilities"].numpy()

    def classify_np(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = classify(image=tf.constant(images, tf.float32))
        return out["label"].numpy(), out["probabilities"].numpy()

    return encode_np, decode_np, classify_np if classify is not None else None


def restore_run(run_dir: Path, values: dict):
    """(model, M1's FeatureSource or None, checkpoint path) of a run's latest checkpoint."""
    import tensorflow as tf

    import checkpoints
    import features
    from config import Config

    try:
        config = Config.from_json(values)
    except (TypeError, ValueError) as err:
        raise utils.UserError(
            f"{run_dir}: its config.json does not fit this code ({err})"
        ) from None
    checkpoints.check_model_fits_in_memory(config)
    source = None
    if config.features:
        recorded = values.get("features_source")
        if recorded is None:
            raise utils.UserError(f"{run_dir}: its config.json does not say which M1 it read")
        source = features.open_source(config, np.zeros((0, N_PIXELS), np.uint8), recorded)
    latest = tf.train.latest_checkpoint(str(run_dir / utils.CHECKPOINTS_DIR))
    if latest is None:
        raise utils.UserError(f"{run_dir}: no checkpoint in {run_dir / utils.CHECKPOINTS_DIR}")
    state = checkpoints.build_state(config, n_features=len(source.active) if source else None)
    checkpoints.restore_checkpoint(state.checkpoint, latest, f"sample.py {run_dir}")
    return state.model, source, latest


def serve_checkpoint(restored) -> Served:
    import export

    model, source, latest = restored
    module = export.ServingModel(model, source)
    classify = module.classify if model.conditional else None
    functions = _numpy_functions(module.encode, module.decode, classify)
    return Served(*functions, model.n_z, module.classifier, f"{latest}")


def serve_export(target: Target) -> Served:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(target.folder))
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise utils.UserError(f"{target.folder}: TensorFlow cannot load it ({err})") from None
    signatures = loaded.signatures
    functions = _numpy_functions(
        signatures["encode"], signatures["decode"], signatures.get("classify")
    )
    n_z = signatures["decode"].structured_input_signature[1]["z"].shape[1]
    return Served(*functions, n_z, target.values.get("classify"), f"{target.folder}")


# --- The pictures --------------------------------------------------------------------


def write_picture(out: Path, stem: str, images: np.ndarray, n_rows: int, n_cols: int) -> Path:
    """Tile images into a grid PNG under a new name in `out` (stem.png, stem_2.png, ...)."""
    import plot

    path = utils.create_fresh(out, stem, ".png", folder=False)
    try:
        plot.save_grid(path, images, n_rows, n_cols)
    except BaseException:
        path.unlink(missing_ok=True)  # The empty name just reserved.
        raise
    return path


def prior_grid(served: Served, labels: list[int] | None, n: int, seed: int) -> np.ndarray:
    """Mean images of z ~ N(0, I): (rows, cols, 784). A conditional model: one row per
    label, the same n latents in every row (a column is one style); a plain VAE
    (`labels` None): n latents, 10 a row, the last row padded with black."""
    rng = np.random.default_rng([seed, PRIOR_STREAM])
    z = rng.standard_normal((n, served.n_z)).astype(np.float32)
    if labels is None:
        images = served.decode(z, np.zeros(n, np.int32))
        n_cols = min(n, 10)
        n_rows = utils.ceil_div(n, n_cols)
        padded = np.zeros((n_rows * n_cols, N_PIXELS), np.float32)
        padded[:n] = images
        return padded.reshape(n_rows, n_cols, N_PIXELS)
    rows = np.repeat(np.asarray(labels, np.int32), n)
    images = served.decode(np.tile(z, (len(labels), 1)), rows)
    return images.reshape(len(labels), n, N_PIXELS)


def restore_images(
    served: Served, images: np.ndarray, given: list[int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(restored images (n, 784), the labels used (n,), p(y|x) of the picked labels or
    None if given). Restored: the mean image at the posterior mean of q(z|x, y)."""
    probabilities = None
    if given is not None:
        labels = np.asarray(given * len(images) if len(given) == 1 else given, np.int32)
    elif served.classify is not None:
        labels, p = served.classify(images)
        probabilities = p[np.arange(len(labels)), labels]
    else:  # A plain VAE: no label.
        labels = np.zeros(len(images), np.int32)
    restored = served.decode(served.encode(images, labels), labels)
    return restored, labels, probabilities


def interpolation(
    served: Served,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    conditional: bool,
    given: list[int],
    steps: int,
    seed: int,
) -> tuple[np.ndarray, int, int | None]:
    """Two test digits of one label A, and the mean images along the straight line
    between their posterior means: (rows, steps + 2, 784), each row starting and ending
    with the two digits; the second row switches the label to B at the line's half-way
    point (a conditional model only). Returns (grid, A, B)."""
    import data_utils

    rng = np.random.default_rng([seed, INTERPOLATE_STREAM])
    first = given[0] if given else int(rng.integers(N_CLASSES))
    if len(given) == 2:
        second = given[1]
    else:
        second = int(rng.choice([k for k in range(N_CLASSES) if k != first]))
    candidates = np.flatnonzero(test_labels == first)
    pair = rng.choice(candidates, 2, replace=False)
    x = data_utils.scale(test_images[pair])  # (2, 784), as the run read them
    z_ends = served.encode(x, np.array([first, first], np.int32))  # (2, n_z)
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    z = (1.0 - t) * z_ends[0] + t * z_ends[1]  # (steps, n_z)
    label_rows = [np.full(steps, first, np.int32)]
    if conditional:
        label_rows.append(np.where(np.arange(steps) < steps // 2, first, second).astype(np.int32))
    rows = [np.concatenate([x[:1], served.decode(z, labels), x[1:]]) for labels in label_rows]
    return np.stack(rows), first, second if conditional else None


def load_test_split(target: Target) -> tuple[np.ndarray, np.ndarray]:
    import data_utils

    data_dir = None if target.is_export else target.values.get("data_dir")
    try:
        splits = data_utils.load_dataset(target.dataset, data_dir)
    except data_utils.DataError as err:
        raise utils.UserError(f"--interpolate reads test digits: {err}") from None
    return splits.test_images, splits.test_labels


# --- The script ------------------------------------------------------------------------


def write_export(target: Target, restored) -> None:
    """`--export`: RUN/export/ from the latest checkpoint, the folder locked meanwhile."""
    import export
    import run_folder

    model, source, latest = restored
    existing = target.folder / EXPORT_DIR / EXPORT_INFO
    if existing.exists():
        try:
            checkpoint = json.loads(existing.read_text()).get("checkpoint")
        except (OSError, ValueError):
            checkpoint = None
        if checkpoint == Path(latest).name:
            print(f"{existing.parent} is up to date (from {checkpoint}); nothing written")
            return
    lock = run_folder.lock_run_folder(target.folder, "sample.py --export")
    try:
        path = export.write_export(target.folder, model, source, latest, target.dataset)
    finally:
        lock.release()
    names = "encode, decode" + (", classify" if model.conditional else "")
    print(f"wrote {path} (SavedModel of {Path(latest).name}: {names}; see {path / EXPORT_INFO})")


def draw(args: argparse.Namespace, target: Target, served: Served, images: np.ndarray | None):
    """Write each picture asked for, and say what it shows."""
    out = args.out or target.default_out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise utils.UserError(f"cannot make the folder {out} ({err.strerror})") from None
    if args.labels or not (args.restore or args.interpolate is not None):
        labels = None
        if target.conditional:
            labels = (
                list(range(N_CLASSES)) if not args.labels or "all" in args.labels else args.labels
            )
        grid = prior_grid(served, labels, args.n, args.seed)
        tag = "all" if labels == list(range(N_CLASSES)) else "-".join(map(str, labels or []))
        stem = f"prior_{tag}_seed{args.seed}" if labels else f"prior_seed{args.seed}"
        path = write_picture(out, stem, grid.reshape(-1, N_PIXELS), *grid.shape[:2])
        if labels:
            rows = f"rows: labels {', '.join(map(str, labels))}; columns: {args.n} draws of z"
        else:
            rows = f"{args.n} draws of z"
        print(f"wrote {path} ({rows} from N(0, I), decoded to mean images)")
    if args.restore:
        restored, labels, probabilities = restore_images(served, images, args.label)
        pairs = np.stack([images, restored], axis=1).reshape(-1, N_PIXELS)
        path = write_picture(out, "restored", pairs, len(images), 2)
        print(f"wrote {path} (each row: your image as the model reads it | restored)")
        for i, name in enumerate(args.restore):
            if not target.conditional:
                how = "a plain VAE: no label"
            elif probabilities is None:
                how = f"label {labels[i]}, given"
            else:
                how = f"label {labels[i]}, p = {probabilities[i]:.2f} by {served.classifier}"
            print(f"  {name}: {how}")
    if args.interpolate is not None:
        test_images, test_labels = load_test_split(target)
        grid, first, second = interpolation(
            served, test_images, test_labels, target.conditional, args.interpolate,
            args.steps, args.seed,
        )  # fmt: skip
        stem = f"interpolate_{first}-{second}" if second is not None else "interpolate"
        path = write_picture(
            out, f"{stem}_seed{args.seed}", grid.reshape(-1, N_PIXELS), *grid.shape[:2]
        )
        switch = f"; row 2: label {second} from the half-way point" if second is not None else ""
        print(
            f"wrote {path} (two test digits of label {first} at the ends, {args.steps} steps "
            f"between their posterior means{switch})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code (argparse exits with 2 on bad flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    try:
        target = locate(args.run)
        check_flags_for(parser, args, target)
        images = load_images(args.restore, target.dataset) if args.restore else None
        restored = None if target.is_export else restore_run(target.folder, target.values)
        if args.export:
            write_export(target, restored)
            if not (args.labels or args.restore or args.interpolate is not None):
                return 0  # Only the export was asked for.
        served = serve_export(target) if target.is_export else serve_checkpoint(restored)
        print(f"model: {served.what}")
        draw(args, target, served, images)
    except utils.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # A write refused: no space, no permission.
        print(f"error: cannot write {err.filename or 'a file'}: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; what was written is whole.", file=sys.stderr)
        return utils.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
