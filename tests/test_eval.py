"""Evaluation: the importance-weighted estimator against a closed form and, on the
CVAE, against its ELBO; the image × label pairing and the generative classifier on
a stand-in model with known likelihoods; the label marginal, the denoising
measures, and `--eval_only` on the shared tiny run, recomputed from its model."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    binary_test_batch,
    encoder_outputs,
    monte_carlo_recon,
    numpy_kl,
    restore_run_model,
)

import cvae
import data_utils
import draws
import evaluate
import main
from config import Config

# --- A linear-Gaussian model, where log p(x) and the ELBO are known exactly ---
# p(z) = N(0, I_2), p(x|z) = N(W z + b, σ² I_5), so p(x) = N(b, W Wᵀ + σ² I).

Z_DIM, X_DIM, SIGMA = 2, 5, 0.4


class LinearGaussian:
    def __init__(self, seed: int = 0, n_points: int = 4):
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(X_DIM, Z_DIM))
        self.b = rng.normal(size=X_DIM)
        z = rng.normal(size=(n_points, Z_DIM))
        self.x = z @ self.w.T + self.b + SIGMA * rng.normal(size=(n_points, X_DIM))
        # The exact posterior is a correlated Gaussian; the proposal is diagonal,
        # shifted and too wide, so that the bound is loose and K matters.
        cov = np.linalg.inv(np.eye(Z_DIM) + self.w.T @ self.w / SIGMA**2)
        post_mean = (self.x - self.b) @ self.w @ cov / SIGMA**2
        post_std = np.sqrt(np.diag(cov))
        self.q_mean = post_mean + 0.5 * post_std
        self.q_std = np.tile(1.3 * post_std, (n_points, 1))

    def log_px(self) -> np.ndarray:
        cov = self.w @ self.w.T + SIGMA**2 * np.eye(X_DIM)
        d = self.x - self.b
        maha = np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
        return -0.5 * (X_DIM * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + maha)

    def elbo(self) -> np.ndarray:
        """E_q[log p(x|z)] − KL(q ‖ p(z)), both in closed form."""
        m, s = self.q_mean, self.q_std
        resid = self.x - m @ self.w.T - self.b
        spread = (s**2) @ (self.w**2).T  # E‖W(z − m)‖² per coordinate
        expected_ll = -0.5 * X_DIM * math.log(2 * math.pi * SIGMA**2) - np.sum(
            resid**2 + spread, axis=1
        ) / (2 * SIGMA**2)
        kl = 0.5 * np.sum(m**2 + s**2 - 2 * np.log(s) - 1, axis=1)
        return expected_ll - kl

    def log_likelihood_fn(self, x: np.ndarray):
        """z (S, B, Z) -> log p(x|z) (S, B), for the estimator."""
        w, b, x = tf.constant(self.w), tf.constant(self.b), tf.constant(x)

        def log_likelihood(z: tf.Tensor) -> tf.Tensor:
            mean = tf.einsum("sbz,dz->sbd", z, w) + b
            const = X_DIM * math.log(2 * math.pi * SIGMA**2)
            return -0.5 * (const + tf.reduce_sum(tf.square(x - mean), -1) / SIGMA**2)

        return log_likelihood


def replicated_estimates(model: LinearGaussian, k: int, replicates: int, seed: int) -> np.ndarray:
    """IW estimates with K=k, `replicates` independent ones per point: (replicates, points)."""
    reps = lambda a: np.tile(a, (replicates, 1))  # noqa: E731
    estimate = cvae.iw_log_likelihood(
        model.log_likelihood_fn(reps(model.x)),
        tf.constant(reps(model.q_mean)),
        tf.constant(reps(model.q_std)),
        n_samples=k,
        seed=tf.constant([seed, 0], tf.int64),
    )
    return estimate.numpy().reshape(replicates, len(model.x))


def test_iw_estimate_converges_to_exact_log_likelihood():
    model = LinearGaussian()

    # Compiled, as in the evaluation, with a chunk that does not divide K (71 chunks of
    # 70 and one of 30). A chunk's samples are traced one op each: a small chunk keeps
    # the graph, and its tracing, small.
    @tf.function
    def estimate(seed):
        return cvae.iw_log_likelihood(
            model.log_likelihood_fn(model.x),
            tf.constant(model.q_mean),
            tf.constant(model.q_std),
            n_samples=5000,
            seed=seed,
            chunk_size=70,
        )

    exact = model.log_px()
    assert np.all(model.elbo() < exact - 0.1)  # The proposal is far enough off to matter.
    np.testing.assert_allclose(estimate(tf.constant([1, 2], tf.int64)).numpy(), exact, atol=0.05)


def test_iw_estimate_does_not_depend_on_the_chunk_size():
    # The chunk size bounds memory (evaluate.IW_MAX_ROWS); the draws are the samples'.
    model = LinearGaussian()
    estimates = [
        cvae.iw_log_likelihood(
            model.log_likelihood_fn(model.x),
            tf.constant(model.q_mean),
            tf.constant(model.q_std),
            n_samples=12,
            seed=tf.constant([4, 2], tf.int64),
            chunk_size=chunk_size,
        ).numpy()
        for chunk_size in (1, 5, 12)
    ]
    for other in estimates[1:]:
        np.testing.assert_allclose(other, estimates[0], rtol=1e-6)


def test_iw_with_one_sample_is_the_elbo_in_expectation():
    model = LinearGaussian()
    samples = replicated_estimates(model, k=1, replicates=20_000, seed=3)
    standard_error = samples.std(axis=0) / math.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(axis=0) - model.elbo()) < 4 * standard_error)


def test_iw_never_exceeds_log_likelihood_on_average_and_tightens_with_k():
    model = LinearGaussian()
    exact = model.log_px()
    means = []
    for k in (1, 10, 100):
        samples = replicated_estimates(model, k=k, replicates=2_000, seed=k)
        standard_error = samples.std(axis=0) / math.sqrt(len(samples))
        assert np.all(samples.mean(axis=0) < exact + 3 * standard_error), k
        means.append(samples.mean(axis=0))
    assert np.all(means[0] < means[1]) and np.all(means[1] < means[2])


def test_iw_rejects_zero_samples():
    model = LinearGaussian()
    with pytest.raises(ValueError, match="n_samples"):
        cvae.iw_log_likelihood(
            model.log_likelihood_fn(model.x), model.q_mean, model.q_std, 0, tf.constant([0, 0])
        )


def test_log_marginal_over_labels_matches_direct_sum():
    p_x_given_y = np.arange(1, 11) * 1e-30  # Σ = 55e-30, so p(x) = 5.5e-30.
    log_p = np.stack([np.log(p_x_given_y), np.full(10, -1000.0)])  # exp(-1000) underflows.
    result = cvae.log_marginal_over_labels(tf.constant(log_p)).numpy()
    np.testing.assert_allclose(result, [math.log(5.5e-30), -1000.0], rtol=1e-12)


# --- The CVAE's importance-weighted step and the generative classifier ---


def test_iw_with_one_sample_is_the_cvae_elbo_in_expectation(splits):
    """make_iw_step at K = 1: each (image, label) estimate is log p(x|z,y) + log p(z) −
    log q(z|x,y) at one z ~ q, whose mean is the ELBO −(E_q[−log p(x|z,y)] + KL), the
    first term estimated independently in NumPy, for every label."""
    model = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), seed=0)
    # As after training, q depends on the label (its 10 input weights, of the 794,
    # ×20: as large as the image's), and std ≈ 0.3 = softplus(−1.05), narrower than at
    # initialisation: a lost log q term (its log std) would move an estimate 1.8 nats.
    kernel = model.enc_hidden1.kernel.numpy()
    kernel[data_utils.N_PIXELS :] *= 20.0
    model.enc_hidden1.kernel.assign(kernel)
    bias = model.enc_out.bias.numpy()
    bias[model.n_z :] = -1.05
    model.enc_out.bias.assign(bias)
    x, _, _ = binary_test_batch(splits, 4)
    # The encoder sees the images noised (a denoising run's other proposal).
    x_input = draws.salt_and_pepper(tf.constant(x), tf.constant([0, 9])).numpy()
    # 250 estimates per pair: 5 seeds, 50 copies of the images each (every
    # (image, label) row draws its own z).
    copies, seeds = 50, 5
    iw_step = evaluate.make_iw_step(model, n_samples=1, images_per_batch=copies * len(x))
    tiled_input, tiled = (tf.constant(np.tile(a, (copies, 1))) for a in (x_input, x))
    estimates = np.concatenate(
        [iw_step(tiled_input, tiled, tf.constant([s, 5], tf.int64)).numpy() for s in range(seeds)]
    ).reshape(copies * seeds, len(x), 10)
    iw_mean = estimates.mean(axis=0)
    iw_se = estimates.std(axis=0, ddof=1) / math.sqrt(len(estimates))
    elbo, elbo_se = np.zeros_like(iw_mean), np.zeros_like(iw_mean)
    for label in range(10):
        y = np.eye(10, dtype=np.float32)[np.full(len(x), label)]
        recon, elbo_se[:, label] = monte_carlo_recon(model, x, y, 250, label, x_input=x_input)
        elbo[:, label] = -(recon + numpy_kl(*encoder_outputs(model, x_input, y)))
    # Statistical: 4 standard errors of the difference of independent means (fixed
    # seeds), for each of the 40 pairs (SE 0.2 to 3.4 nats), and for their mean (SE
    # 0.27 nats; the log std a lost log q term would add is −1.7 nats on average).
    se = np.sqrt(iw_se**2 + elbo_se**2)
    np.testing.assert_array_less(np.abs(iw_mean - elbo), 4 * se)
    pooled_se = np.sqrt(np.sum(se**2)) / se.size
    assert abs(np.mean(iw_mean - elbo)) < 4 * pooled_se


class TemplateModel:
    """A stand-in for cvae.CVAE whose log p(x|y) is known in closed form.

    The decoder ignores z and returns label y's template of logits, and
    q(z|x,y) is the prior N(0, I): every importance weight is then exactly
    p(x|y), and the estimate is exact for any K. Labels 8 and 9 share one
    template, so that their likelihoods tie exactly and log p(x) differs from
    the best label's log p(x|y) − log 10 (by log 2 for images of 8 or 9).
    """

    n_z = 2
    conditional = True  # Its decoder reads the label, as cvae.CVAE's does by default.

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.templates = 2.0 * rng.normal(size=(data_utils.N_CLASSES, data_utils.N_PIXELS))
        self.templates[9] = self.templates[8]

    def encode(self, x, labels, training=False, seed=None):
        shape = tf.stack([tf.shape(x)[0], self.n_z])
        return tf.zeros(shape), tf.ones(shape)

    def decode(self, z, labels, training=False, seed=None):
        return tf.matmul(labels, tf.constant(self.templates, tf.float32))

    def log_likelihood(self, x, decoded):
        return cvae.bernoulli_log_likelihood(x, decoded)  # As cvae.CVAE's pixel model.

    def sample(self, labels: np.ndarray, seed: int) -> np.ndarray:
        """Binary images drawn from p(x|y) for the labels."""
        p = 1.0 / (1.0 + np.exp(-self.templates[labels]))
        return (np.random.default_rng(seed).uniform(size=p.shape) < p).astype(np.float32)

    def log_px_given_y(self, x: np.ndarray) -> np.ndarray:
        """Exact log p(x|y) of every image (rows) for every label (columns), float64."""
        log_p, log_not_p = -np.logaddexp(0, -self.templates), -np.logaddexp(0, self.templates)
        x = x.astype(np.float64)
        return x @ log_p.T + (1.0 - x) @ log_not_p.T


# Images drawn from these labels' templates (the 9 from 8's template too).
DRAWN = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 3])


def test_iw_step_pairs_every_image_with_every_label():
    model = TemplateModel()
    x = model.sample(DRAWN, seed=1)
    x_input = 1.0 - x  # What the encoder sees must not be what is scored.
    exact = model.log_px_given_y(x)  # (12, 10)
    # K = 5 in chunks of 2, 2 and 1 (IW_MAX_ROWS // (100 images · 10 labels) = 2).
    iw_step = evaluate.make_iw_step(model, n_samples=5, images_per_batch=100)
    estimate = iw_step(tf.constant(x_input), tf.constant(x), tf.constant([3, 4], tf.int64))
    estimate = estimate.numpy()
    assert estimate.shape == (12, 10)  # Images by labels, not labels by images.
    # float32 sums of 784 same-sign terms (340 to 900 nats): rounding errors add up
    # like a random walk, √784·6e-8 ≈ 2e-6 relative (1.7e-7 seen); 1e-5 is < 0.01 nats.
    np.testing.assert_allclose(estimate, exact, rtol=1e-5)
    # The same through iw_log_likelihoods, in two batches of 6 images.
    estimate = evaluate.iw_log_likelihoods(
        model, tf.constant(x), 3, seed=7, images_per_batch=6, verbose=False,
        x_input=tf.constant(x_input),
    )  # fmt: skip
    np.testing.assert_allclose(estimate.numpy(), exact, rtol=1e-5)
    # Power: each image's own template beats every other label (but the tie of 8 and
    # 9) by over 100 nats, so any other pairing (axes swapped, labels or images shifted
    # by one) moves an entry by 10⁴ times the tolerance.
    for image, label in enumerate(DRAWN):
        others = [c for c in range(10) if c != label and not {c, label} <= {8, 9}]
        assert exact[image, label] - exact[image, others].max() > 100


def test_generative_classifier_on_a_model_with_known_likelihoods():
    model = TemplateModel()
    x = model.sample(DRAWN, seed=1)
    exact = model.log_px_given_y(x)
    # Known answer: each image's own template wins by tens of nats, and the 9
    # (a tie of 8 and 9) goes to the lower label, as cvae.classify promises.
    predicted = np.where(DRAWN == 9, 8, DRAWN)
    np.testing.assert_array_equal(cvae.classify(tf.constant(exact)).numpy(), predicted)
    # Three images are wrongly classified: two mislabelled, and the 9: error 3/12.
    labels = DRAWN.copy()
    labels[1], labels[4] = 2, 5
    own = exact[np.arange(len(labels)), labels]
    marginal = np.logaddexp.reduce(exact, axis=1) - math.log(10)
    np.testing.assert_array_equal(
        cvae.log_likelihood_of_labels(tf.constant(exact), tf.constant(labels)).numpy(), own
    )
    np.testing.assert_allclose(
        cvae.log_marginal_over_labels(tf.constant(exact)).numpy(), marginal, rtol=1e-12
    )
    # The same through the evaluation's metrics, with estimates of the model.
    metrics = evaluate.iw_metrics(
        model, tf.constant(1.0 - x), tf.constant(x), tf.constant(labels), n_samples=3
    )
    assert metrics["test_classifier_error"] == 25.0
    # The estimates are exact to float32 rounding (see the test above): rel 1e-5.
    assert metrics["test_nll_x_given_y"] == pytest.approx(-own.mean(), rel=1e-5)
    assert metrics["test_nll_x"] == pytest.approx(-marginal.mean(), rel=1e-5)
    # Power: −log p(x|y) and −log p(x) are 83 nats apart, and log p(x) is 0.17 nats
    # (50 times the tolerance, 1e-5 of 363 nats) above max_y log p(x|y) − log 10,
    # thanks to the tie of 8 and 9: a max in place of the log-sum-exp fails.
    assert abs((exact.max(axis=1) - math.log(10)).mean() - marginal.mean()) > 0.1


# --- Denoising measures ---


def test_psnr_hand_computed():
    reference = np.zeros((2, 4))
    estimate = np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # MSE 0.25/4 = 1/16 -> 10 log10(16) dB; a perfect copy hits the 1e-10 MSE floor.
    np.testing.assert_allclose(evaluate.psnr(reference, estimate), [10 * math.log10(16), 100.0])
    assert evaluate.psnr(reference[:1], estimate[:1] * 255, peak=255.0)[0] == pytest.approx(
        10 * math.log10(16)
    )


def test_binary_cross_entropy_hand_computed():
    target = np.array([[1.0, 0.0], [1.0, 1.0]])
    prob = np.array([[0.5, 0.25], [0.0, 1.0]])
    expected = [
        (math.log(2) + math.log(4 / 3)) / 2,
        -math.log(evaluate.BCE_EPS) / 2,  # A hard 0 where the truth is 1 costs −log eps.
    ]
    np.testing.assert_allclose(evaluate.binary_cross_entropy(target, prob), expected, rtol=1e-6)


def test_median_filter_on_a_known_image():
    image = np.zeros((28, 28), np.float32)
    image[3, 3] = 1.0  # Isolated salt: removed.
    image[10:15, 10:15] = 1.0  # A 5×5 square: only its corners (4 of 9 on) go.
    image[12, 12] = 0.0  # Pepper inside the square: filled.
    expected = np.zeros_like(image)
    expected[10:15, 10:15] = 1.0
    for row, col in ((10, 10), (10, 14), (14, 10), (14, 14)):
        expected[row, col] = 0.0
    filtered = evaluate.median_filter(image.reshape(1, -1))
    np.testing.assert_array_equal(filtered.reshape(28, 28), expected)


def test_denoising_metrics_rank_a_perfect_restoration_first():
    rng = np.random.default_rng(0)
    clean = (rng.uniform(size=(5, 784)) < 0.2).astype(np.float32)
    noised = np.where(rng.uniform(size=clean.shape) < 0.3, 1.0 - clean, clean)
    metrics = evaluate.denoising_metrics(clean, noised, restored=clean)
    assert metrics["denoise_psnr_cvae"] == 100.0
    assert metrics["denoise_psnr_noised"] == pytest.approx(10 * math.log10(1 / 0.3), abs=0.3)
    assert metrics["denoise_bce_cvae"] < metrics["denoise_bce_noised"]


def test_denoising_metrics_do_not_depend_on_the_chunk():
    rng = np.random.default_rng(1)
    clean = rng.uniform(size=(25, 784)).astype(np.float32)
    noised = rng.uniform(size=clean.shape).astype(np.float32)
    restored = rng.uniform(size=clean.shape).astype(np.float32)
    whole = evaluate.denoising_metrics(clean, noised, restored, chunk=25)
    for chunk in (1, 7, 10):
        parts = evaluate.denoising_metrics(clean, noised, restored, chunk=chunk)
        assert parts.keys() == whole.keys()
        for key, value in whole.items():
            assert parts[key] == pytest.approx(value, rel=1e-12)


def test_denoising_metrics_of_tensors_are_those_of_their_arrays():
    # compute_test_metrics passes the test split's tensors, converted a chunk at a time.
    rng = np.random.default_rng(2)
    arrays = [rng.uniform(size=(25, 784)).astype(np.float32) for _ in range(3)]
    expected = evaluate.denoising_metrics(*arrays, chunk=10)
    assert evaluate.denoising_metrics(*map(tf.constant, arrays), chunk=10) == expected


# --- The CVAE's held-out inputs ---


def test_evaluation_is_deterministic_for_a_seed(splits):
    model = cvae.CVAE(n_z=2, n_hidden=(32, 32, 32, 32))
    step = evaluate.make_eval_step(model, add_noise=True, binarized=True)
    x, y = (
        tf.constant(data_utils.scale(splits.valid_images[:250])),
        tf.constant(splits.valid_labels[:250]),
    )
    first = evaluate.heldout_elbo(step, x, y, seed=11, batch_size=100)
    again = evaluate.heldout_elbo(step, x, y, seed=11, batch_size=100)
    other = evaluate.heldout_elbo(step, x, y, seed=12, batch_size=100)
    assert first == again
    assert first["loss"] != other["loss"]
    # The mean over all 250 images (not of the three batches' means, 100, 100 and 50
    # images): the KL in closed form of the encoder's outputs for the same noised and
    # binarised inputs (prepare_heldout draws what heldout_elbo draws). float32
    # against float64, summed in float64: rtol 1e-5 as test_kl_matches_numpy_closed_form.
    x_input, _ = evaluate.prepare_heldout(x, 11, add_noise=True, binarized=True, batch_size=100)
    kl = numpy_kl(*encoder_outputs(model, x_input, draws.one_hot(y)))
    np.testing.assert_allclose(first["kl"], kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(first["loss"], first["recon"] + first["kl"], rtol=1e-6)


def test_prepare_heldout_draws_what_evaluate_elbo_draws(splits):
    # As compute_test_metrics combines them: the test ELBO without noise, prepare_heldout
    # with the run's noise; its targets must be the binary images that ELBO scored.
    model = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16))
    x, labels = (
        tf.constant(data_utils.scale(splits.test_images[:250])),
        tf.constant(splits.test_labels[:250]),
    )
    eval_step = evaluate.make_eval_step(model, add_noise=False, binarized=True)
    expected = evaluate.heldout_elbo(eval_step, x, labels, seed=5, batch_size=100)
    x_input, target = evaluate.prepare_heldout(x, 5, add_noise=True, binarized=True, batch_size=100)
    losses = []
    for i, start in enumerate(range(0, 250, 100)):
        _, seed_model = evaluate._eval_seeds(tf.constant([5, i], tf.int64))
        part = slice(start, start + 100)
        y = draws.one_hot(labels[part])
        losses.append(cvae.negative_elbo(model, target[part], target[part], y, seed_model)["loss"])
    assert float(tf.reduce_mean(tf.concat(losses, 0))) == pytest.approx(expected["loss"])
    assert set(np.unique(target.numpy())) == {0.0, 1.0}
    assert np.mean(x_input.numpy() != target.numpy()) > 0.01  # The noise is there.


@pytest.mark.parametrize("binarize", [True, False])
def test_the_test_split_as_uint8_pixels_scores_as_its_floats(splits, binarize):
    """compute_test_metrics keeps the test images and their noised and binarised copies
    as uint8 pixels (a quarter of the memory): every value they take is k/255, so
    each evaluation gives what it gives on float32 images, to the bit."""
    model = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16))
    pixels, labels = (
        splits.test_images[:120].reshape(120, -1),
        tf.constant(splits.test_labels[:120]),
    )
    as_uint8, as_float = tf.constant(pixels), tf.constant(data_utils.scale(pixels))
    drawn = {
        x.dtype: evaluate.prepare_heldout(x, 5, add_noise=True, binarized=binarize, batch_size=50)
        for x in (as_uint8, as_float)
    }
    for pixel_copy, float_copy in zip(drawn[tf.uint8], drawn[tf.float32], strict=True):
        assert pixel_copy.dtype == tf.uint8
        np.testing.assert_array_equal(data_utils.scale(pixel_copy.numpy()), float_copy)
    eval_step = evaluate.make_eval_step(model, add_noise=True, binarized=binarize)
    assert evaluate.heldout_elbo(eval_step, as_uint8, labels, 5, 50) == evaluate.heldout_elbo(
        eval_step, as_float, labels, 5, 50
    )
    (input_u8, target_u8), (input_f, target_f) = drawn[tf.uint8], drawn[tf.float32]
    iw = [
        evaluate.iw_log_likelihoods(model, t, 3, 7, 40, verbose=False, x_input=i)
        for i, t in ((input_u8, target_u8), (input_f, target_f))
    ]
    np.testing.assert_array_equal(*iw)
    restored = evaluate.reconstruct(model, input_u8, labels, 50)
    np.testing.assert_array_equal(restored, evaluate.reconstruct(model, input_f, labels, 50))
    assert evaluate.denoising_metrics(target_u8, input_u8, restored, chunk=50) == (
        evaluate.denoising_metrics(target_f, input_f, restored, chunk=50)
    )


def denoising_run_model(run_dir) -> cvae.CVAE:
    """The model of the shared tiny denoising run's last checkpoint (clean test images are
    then the likelihoods' targets: no binarisation)."""
    config, model = restore_run_model(run_dir)
    assert config.add_noise and config.binarize == "none"
    return model


