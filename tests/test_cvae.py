"""The model and its loss terms, against NumPy closed forms; the plain ELBO's gradient
against finite differences; a short training run against a stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    binary_test_batch,
    encoder_outputs,
    monte_carlo_recon,
    numpy_bernoulli_nll,
    numpy_kl,
)

import cvae
import data_utils
import draws
import steps


def numpy_bce(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Σ_pixels −[x log p + (1 − x) log(1 − p)] with p = sigmoid(logits), in float64."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return -np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=-1)


def test_kl_is_zero_at_the_prior():
    kl = cvae.gaussian_kl(tf.zeros((3, 5)), tf.ones((3, 5)))
    np.testing.assert_allclose(kl.numpy(), np.zeros(3), atol=1e-7)


def test_kl_matches_numpy_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 7)).astype(np.float32)
    std = rng.uniform(0.05, 3.0, size=(4, 7)).astype(np.float32)
    kl = cvae.gaussian_kl(tf.constant(mean), tf.constant(std)).numpy()
    # Against float64: NumPy's own float32 log has other code for AVX2 and AVX-512.
    # TensorFlow's float32 rounds about 6 times per dimension, then sums n = 7 terms:
    # each rounding within u of magnitudes below 3.5× the KL here, so under 3e-6.
    exact = numpy_kl(mean.astype(np.float64), std.astype(np.float64))
    np.testing.assert_allclose(kl, exact, rtol=1e-5)


def test_kl_of_one_dimension_by_hand():
    # mean 1, std 1: ½ (1 + 1 − 0 − 1) = 0.5 nats. The original's "+1" gave 1.5.
    kl = cvae.gaussian_kl(tf.constant([[1.0]]), tf.constant([[1.0]]))
    np.testing.assert_allclose(kl.numpy(), [0.5], rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_reconstruction_term_matches_numpy_bce(binary):
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(5, 784)).astype(np.float32)
    if binary:
        x = (x > 0.5).astype(np.float32)
    logits = rng.normal(scale=4.0, size=(5, 784)).astype(np.float32)
    log_lik = cvae.bernoulli_log_likelihood(tf.constant(x), tf.constant(logits)).numpy()
    np.testing.assert_allclose(-log_lik, numpy_bce(x, logits), rtol=1e-5)


def test_reconstruction_term_is_finite_for_saturated_logits():
    # Clip-then-log would give inf or nan here; the logits form stays exact.
    x = tf.constant([[0.0, 1.0]])
    logits = tf.constant([[-200.0, 200.0]])
    np.testing.assert_allclose(cvae.bernoulli_log_likelihood(x, logits).numpy(), [0.0], atol=1e-6)
    wrong = cvae.bernoulli_log_likelihood(x, -logits).numpy()
    np.testing.assert_allclose(wrong, [-400.0], rtol=1e-6)


@pytest.mark.parametrize("n_z", [2, 5])
def test_network_output_shapes(n_z):
    model = cvae.CVAE(n_z=n_z, n_hidden=(32, 16, 24, 8), keep_prob=0.6)
    x = tf.random.stateless_uniform((6, 784), seed=(6, 0))
    y = draws.one_hot(tf.constant([0, 1, 2, 3, 4, 9]))
    seed = tf.constant([1, 2])
    for training in (False, True):
        mean, std = model.encode(x, y, training=training, seed=seed)
        assert mean.shape == std.shape == (6, n_z)
        assert np.all(std.numpy() >= cvae.STD_FLOOR)
        logits = model.decode(mean, y, training=training, seed=seed)
        assert logits.shape == (6, 784)
    terms = cvae.negative_elbo(model, x, x, y, seed, training=True)
    assert {k: v.shape for k, v in terms.items()} == {k: (6,) for k in ("loss", "recon", "kl")}
    # Dropout off, the KL is the closed form of the encoder's outputs (float32 against
    # float64: rtol 1e-5, as in test_kl_matches_numpy_closed_form); the loss's
    # expectation is checked in test_negative_elbo_is_a_one_sample_monte_carlo_estimate.
    terms = cvae.negative_elbo(model, x, x, y, seed)
    np.testing.assert_allclose(terms["kl"], numpy_kl(*encoder_outputs(model, x, y)), rtol=1e-5)


def test_layer_sizes_and_he_initialisation():
    model = cvae.CVAE(n_z=3, n_hidden=(500, 400, 300, 200), seed=5)
    kernels = [v for v in model.trainable_variables if "kernel" in v.path]
    shapes = [tuple(k.shape) for k in kernels]
    assert shapes == [(794, 500), (500, 400), (400, 6), (13, 300), (300, 200), (200, 784)]
    first = kernels[0].numpy()
    # Variance scaling with factor 2 on the fan-in: std √(2/794), truncated at 2σ.
    np.testing.assert_allclose(first.std(), np.sqrt(2.0 / 794), rtol=0.03)
    assert np.abs(first).max() <= 2 * np.sqrt(2.0 / 794) / 0.87962566 + 1e-6
    assert all(np.all(b.numpy() == 0) for b in model.trainable_variables if "bias" in b.path)


def test_same_seed_builds_the_same_weights():
    a = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16), seed=7)
    b = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16), seed=7)
    c = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16), seed=8)
    for va, vb in zip(a.trainable_variables, b.trainable_variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.trainable_variables[0].numpy(), c.trainable_variables[0].numpy())


def test_dropout_only_when_training():
    model = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), keep_prob=0.5)
    x = tf.random.stateless_uniform((4, 784), seed=(4, 0))
    y = draws.one_hot(tf.constant([1, 2, 3, 4]))
    eval_a = model.encode(x, y, training=False)[0].numpy()
    eval_b = model.encode(x, y, training=False)[0].numpy()
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.encode(x, y, training=True, seed=tf.constant([0, 1]))[0].numpy()
    train_b = model.encode(x, y, training=True, seed=tf.constant([0, 2]))[0].numpy()
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)


def test_one_train_step_on_real_images_is_finite_and_moves_weights(splits):
    import keras

    model = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), keep_prob=0.6)
    optimizer = keras.optimizers.Adam(1e-3)
    x, labels = (
        tf.constant(data_utils.scale(splits.train_images[:32])),
        tf.constant(splits.train_labels[:32]),
    )
    chunk = steps.make_train_chunk(model, optimizer, x, labels, steps.Objective(add_noise=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    batches, seeds = tf.range(32)[tf.newaxis], tf.constant([[0, 1]], tf.int64)
    sums, done = chunk(batches, seeds, tf.constant(0), tf.constant(1), tf.zeros(3, tf.float64))
    assert int(done) == 1
    terms = dict(zip(steps.TERMS, sums.numpy() / 32, strict=True))  # Means over the batch.
    assert all(np.isfinite(v) for v in terms.values())
    # The step reports the −ELBO of its batch before the update: recomputed with the
    # draws _apply_step makes (seed split into the batch's and the model's), on a fresh
    # model with the same initial weights (same seed). rtol 1e-5: the same float32
    # sums of 784 pixels, but a compiled graph against eager ops (oneDNN may pick
    # other kernels, Grappler fuses), each term within a few roundings (6e-8) of
    # terms of its size.
    fresh = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), keep_prob=0.6)
    seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(seeds[0], 2))
    x_input, target = draws.prepare_batch(x, seed_batch, add_noise=True, binarized=False)
    expected = cvae.negative_elbo(
        fresh, x_input, target, draws.one_hot(labels), seed_model, training=True
    )
    for name in steps.TERMS:
        np.testing.assert_allclose(terms[name], np.mean(expected[name]), rtol=1e-5, err_msg=name)
    after = [v.numpy() for v in model.trainable_variables]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_checkpoint_holds_every_model_variable(tmp_path):
    # Every layer must be tracked by the model itself, not reach the checkpoint only
    # through the optimizer's variables: restoring the model alone brings back all 12.
    model = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16), seed=1)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(model.weights) == 12
    fresh = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16), seed=2)
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_negative_elbo_is_a_one_sample_monte_carlo_estimate(splits):
    """cvae.negative_elbo (one reparameterised z per row) has the expectation
    E_q[−log p(x|z,y)] + KL, the first term estimated independently in NumPy."""
    model = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), seed=0)
    x, _, y = binary_test_batch(splits, 6)
    mc, mc_se = monte_carlo_recon(model, x, y, n_samples=4000, seed=0)
    kl = numpy_kl(*encoder_outputs(model, x, y))

    # 4000 draws of negative_elbo per image: 8 seeds, 500 copies of the batch each
    # (every row draws its own ε).
    copies, seeds = 500, 8
    terms = [
        cvae.negative_elbo(
            model, *(tf.constant(np.tile(a, (copies, 1))) for a in (x, x, y)), tf.constant([s, 7])
        )
        for s in range(seeds)
    ]
    loss = np.concatenate([t["loss"].numpy() for t in terms]).reshape(-1, len(x))
    recon = np.concatenate([t["recon"].numpy() for t in terms]).reshape(-1, len(x))
    kl_terms = np.concatenate([t["kl"].numpy() for t in terms]).reshape(-1, len(x))
    # The KL is exact: float32 against float64, about 6 roundings of terms below
    # 3.5× the KL per dimension (test_kl_matches_numpy_closed_form), so rtol 1e-5.
    np.testing.assert_allclose(kl_terms, np.broadcast_to(kl, kl_terms.shape), rtol=1e-5)
    loss_se = loss.std(axis=0, ddof=1) / np.sqrt(len(loss))
    # Statistical: 4 standard errors of the difference of two independent means
    # (about 2 to 4 nats here; fixed seeds, so the outcome is fixed; a false alarm
    # would have odds 6e-5 per image).
    tolerance = 4 * np.sqrt(loss_se**2 + mc_se**2)
    np.testing.assert_array_less(np.abs(loss.mean(axis=0) - (mc + kl)), tolerance)
    np.testing.assert_array_less(np.abs(recon.mean(axis=0) - mc), tolerance)
    # Power: a z = mean bug (no noise) would score −log p(x|z=mean,y) at every draw,
    # which for this model is 17 to 37 nats below E_q[−log p(x|z,y)] (Jensen: the
    # loss is convex in the logits), 8 to 11 times the tolerance above. (Checked by
    # patching negative_elbo to z = mean: this test failed on every image.)
    mean, _ = encoder_outputs(model, x, y)
    at_mean = numpy_bernoulli_nll(x, model.decode(tf.constant(mean, tf.float32), y).numpy())
    assert np.all(mc - at_mean > 5 * tolerance)


# --- The gradient that training descends ---------------------------------------------------


def _leaky_relu(a: np.ndarray) -> np.ndarray:
    return np.where(a > 0.0, a, cvae.LEAKY_ALPHA * a)


def reference_negative_elbo(weights, x, y, eps) -> float:
    """The batch's mean one-sample −ELBO written out in NumPy float64 (README, "The
    model"; Kingma & Welling 2014, eq. 10): the encoder's two leaky-ReLU layers on
    concat(x, y), mean and std = softplus(·) + floor, z = mean + std·ε with the given ε,
    the decoder's two layers on concat(z, y), Bernoulli logits, and the analytic KL.
    `weights`: (kernel, bias) of each layer in the order of a forward pass."""
    (w1, b1), (w2, b2), (w3, b3), (w4, b4), (w5, b5), (w6, b6) = weights
    h = _leaky_relu(np.concatenate([x, y], 1) @ w1 + b1)
    h = _leaky_relu(h @ w2 + b2)
    mean, raw_std = np.split(h @ w3 + b3, 2, axis=1)
    std = np.logaddexp(0.0, raw_std) + cvae.STD_FLOOR
    z = mean + std * eps
    g = _leaky_relu(np.concatenate([z, y], 1) @ w4 + b4)
    g = _leaky_relu(g @ w5 + b5)
    recon = numpy_bernoulli_nll(x, g @ w6 + b6)
    return float(np.mean(recon + numpy_kl(mean, std)))


def test_elbo_gradient_matches_finite_differences_in_float64(splits, monkeypatch):
    """The gradient of the batch's mean `negative_elbo` with respect to every weight of
    the encoder and the decoder, at a fixed ε and dropout off, against central finite
    differences of the −ELBO written out in float64 (`reference_negative_elbo`).

    The reparameterisation must carry the gradient to std through z = mean + std·ε:
    with z = mean + stop_gradient(std·ε) (the same values) the KL alone reaches std,
    and every encoder weight's gradient was off by 6 % to 100 % of its variable's
    largest entry, against 2e-7 with the right code.
    """
    n_z = 2
    model = cvae.CVAE(n_z=n_z, n_hidden=(16, 16, 16, 16), keep_prob=0.6, seed=3)
    x, _, y = binary_test_batch(splits, 4)
    drawn = []  # The ε that negative_elbo draws, read where it is drawn.
    real_sample_posterior = cvae.sample_posterior

    def sample_posterior(*args, **kwargs):
        posterior = real_sample_posterior(*args, **kwargs)
        drawn.append(posterior.eps.numpy().astype(np.float64))
        return posterior

    monkeypatch.setattr(cvae, "sample_posterior", sample_posterior)
    with tf.GradientTape() as tape:
        terms = cvae.negative_elbo(model, *map(tf.constant, (x, x, y)), tf.constant([5, 6]))
        loss = tf.reduce_mean(terms["loss"])
    grads = tape.gradient(loss, model.trainable_variables)
    (eps,) = drawn

    layers = list(model.dense_layers.values())
    assert len(layers) == 6 and len(grads) == 12  # (kernel, bias) per layer, in this order.
    weights = [[layer.kernel.numpy(), layer.bias.numpy()] for layer in layers]
    weights = [[w.astype(np.float64) for w in pair] for pair in weights]
    # The reference computes what the model computes: float32 against float64, sums of
    # 794 terms, within 1e-6 of a loss of ~600 nats (seen 2e-8).
    assert reference_negative_elbo(weights, x, y, eps) == pytest.approx(float(loss), rel=1e-6)

    rng = np.random.default_rng(0)
    step = 1e-6  # Central differences in float64: truncation and rounding below 1e-8.
    for index, grad in enumerate(grads):
        layer, part = divmod(index, 2)
        value = weights[layer][part]
        # Up to 40 entries of each variable (all of the small ones), chosen by a seeded rng.
        entries = rng.choice(value.size, min(value.size, 40), replace=False)
        numeric = []
        for entry in entries:
            moved = []
            for sign in (1.0, -1.0):
                shifted = value.copy()
                shifted.flat[entry] += sign * step
                trial = [list(pair) for pair in weights]
                trial[layer][part] = shifted
                moved.append(reference_negative_elbo(trial, x, y, eps))
            numeric.append((moved[0] - moved[1]) / (2 * step))
        numeric = np.array(numeric)
        autodiff = grad.numpy().reshape(-1)[entries]
        # float32 backpropagation through sums of up to 794 terms: within 794·6e-8 = 5e-5
        # of the magnitudes summed; against the variable's largest entry, 1e-4.
        tolerance = 1e-4 * np.abs(numeric).max()
        name = f"{list(model.dense_layers)[layer]} {('kernel', 'bias')[part]}"
        np.testing.assert_allclose(autodiff, numeric, rtol=0, atol=tolerance, err_msg=name)
