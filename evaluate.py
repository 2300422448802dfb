"""Held-out evaluation: the validation bound, the test metrics and their table.

Every held-out pass draws its noise, binarisation and ε from fixed seeds
(`seeded_batches`), so that epochs and runs compare. The test metrics of a
trained model (`compute_test_metrics`) are the keys of metrics.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

import cvae
import data_utils
import draws
import utils

if TYPE_CHECKING:
    from config import Config


def _eval_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A held-out batch's seed -> (seed of its binarisation and noise, seed of ε)."""
    return tuple(tf.unstack(draws.split_seed(seed, 2)))


def make_eval_step(model: cvae.CVAE, add_noise: bool, binarized: bool) -> Callable[..., dict]:
    """Compiled evaluation of the training objective with dropout off.

    (images (B, D), int labels (B,), seed (2,)) -> per-example terms (B,), and
    for a model with q(y|x) (M2) "q_error", 100 per misclassified image. A
    fixed seed makes the noise, binarisation and ε the same at every call, so
    validation numbers of different epochs are comparable.
    """

    @tf.function
    def eval_step(x: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        seed_batch, seed_model = _eval_seeds(seed)
        x = draws.scale_in_graph(x)  # uint8 pixels or float32.
        x_input, target = draws.prepare_batch(x, seed_batch, add_noise, binarized)
        terms = cvae.negative_elbo(model, x_input, target, draws.one_hot(labels), seed_model)
        if model.has_classifier:  # M2: also q(y|x)'s error on what it sees in training.
            terms["q_error"] = cvae.q_error(model, x_input, labels)
        return terms

    return eval_step


def seeded_batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[slice, tf.Tensor]]:
    """The rows of each batch of a held-out split, and its seed: batch i draws from (seed, i).

    Every held-out pass cuts its split this way, so that a batch's random draws
    depend on the seed, the batch size and the batch's place only, never on what
    ran before.
    """
    for i, start in enumerate(range(0, n, batch_size)):
        yield slice(start, start + batch_size), tf.constant([seed, i], dtype=tf.int64)