@pytest.mark.slow
def test_a_denoising_run_scores_the_clean_test_image(tiny_run, splits):
    model = denoising_run_model(tiny_run)
    saved = json.loads((tiny_run / "metrics.json").read_text())
    n, k = saved["n_eval"], saved["iw_samples"]
    x, labels = (
        tf.constant(data_utils.scale(splits.test_images[:n])),
        tf.constant(splits.test_labels[:n]),
    )

    def test_elbo(add_noise: bool) -> float:
        step = evaluate.make_eval_step(model, add_noise=add_noise, binarized=False)
        return evaluate.heldout_elbo(step, x, labels, evaluate.TEST_SEED)["loss"]

    def nll_x_given_y(x_input: tf.Tensor) -> float:
        log_px_y = evaluate.iw_log_likelihoods(
            model, x, k, evaluate.IW_SEED, verbose=False, x_input=x_input
        )
        return -float(tf.reduce_mean(tf.gather(log_px_y, labels, batch_dims=1)))

    # Both encoder inputs score the clean image x (the target); the encoder sees x
    # itself, or its noised version.
    scored = saved["by_encoder_input"]
    clean, noised = test_elbo(add_noise=False), test_elbo(add_noise=True)
    assert scored["clean"]["test_loss"] == pytest.approx(clean, rel=1e-6)
    assert scored["noised"]["test_loss"] == pytest.approx(noised, rel=1e-6)
    # Apart by 100 times the tolerance above, so that it can tell them apart (a
    # barely trained model, as this one, is nearly blind to its input).
    assert abs(noised - clean) > 1e-4 * clean
    x_noised, _ = evaluate.prepare_heldout(x, evaluate.TEST_SEED, add_noise=True, binarized=False)
    nll_clean, nll_noised = nll_x_given_y(x), nll_x_given_y(x_noised)
    assert scored["clean"]["test_nll_x_given_y"] == pytest.approx(nll_clean, rel=1e-6)
    assert scored["noised"]["test_nll_x_given_y"] == pytest.approx(nll_noised, rel=1e-6)
    # 10 times the tolerance (0.06 nats apart here, against 0.005).
    assert abs(nll_noised - nll_clean) > 1e-5 * nll_clean


