"""The model and its loss terms, against NumPy closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import cvae
import data_utils


def numpy_kl(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """KL(N(mean, std²) ‖ N(0, 1)) summed over dimensions, written out per dimension."""
    return np.sum(np.log(1.0 / std) + (std**2 + mean**2) / 2.0 - 0.5, axis=-1)


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
    assert np.all(kl > 0)


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
    x = tf.random.uniform((6, 784))
    y = data_utils.one_hot(tf.constant([0, 1, 2, 3, 4, 9]))
    seed = tf.constant([1, 2])
    for training in (False, True):
        mean, std = model.encode(x, y, training=training, seed=seed)
        assert mean.shape == std.shape == (6, n_z)
        assert np.all(std.numpy() >= cvae.STD_FLOOR)
        logits = model.decode(mean, y, training=training, seed=seed)
        assert logits.shape == (6, 784)
    terms = cvae.negative_elbo(model, x, x, y, seed, training=True)
    assert {k: v.shape for k, v in terms.items()} == {k: (6,) for k in ("loss", "recon", "kl")}
    np.testing.assert_allclose(terms["loss"], terms["recon"] + terms["kl"], rtol=1e-6)


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
    x = tf.random.uniform((4, 784))
    y = data_utils.one_hot(tf.constant([1, 2, 3, 4]))
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
        tf.constant(splits.train_y[:32]),
    )
    chunk = cvae.make_train_chunk(model, optimizer, x, labels, add_noise=True, binarize=False)
    before = [v.numpy().copy() for v in model.trainable_variables]
    batches, seeds = tf.range(32)[tf.newaxis], tf.constant([[0, 1]], tf.int64)
    sums, done = chunk(batches, seeds, tf.constant(0), tf.constant(1), tf.zeros(3, tf.float64))
    assert int(done) == 1
    terms = dict(zip(cvae.TERMS, sums.numpy() / 32, strict=True))  # Means over the batch.
    assert all(np.isfinite(v) for v in terms.values())
    np.testing.assert_allclose(terms["loss"], terms["recon"] + terms["kl"], rtol=1e-5)
    # Untrained, the decoder's logits are near 0: about 784·log 2 ≈ 543 nats.
    assert 300 < terms["recon"] < 900
    after = [v.numpy() for v in model.trainable_variables]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_denoising_objective_compares_against_the_clean_image():
    x = tf.fill((2, 784), 0.5)
    seed = tf.constant([3, 4])
    x_input, target = cvae.prepare_batch(x, seed, add_noise=True, binarize=False)
    np.testing.assert_array_equal(target.numpy(), x.numpy())
    assert not np.array_equal(x_input.numpy(), x.numpy())
    x_input, target = cvae.prepare_batch(x, seed, add_noise=False, binarize=False)
    np.testing.assert_array_equal(x_input.numpy(), x.numpy())
    np.testing.assert_array_equal(target.numpy(), x.numpy())


def test_evaluation_is_deterministic_for_a_seed(splits):
    model = cvae.CVAE(n_z=2, n_hidden=(32, 32, 32, 32))
    step = cvae.make_eval_step(model, add_noise=True, binarize=True)
    x, y = (
        tf.constant(data_utils.scale(splits.valid_images[:250])),
        tf.constant(splits.valid_y[:250]),
    )
    first = cvae.heldout_elbo(step, x, y, seed=11, batch_size=100)
    again = cvae.heldout_elbo(step, x, y, seed=11, batch_size=100)
    other = cvae.heldout_elbo(step, x, y, seed=12, batch_size=100)
    assert first == again
    assert first["loss"] != other["loss"]
    np.testing.assert_allclose(first["loss"], first["recon"] + first["kl"], rtol=1e-6)


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


def test_dropout_equals_tensorflows_stateless_dropout():
    # The product form keeps TensorFlow's numbers: same units kept, same 1/keep scale.
    h = tf.random.stateless_normal((64, 300), seed=(3, 4))
    seed = tf.constant([7, 8], tf.int64)
    ours = cvae.dropout(h, 0.6, seed).numpy()
    reference = tf.nn.experimental.stateless_dropout(h, rate=0.4, seed=seed).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert abs(np.mean(ours == 0.0) - 0.4) < 0.01
