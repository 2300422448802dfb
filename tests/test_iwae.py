"""Training on the importance-weighted bound (--train_samples) and the KL warm-up (--kl_warmup).

Against brute force: the bound written out per sample in float64 from the
model's own encoder and decoder, and Burda et al.'s gradient (eq. 14) as a
weighted sum of per-sample gradients.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import cvae
import data_utils
import draws
import main
import steps
import train

B, K, Z = 4, 6, 3


@pytest.fixture(scope="module")
def batch(splits):
    """A tiny model with dropout, and four binarised digits with their one-hot labels."""
    model = cvae.CVAE(n_z=Z, n_hidden=(16, 16, 16, 16), keep_prob=0.8, seed=2)
    x = (data_utils.scale(splits.train_images[:B]) > 0.5).astype(np.float32)
    y = draws.one_hot(tf.constant(splits.train_labels[:B])).numpy()
    return model, tf.constant(x), tf.constant(y)


def log_normal(z: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log N(z; mean, diag std²) summed over the last axis, in float64."""
    return np.sum(-0.5 * ((z - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)


def brute_force_log_weights(model, x, y, seed, beta: float = 1.0) -> np.ndarray:
    """log w_k per image and sample (B, K), one decoder call per (image, sample), float64.

    The draws are `negative_iw_bound`'s own (its seed split and its ε), so that the
    two compute one bound; everything after the draws is written out here. Dropout
    is on, as in training, so the decoder is called once on all rows with the
    bound's own dropout seed (a dropout mask is drawn per row).
    """
    seed_enc, seed_eps, seed_dec = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    mean, std = model.encode(x, y, training=True, seed=seed_enc)
    eps = tf.random.stateless_normal((B, K, Z), seed_eps).numpy().astype(np.float64)
    mean, std = mean.numpy().astype(np.float64), std.numpy().astype(np.float64)
    z = mean[:, None] + std[:, None] * eps  # (B, K, Z)
    rows_y = np.repeat(y.numpy(), K, axis=0)
    logits = model.decode(
        tf.constant(z.reshape(-1, Z), tf.float32), tf.constant(rows_y), training=True, seed=seed_dec
    ).numpy()
    logits = logits.astype(np.float64).reshape(B, K, -1)
    xs = x.numpy().astype(np.float64)[:, None]
    log_px = np.sum(xs * logits - np.logaddexp(0.0, logits), -1)  # Bernoulli, on logits.
    zeros, ones = np.zeros_like(z), np.ones_like(z)
    log_prior_ratio = log_normal(z, zeros, ones) - log_normal(z, mean[:, None], std[:, None])
    return log_px + beta * log_prior_ratio


def log_mean_exp(a: np.ndarray) -> np.ndarray:
    top = a.max(-1, keepdims=True)
    return np.log(np.mean(np.exp(a - top), -1)) + top[..., 0]


# Float32 sums of 784 pixel terms each, off by up to n·u = 784 · 6e-8 ≈ 5e-5 of their
# magnitudes (~500 nats for the untrained model), and a decoder that may pick other
# matmul kernels for the reshaped rows: 1e-4 relative.
RTOL = 1e-4


@pytest.mark.parametrize("beta", [None, 0.3])
def test_bound_is_the_log_mean_of_the_importance_weights(batch, beta):
    model, x, y = batch
    seed = tf.constant([5, 9], tf.int64)
    terms = cvae.negative_iw_bound(model, x, x, y, seed, K, beta, training=True)
    log_w = brute_force_log_weights(model, x, y, seed)
    np.testing.assert_allclose(terms["loss"].numpy(), -log_mean_exp(log_w), rtol=RTOL)
    if beta is not None:
        expected = -log_mean_exp(brute_force_log_weights(model, x, y, seed, beta))
        np.testing.assert_allclose(terms["objective"].numpy(), expected, rtol=RTOL)
    # Jensen: log mean w >= mean log w, which is the K-sample estimate of the ELBO.
    assert np.all(-terms["loss"].numpy() >= np.mean(log_w, -1) - RTOL * np.abs(log_w).max())


def test_gradient_is_the_normalised_weighting_of_the_samples(batch):
    """∇L_K = Σ_k w̃_k ∇log w_k with w̃ the normalised weights (Burda et al., eq. 14): every
    sample carries gradient, in proportion to its weight, not only the best one."""
    model, x, y = batch
    seed = tf.constant([1, 2], tf.int64)
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        terms = cvae.negative_iw_bound(model, x, x, y, seed, K, training=True)
        loss = tf.reduce_mean(terms["loss"])
        # The same ops again, for log w_k (B, K): −loss = mean over images of lse − log K.
        log_w = _log_weights(model, x, y, seed)
        normalised = tf.stop_gradient(tf.nn.softmax(log_w, axis=1))
        surrogate = -tf.reduce_mean(tf.reduce_sum(normalised * log_w, axis=1))
    direct = tape.gradient(loss, variables)
    weighted = tape.gradient(surrogate, variables)
    spread = normalised.numpy()
    # An untrained model's weights are peaked; some image must spread them over samples.
    assert spread.max(1).min() < 0.95, "one sample takes all the weight: a weak test"
    for a, b in zip(direct, weighted, strict=True):
        a, b = a.numpy(), b.numpy()
        assert np.abs(a).max() > 0
        # The same float32 ops, summed in another order: 1e-5 of the largest entry.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def _log_weights(model, x, y, seed) -> tf.Tensor:
    """log w_k (B, K) by the ops of `negative_iw_bound`, for the gradient test."""
    seed_enc, seed_eps, seed_dec = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    mean, std = model.encode(x, y, training=True, seed=seed_enc)
    eps = tf.random.stateless_normal((B, K, Z), seed_eps)
    z = mean[:, None] + std[:, None] * eps
    logits = model.decode(
        tf.reshape(z, (-1, Z)), tf.repeat(y, K, axis=0), training=True, seed=seed_dec
    )
    log_px = tf.reshape(cvae.bernoulli_log_likelihood(tf.repeat(x, K, axis=0), logits), (B, K))
    return log_px + cvae.log_prior_ratio(z, eps, std[:, None])


def test_more_samples_give_a_tighter_bound(batch):
    """E[L_1] <= E[L_5] <= E[L_50] <= log p(x) (Burda et al., theorem 1), over 40 seeds."""
    model, x, y = batch
    means = []
    for k in (1, 5, 50):
        losses = [
            cvae.negative_iw_bound(model, x, x, y, tf.constant([s, k], tf.int64), k)["loss"]
            for s in range(40)
        ]
        means.append(float(tf.reduce_mean(tf.stack(losses))))
    # The gaps of an untrained model are tens of nats, the seeds' noise a few.
    assert means[0] > means[1] + 1.0 > means[2] + 2.0, means


def test_one_sample_trains_on_exactly_the_elbo(batch):
    """K = 1 without warm-up is today's loss and gradient, bit for bit; with the warm-up
    at β = 1 the value is the same (β·KL = KL exactly when β = 1)."""
    model, x, y = batch
    seed = tf.constant([3, 4], tf.int64)
    with tf.GradientTape(persistent=True) as tape:
        elbo = cvae.negative_elbo(model, x, x, y, seed, training=True)
        terms = steps.training_terms(model, x, x, y, seed, n_samples=1)
        warm = steps.training_terms(model, x, x, y, seed, n_samples=1, beta=tf.constant(1.0))
        elbo_mean, objective_mean = (tf.reduce_mean(t) for t in (elbo["loss"], terms["objective"]))
    for name in ("loss", "recon", "kl"):
        np.testing.assert_array_equal(terms[name].numpy(), elbo[name].numpy())
    np.testing.assert_array_equal(terms["objective"].numpy(), elbo["loss"].numpy())
    np.testing.assert_array_equal(warm["objective"].numpy(), elbo["loss"].numpy())
    variables = model.trainable_variables
    for a, b in zip(
        tape.gradient(elbo_mean, variables), tape.gradient(objective_mean, variables), strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_warmup_weight_rises_linearly_to_the_kl_weight():
    step_counts = tf.constant([0, 5, 10, 20, 10**6])
    np.testing.assert_array_equal(steps.warmup_ramp(step_counts, 20).numpy(), [0, 0.25, 0.5, 1, 1])
    warm = steps.Objective(kl_warmup_steps=20, kl_weight=0.5).beta(step_counts)
    np.testing.assert_array_equal(warm.numpy(), [0, 0.125, 0.25, 0.5, 0.5])
    assert float(steps.Objective(kl_weight=0.25).beta(step_counts)) == 0.25
    assert steps.Objective().beta(step_counts) is None  # The plain bound's own ops.


def test_warmup_is_read_from_the_optimizer_step(splits):
    """With warm-up, the first step descends the reconstruction alone (β = 0 at step 0):
    one SGD step of the compiled chunk against the gradient of the reconstruction."""
    images = data_utils.scale(splits.train_images[:32])
    labels = splits.train_labels[:32]
    model = cvae.CVAE(n_z=2, n_hidden=(32, 32, 32, 32), keep_prob=0.6, seed=4)
    optimizer = keras.optimizers.SGD(0.1)
    objective = steps.Objective(binarized=True, train_samples=3, kl_warmup_steps=100)
    chunk = steps.make_train_chunk(
        model, optimizer, tf.constant(images), tf.constant(labels), objective
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    seed = tf.constant([0, 1], tf.int64)

    # The step's own draws (steps._apply_step): its seed splits into batch and model seeds.
    seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x_input, target = draws.prepare_batch(tf.constant(images), seed_batch, False, True)
    with tf.GradientTape() as tape:
        terms = cvae.negative_iw_bound(
            model, x_input, target, draws.one_hot(tf.constant(labels)), seed_model, 3,
            tf.constant(0.0), training=True,
        )  # fmt: skip
        recon_only = tf.reduce_mean(terms["objective"])
    grads = tape.gradient(recon_only, model.trainable_variables)
    chunk(tf.range(32)[None], seed[None], tf.constant(0), tf.constant(1), tf.zeros(3, tf.float64))
    for grad, old, variable in zip(grads, before, model.trainable_variables, strict=True):
        update = variable.numpy() - old
        assert np.abs(update).max() > 0
        # Graph and eager run the same float32 ops: 1e-4 of the largest update covers a
        # different summation order; the KL's share of the gradient is far larger.
        np.testing.assert_allclose(update, -0.1 * grad.numpy(), atol=1e-4 * np.abs(update).max())


def test_the_run_names_k_and_its_epoch_lines_say_l_k():
    """The folder name carries K, and the epoch line names the bound trained (−L_K); a
    run with both flags resumes exactly in test_resume.py."""
    config = main.parse_args(["--binarize", "dynamic", "--train_samples", "3", "--kl_warmup", "2"])
    assert config.run_tags()[-2:] == ["bin-dynamic", "k3"]
    terms = {"loss": 101.0, "recon": 90.0, "kl": 11.0}
    line = train.epoch_line(config, 2, terms, {"loss": 105.0}, 1e-4, 3.0)
    assert "train -L_3 101.000 (recon 90.000, kl 11.000)" in line, line
    plain = train.epoch_line(main.parse_args([]), 2, terms, {"loss": 105.0}, 1e-4, 3.0)
    assert "train -elbo 101.000" in plain, plain