# --- The script: --eval_only and its flags ---

LIKELIHOOD_KEYS = (
    "test_loss",
    "test_recon",
    "test_kl",
    "test_nll_x_given_y",
    "test_nll_x",
    "test_classifier_error",
)
EXPECTED_KEYS = {
    "epochs",
    "n_eval",
    "iw_samples",
    *LIKELIHOOD_KEYS,
    "test_encoder_input",
    "by_encoder_input",
    *(f"denoise_{m}_{c}" for m in ("psnr", "bce") for c in ("noised", "median", "cvae")),
    "eval_seconds",
    "train_seconds",
    "checkpoint",
}


def assert_likelihood_metrics_are(
    scored: dict, model: cvae.CVAE, x_input: np.ndarray, x: np.ndarray, labels: np.ndarray
) -> None:
    """Each likelihood metric recomputed from the model as the README defines it: of the
    images x, with their true labels, the encoder seeing x_input, dropout off."""
    y = np.eye(data_utils.N_CLASSES, dtype=np.float32)[labels]
    # The KL is exact given the encoder: NumPy's closed form, float32 against float64
    # (rtol 1e-5 as test_cvae.test_kl_matches_numpy_closed_form). Another encoder
    # input or other labels give another KL.
    kl = numpy_kl(*encoder_outputs(model, x_input, y)).mean()
    assert scored["test_kl"] == pytest.approx(kl, rel=1e-5)
    # The reconstruction term is one draw of z per image: its mean over the N images
    # is within 4 standard errors (fixed seeds) of E_q[−log p(x|z,y)], here by S = 20
    # NumPy n_draws per image; Var(one draw) = S·SE² of those. 1.1 to 1.5 nats here.
    n_draws = 20
    recon, recon_se = monte_carlo_recon(model, x, y, n_draws, seed=1, x_input=x_input)
    one_draw_se = np.sqrt(np.sum(n_draws * recon_se**2)) / len(x)
    mc_se = np.sqrt(np.sum(recon_se**2)) / len(x)
    tolerance = 4 * math.hypot(one_draw_se, mc_se)
    assert abs(scored["test_recon"] - recon.mean()) < tolerance
    assert abs(scored["test_loss"] - (recon.mean() + kl)) < tolerance
    # The importance-weighted metrics from the (N, C) estimates, recomputed with the
    # evaluation's seed (so the same numbers), each summary in NumPy. Same code, same
    # process: rel 1e-6, as for the reproduced metrics.
    log_px_y = evaluate.iw_log_likelihoods(
        model, tf.constant(x), 5, evaluate.IW_SEED, verbose=False, x_input=tf.constant(x_input)
    )
    log_px_y = log_px_y.numpy().astype(np.float64)
    own_label = log_px_y[np.arange(len(labels)), labels]
    marginal = np.logaddexp.reduce(log_px_y, axis=1) - math.log(10)
    predicted = np.argmax(log_px_y, axis=1)
    assert scored["test_nll_x_given_y"] == pytest.approx(-own_label.mean(), rel=1e-6)
    assert scored["test_nll_x"] == pytest.approx(-marginal.mean(), rel=1e-6)
    assert scored["test_classifier_error"] == 100.0 * np.mean(predicted != labels)
    # Power: the own label's column, the best column and the marginal are nats apart
    # (each check above tells them apart), and the classifier is neither always right
    # nor always wrong.
    best = log_px_y.max(axis=1).mean()
    assert best - own_label.mean() > 0.1 and abs(best - marginal.mean()) > 0.1
    assert 0 < np.mean(predicted != labels) < 1