def heldout_elbo(
    eval_step: Callable[..., dict],
    x: tf.Tensor,
    labels: tf.Tensor,
    seed: int,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean −ELBO, reconstruction and KL over a whole split (nats per image).

    The batches draw as `seeded_batches` says: the result depends on the seed
    and the batch size only.
    """
    totals: dict[str, float] = {}
    n = int(x.shape[0])
    for rows, batch_seed in seeded_batches(n, batch_size, seed):
        terms = eval_step(x[rows], labels[rows], batch_seed)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(tf.reduce_sum(value))
    return {name: total / n for name, total in totals.items()}


# Rows (images × labels × samples) decoded at once by the importance-weighted
# estimator: bounds its memory whatever K is, and is large enough to keep the
# matmuls efficient (benchmarks/README.md).
IW_MAX_ROWS = 2_000


def make_iw_step(
    model: cvae.CVAE, n_samples: int, images_per_batch: int
) -> Callable[..., tf.Tensor]:
    """Compiled log p(x|y) for every label y, by importance weighting.

    (encoder inputs (B, D), images x (B, D), seed (2,)) -> log p(x|y), (B, C); the
    images as uint8 pixels or float32.
    The proposal is the encoder's q(z|input, y): the image x itself, or for a
    denoising model also its noised version; any proposal gives a valid bound
    on the same log p(x|y). Every (image, label) pair gets its own K samples;
    the sample chunk keeps each decoder call within IW_MAX_ROWS rows. A plain VAE
    (no label) gives one column, log p(x).
    """
    n_classes = data_utils.N_CLASSES if model.conditional else 1
    chunk_size = max(1, IW_MAX_ROWS // (images_per_batch * n_classes))

    @tf.function
    def iw_step(x_input: tf.Tensor, x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        x_input, x = draws.scale_in_graph(x_input), draws.scale_in_graph(x)
        n_images = tf.shape(x)[0]
        # Pair every image with every label: row i*C + c is image i, label c.
        y = draws.one_hot(tf.tile(tf.range(n_classes), [n_images]))  # (B*C, C)
        x_rows = tf.repeat(x, n_classes, axis=0)  # (B*C, D)
        mean, std = model.encode(tf.repeat(x_input, n_classes, axis=0), y)

        def log_likelihood(z: tf.Tensor) -> tf.Tensor:
            n_draws = tf.shape(z)[0]
            decoded = model.decode(tf.reshape(z, [-1, model.n_z]), tf.tile(y, [n_draws, 1]))
            log_px = model.log_likelihood(tf.tile(x_rows, [n_draws, 1]), decoded)
            return tf.reshape(log_px, [n_draws, -1])  # (S, B*C)

        log_px_y = cvae.iw_log_likelihood(log_likelihood, mean, std, n_samples, seed, chunk_size)
        return tf.reshape(log_px_y, [n_images, n_classes])

    return iw_step


# In a log file, the importance-weighted pass (minutes, for the default run) says how far
# it is at most this often.
PROGRESS_SECONDS = 60.0


def iw_log_likelihoods(
    model: cvae.CVAE,
    x: tf.Tensor,
    n_samples: int,
    seed: int,
    images_per_batch: int = 100,
    verbose: bool = True,
    x_input: tf.Tensor | None = None,
) -> tf.Tensor:
    """log p(x|y) for every image and every label, (N, C), with a progress bar (on a
    terminal; in a file, a line a minute).

    The encoder sees `x_input` (default: x itself). The batches draw as
    `seeded_batches` says: an image's estimates depend only on its batch,
    never on what ran before.
    """
    x_input = x if x_input is None else x_input
    iw_step = make_iw_step(model, n_samples, images_per_batch)
    n = int(x.shape[0])
    n_batches = utils.ceil_div(n, images_per_batch)
    progress = (
        utils.Progress(n_batches, "batch", "importance-weighted pass", every=PROGRESS_SECONDS)
        if verbose
        else None
    )
    parts = []
    for done, (rows, batch_seed) in enumerate(seeded_batches(n, images_per_batch, seed), 1):
        parts.append(iw_step(x_input[rows], x[rows], batch_seed))
        if progress is not None:
            progress.update(done)
    return tf.concat(parts, axis=0)


def prepare_heldout(
    x: tf.Tensor, seed: int, add_noise: bool, binarized: bool, batch_size: int = 1000
) -> tuple[tf.Tensor, tf.Tensor]:
    """A held-out split's (encoder inputs, targets), drawn once from a fixed seed.

    The same draws as `heldout_elbo` with `make_eval_step` at the same seed and
    batch size. The binarisation does not depend on `add_noise`, so the
    targets are also those of an eval step without noise: the test −ELBO
    (computed without noise) and the importance-weighted metrics score the same
    binary images. Only the denoising metrics use the noised inputs.

    x as uint8 pixels gives uint8 results (`draws.to_pixels`, exact): the test
    split's two copies then take a quarter of the memory at the evaluation's peak.
    """
    pixels = x.dtype == tf.uint8
    inputs, targets = [], []
    for rows, batch_seed in seeded_batches(int(x.shape[0]), batch_size, seed):
        seed_batch, _ = _eval_seeds(batch_seed)
        batch = draws.scale_in_graph(x[rows])
        x_input, target = draws.prepare_batch(batch, seed_batch, add_noise, binarized)
        if pixels:
            x_input, target = draws.to_pixels(x_input), draws.to_pixels(target)
        inputs.append(x_input)
        targets.append(target)
    return tf.concat(inputs, 0), tf.concat(targets, 0)


def reconstruct(
    model: cvae.CVAE, x_input: tf.Tensor, labels: tf.Tensor, batch_size: int = 1000
) -> tf.Tensor:
    """The mean image decoded at the posterior mean of q(z|x_input, y): (N, D) in (0, 1).

    For a denoising run, with the noised image as x_input, this is its restoration.
    x_input as uint8 pixels or float32.
    """
    parts = []
    for start in range(0, int(x_input.shape[0]), batch_size):
        x = draws.scale_in_graph(x_input[start : start + batch_size])
        y = labels[start : start + batch_size]
        parts.append(cvae.mean_image(model, cvae.posterior_mean(model, x, y), y))
    return tf.concat(parts, 0)


# Fixed seeds, combined with --seed where a run's own draws are meant. The
# held-out splits draw from seeds of their own, so that every epoch and every
# run sees the same noise, binarisation and ε there and their numbers compare.
VALID_SEED = 1_000_003


TEST_SEED = 2_000_003


IW_SEED = 3_000_017  # The importance samples of the test evaluation.


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
    tensors are converted a chunk at a time too (whole-split `.numpy()` copies would
    add to the run's memory peak), uint8 pixels scaled then.
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
    from the encoder given `x_input`. A plain VAE has −log p(x) only."""
    if not model.conditional:
        print(f"Importance-weighted log p(x), K={n_samples}, {len(labels)} images")
        log_px = iw_log_likelihoods(model, target, n_samples, IW_SEED, x_input=x_input)
        return {
            "test_nll_x_given_y": None,
            "test_nll_x": -float(tf.reduce_mean(log_px)),
            "test_classifier_error": None,
        }
    print(f"Importance-weighted log p(x|y), K={n_samples}, {len(labels)} images x 10 labels")
    log_px_y = iw_log_likelihoods(model, target, n_samples, IW_SEED, x_input=x_input)
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

    `heldout` is `prepare_heldout` of x at TEST_SEED: (encoder inputs,
    targets), the inputs noised with --add_noise; the targets do not depend on
    the noise, so one draw serves both encoder inputs.
    """
    eval_step = make_eval_step(model, add_noise=noised_input, binarized=config.binarized)
    elbo = heldout_elbo(eval_step, x, labels, TEST_SEED)
    metrics = {f"test_{k}": v for k, v in elbo.items()}
    metrics.update(dict.fromkeys(("test_nll_x_given_y", "test_nll_x", "test_classifier_error")))
    if config.iw_samples:
        x_input, target = heldout
        encoder_input = x_input if noised_input else target
        metrics.update(iw_metrics(model, encoder_input, target, labels, config.iw_samples))
    return metrics


def _bound(metrics: dict) -> float:
    """The bound that says which encoder input is tighter: IW if computed (of −log p(x)
    for a plain VAE), else the −ELBO."""
    bounds = (metrics["test_nll_x_given_y"], metrics["test_nll_x"], metrics["test_loss"])
    return next(value for value in bounds if value is not None)


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
    # uint8 pixels, and so the copies prepare_heldout draws: a quarter of float32's
    # memory at the run's peak (the importance-weighted pass).
    x = tf.constant(splits.test_images[:n].reshape(n, -1))
    labels = tf.constant(splits.test_labels[:n])
    heldout = prepare_heldout(x, TEST_SEED, config.add_noise, config.binarized)
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
        restored = reconstruct(model, x_input, labels)
        metrics.update(denoising_metrics(target, x_input, restored))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    print(format_metrics(metrics, config.binarize, features=config.features is not None))
    return metrics


GREY_LEVEL_NOTE = (
    "(grey-level targets, --binarize none: these 'likelihoods' are cross-entropies, "
    "not comparable with the literature; --binarize dynamic gives true ones)"
)


FEATURES_NOTE = (
    "(likelihoods of M1's features under a Gaussian density, not of pixels: not "
    "comparable with the pixel models')"
)


def format_metrics(metrics: dict, binarize: str, features: bool = False) -> str:
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
    if metrics["test_nll_x"] is not None and metrics["test_nll_x_given_y"] is None:
        # A plain VAE: no label, so neither p(x|y) nor a generative classifier.
        rows = [
            row for row in rows if row[1] not in ("test_nll_x_given_y", "test_classifier_error")
        ]
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
    if features:
        lines.append(f"  {FEATURES_NOTE}")
    elif binarize == "none":
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
    rows = utils.read_csv(run_dir / utils.METRICS_CSV)
    return round(sum(float(row["seconds"]) for row in rows), 1)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Write metrics.json; a previous one is kept as metrics.<its time>.json, never lost."""
    path = run_dir / utils.METRICS_JSON
    if path.exists():
        kept = utils.reserve_aside(path)
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