def recomputed_denoising_metrics(model: cvae.CVAE, splits, n: int) -> dict[str, float]:
    """The denoising metrics of the first n test images as the README defines them: the
    noised image of the evaluation's draw (TEST_SEED), its 3×3 median filter and the
    model's restoration (the mean image at q's mean, given the noised image and the true
    label), each against the clean image."""
    x, labels = tf.constant(data_utils.scale(splits.test_images[:n])), splits.test_labels[:n]
    x_noised, target = evaluate.prepare_heldout(
        x, evaluate.TEST_SEED, add_noise=True, binarized=False
    )
    mean = cvae.posterior_mean(model, x_noised, tf.constant(labels))
    restored = cvae.mean_image(model, mean, tf.constant(labels))
    return evaluate.denoising_metrics(target, x_noised, restored)


@pytest.mark.slow
def test_eval_only_reproduces_the_end_of_training_metrics(tiny_run, tmp_path, splits):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert set(trained) == EXPECTED_KEYS
    assert (trained["n_eval"], trained["iw_samples"]) == (200, 5)  # TINY_FLAGS

    assert main.main(["--eval_only", str(run_dir), "--n_eval", "200", "--iw_samples", "5"]) == 0

    evaluated = json.loads((run_dir / "metrics.json").read_text())
    assert set(evaluated) == EXPECTED_KEYS
    others = {"eval_seconds", "checkpoint", "test_encoder_input", "by_encoder_input"}
    for key in EXPECTED_KEYS - others:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key
    assert evaluated["test_encoder_input"] == trained["test_encoder_input"]
    by_input = evaluated["by_encoder_input"]
    assert set(by_input) == {"clean", "noised"}
    for name, scored in by_input.items():
        assert scored == pytest.approx(trained["by_encoder_input"][name], rel=1e-6), name

    # Recomputed from the restored model: the likelihoods are of the clean test images
    # (no binarisation in this run), the encoder seeing them clean or noised.
    model = denoising_run_model(run_dir)
    x, labels = data_utils.scale(splits.test_images[:200]), splits.test_labels[:200]
    x_noised, target = evaluate.prepare_heldout(
        tf.constant(x), evaluate.TEST_SEED, add_noise=True, binarized=False
    )
    np.testing.assert_array_equal(target.numpy(), x)
    for name, x_input in (("clean", x), ("noised", x_noised.numpy())):
        assert_likelihood_metrics_are(by_input[name], model, x_input, x, labels)
        assert by_input[name]["test_nll_x_given_y"] < by_input[name]["test_loss"]  # IW: tighter.
    # The headline is the tighter bound on −log p(x|y), and all its metrics.
    headline = min(by_input, key=lambda name: by_input[name]["test_nll_x_given_y"])
    assert evaluated["test_encoder_input"] == headline
    assert {key: evaluated[key] for key in LIKELIHOOD_KEYS} == by_input[headline]
    # A denoising run has the denoising metrics too (same code and inputs: rel 1e-6).
    denoising = recomputed_denoising_metrics(model, splits, 200)
    assert {key: evaluated[key] for key in denoising} == pytest.approx(denoising, rel=1e-6)
    # The previous metrics.json is kept, byte for byte, and the source run is untouched.
    kept = list(run_dir.glob("metrics.*.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == (tiny_run / "metrics.json").read_bytes()
    assert not list(tiny_run.glob("metrics.*.json"))


@pytest.mark.slow
def test_eval_only_with_iw_samples_zero_skips_the_likelihoods(tiny_run, tmp_path, splits):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    # A run without the last epoch's pictures gets them drawn, identical to the originals.
    removed = [f"epochs/{p.name}" for p in sorted(run_dir.glob("epochs/*epoch002.png"))]
    removed.append("curves.png")
    assert len(removed) == 15
    for name in removed:
        (run_dir / name).unlink()
    # The others, the newest pictures at the top (<kind>.png) among them.
    kept = {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*.png")}
    assert main.main(["--eval_only", str(run_dir), "--n_eval", "50", "--iw_samples", "0"]) == 0
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["n_eval"] == 50
    assert evaluated["test_nll_x"] is None and evaluated["test_classifier_error"] is None
    # The other metrics are of the 50 images asked for.
    denoising = recomputed_denoising_metrics(denoising_run_model(run_dir), splits, 50)
    assert {key: evaluated[key] for key in denoising} == pytest.approx(denoising, rel=1e-6)
    for name in removed:
        assert (run_dir / name).read_bytes() == (tiny_run / name).read_bytes(), name
    assert {n: (run_dir / n).stat().st_mtime_ns for n in kept} == kept  # Others untouched.


def test_eval_only_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(Config(add_noise=True).to_json()))
    assert main.main(["--eval_only", str(run_dir)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_only_of_a_folder_without_metrics_csv_is_a_clear_error(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "metrics.csv").unlink()
    assert main.main(["--eval_only", str(run_dir)]) == 1
    assert f"--eval_only {run_dir}: no metrics.csv there" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_bytes() == (tiny_run / "metrics.json").read_bytes()


@pytest.mark.slow
def test_eval_only_of_an_unwritable_folder_is_a_clear_error(tiny_run, capsys):
    """A run folder that may be read but not written: mode 0555. Mode bits do not bind
    root, so as root main.py runs with the effective user id 65534 ("nobody"), whom
    they do bind. The run folder is copied into a fresh temporary folder that any user
    may pass through (pytest's own tmp_path is private to its owner)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as parent:
        Path(parent).chmod(0o755)
        run_dir = Path(parent) / tiny_run.name
        shutil.copytree(tiny_run, run_dir)
        for path in [run_dir, *run_dir.rglob("*")]:  # Readable by all, whatever the umask.
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        as_root = os.geteuid() == 0
        try:
            if as_root:
                try:
                    os.seteuid(65534)
                except OSError as err:  # E.g. a user namespace without that id.
                    pytest.skip(f"root cannot take an unprivileged user id here ({err})")
            (run_dir / "config.json").read_bytes()  # Readable as whoever runs main.py.
            code = main.main(["--eval_only", str(run_dir)])
        finally:
            if as_root:
                os.seteuid(0)
            for path in [run_dir, *run_dir.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)  # So that it can be removed.
        assert code == 1
        error = capsys.readouterr().err
        assert f"--eval_only {run_dir}: metrics.json cannot be written" in error, error
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
