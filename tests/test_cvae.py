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


def numpy_bernoulli_nll(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """−log p(x|logits) = Σ_pixels [log(1 + e^l) − x·l], in float64; finite for any logit."""
    logits = np.asarray(logits, np.float64)
    return np.sum(np.logaddexp(0.0, logits) - np.asarray(x, np.float64) * logits, axis=-1)


def encoder_outputs(model, x, y) -> tuple[np.ndarray, np.ndarray]:
    """q(z|x,y)'s mean and std (B, Z) in float64, dropout off."""
    mean, std = model.encode(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
    return mean.numpy().astype(np.float64), std.numpy().astype(np.float64)


def monte_carlo_recon(
    model,
    x: np.ndarray,
    y: np.ndarray,
    n_samples: int,
    seed: int,
    chunk: int = 500,
    x_input: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """E_q[−log p(x|z,y)] per row by plain Monte Carlo, and its standard error: (B,), (B,).

    Independent of cvae's loss code: z ~ q = N(mean, std²) drawn by NumPy from the
    encoder's outputs given `x_input` (default x), the Bernoulli likelihood in
    NumPy; the model only encodes and decodes (dropout off). `chunk` samples per
    decoder call bound the memory.
    """
    mean, std = encoder_outputs(model, x if x_input is None else x_input, y)
    rng = np.random.default_rng(seed)
    recon = []
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        z = mean + std * rng.standard_normal((n, *mean.shape))  # (n, B, Z)
        logits = model.decode(
            tf.constant(z.reshape(-1, mean.shape[1]), tf.float32), tf.constant(np.tile(y, (n, 1)))
        ).numpy()
        recon.append(numpy_bernoulli_nll(np.tile(x, (n, 1)), logits).reshape(n, len(x)))
    recon = np.concatenate(recon)  # (n_samples, B)
    return recon.mean(axis=0), recon.std(axis=0, ddof=1) / np.sqrt(n_samples)


def binary_test_batch(splits, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first n test images thresholded at ½ (binary, as with --binarize), their int
    labels and one-hot labels."""
    x = (data_utils.scale(splits.test_images[:n]) > 0.5).astype(np.float32)
    labels = splits.test_y[:n]
    return x, labels, np.eye(data_utils.N_CLASSES, dtype=np.float32)[labels]


def test_one_hot_sets_exactly_the_labels_column():
    # Every column of every label: the IW step pairs images with labels through it.
    labels = np.array([3, 0, 9, 1, 8, 2, 7, 4, 6, 5, 9, 0])
    encoded = data_utils.one_hot(tf.constant(labels)).numpy()
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, np.eye(10, dtype=np.float32)[labels])


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
    chunk = cvae.make_train_chunk(model, optimizer, x, labels, cvae.Objective(add_noise=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    batches, seeds = tf.range(32)[tf.newaxis], tf.constant([[0, 1]], tf.int64)
    sums, done = chunk(batches, seeds, tf.constant(0), tf.constant(1), tf.zeros(3, tf.float64))
    assert int(done) == 1
    terms = dict(zip(cvae.TERMS, sums.numpy() / 32, strict=True))  # Means over the batch.
    assert all(np.isfinite(v) for v in terms.values())
    # The step reports the −ELBO of its batch before the update: recomputed with the
    # draws _apply_step makes (seed split into the batch's and the model's), on a fresh
    # model with the same initial weights (same seed). rtol 1e-5: the same float32
    # sums of 784 pixels, but a compiled graph against eager ops (oneDNN may pick
    # other kernels, Grappler fuses), each term within a few roundings (6e-8) of
    # terms of its size.
    fresh = cvae.CVAE(n_z=2, n_hidden=(64, 64, 64, 64), keep_prob=0.6)
    seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(seeds[0], 2))
    x_input, target = cvae.prepare_batch(x, seed_batch, add_noise=True, binarize=False)
    expected = cvae.negative_elbo(
        fresh, x_input, target, data_utils.one_hot(labels), seed_model, training=True
    )
    for name in cvae.TERMS:
        np.testing.assert_allclose(terms[name], np.mean(expected[name]), rtol=1e-5, err_msg=name)
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
    # The mean over all 250 images (not of the three batches' means, 100, 100 and 50
    # images): the KL in closed form of the encoder's outputs for the same noised and
    # binarised inputs (prepare_heldout draws what heldout_elbo draws). float32
    # against float64, summed in float64: rtol 1e-5 as test_kl_matches_numpy_closed_form.
    x_input, _ = cvae.prepare_heldout(x, 11, add_noise=True, binarize=True, batch_size=100)
    kl = numpy_kl(*encoder_outputs(model, x_input, data_utils.one_hot(y)))
    np.testing.assert_allclose(first["kl"], kl.mean(), rtol=1e-5)
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


@pytest.mark.parametrize("uniform_bits", [32, 16])
def test_draws_inside_xla_use_threefry_with_the_same_statistics(uniform_bits):
    """Compiled training chunks draw with threefry and 16-bit uniforms
    (data_utils.random_algorithm): the noise, binarisation and dropout keep their
    distributions, and the numbers are threefry's, not Philox's (which TensorFlow's CPU
    kernels would have drawn)."""
    seed = tf.constant([1, 2])

    @tf.function(jit_compile=True)
    def draws(x, h):
        with data_utils.random_algorithm("threefry", uniform_bits):
            return (
                data_utils.salt_and_pepper(x, seed),
                data_utils.binarize(x, seed),
                cvae.dropout(h, 0.6, seed),
                data_utils.split_seed(seed, 3),
                data_utils.batch_uniform(tf.shape(h), seed),
            )

    x, h = tf.fill((200, 784), 0.5), tf.ones((200, 500))
    noised, binary, dropped, seeds, uniform = (t.numpy() for t in draws(x, h))
    # As test_data's test_salt_and_pepper_statistics: 156,800 pixels (100,000 units),
    # so a fraction has a standard error of at most 0.0016; 0.005 is three of them.
    # The 16-bit uniforms move each probability by less than 2^-16 = 1.5e-5.
    assert abs(np.mean(noised == 0.0) - 0.55) < 0.005
    assert abs(np.mean(noised == 1.0) - 0.05) < 0.003
    assert abs(np.mean(binary) - 0.5) < 0.005
    assert abs(np.mean(dropped == 0.0) - 0.4) < 0.005
    assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.6)}
    assert uniform.min() >= 0.0 and uniform.max() < 1.0 and abs(uniform.mean() - 0.5) < 0.005
    on_grid = np.array_equal(uniform * 2**16, np.floor(uniform * 2**16))
    assert on_grid == (uniform_bits == 16)
    # Not Philox's numbers: the same calls outside the block differ.
    assert not np.array_equal(noised, data_utils.salt_and_pepper(x, seed).numpy())
    philox_seeds = tf.random.experimental.stateless_split(seed, 3, alg="philox").numpy()
    assert not np.array_equal(seeds, philox_seeds)


def test_draws_outside_xla_are_philox_from_one_key_kernel():
    """Outside `random_algorithm` blocks the draws are Philox's numbers (as
    `alg="philox"` gives them), asked for as auto_select: TensorFlow then derives
    the key from the seed in one kernel, where `alg="philox"` builds dozens of ops
    per draw into every uncompiled step (which slowed runs without XLA by 20 %)."""
    seed = tf.constant([7, 8])
    shape = (4, 6)
    np.testing.assert_array_equal(
        data_utils.split_seed(seed, 3),
        tf.random.experimental.stateless_split(seed, 3, alg="philox"),
    )
    np.testing.assert_array_equal(
        data_utils.batch_uniform(shape, seed),
        tf.random.stateless_uniform(shape, seed, alg="philox"),
    )
    np.testing.assert_array_equal(
        data_utils.batch_draw(tf.random.stateless_normal, shape, seed, tf.float32),
        tf.random.stateless_normal(shape, seed, alg="philox"),
    )

    def ops_in(draw) -> int:
        return len(tf.function(draw).get_concrete_function(seed).graph.get_operations())

    ours = ops_in(lambda s: data_utils.split_seed(s, 3))
    explicit = ops_in(lambda s: tf.random.experimental.stateless_split(s, 3, alg="philox"))
    assert ours < explicit / 2, (ours, explicit)


def test_16_bit_uniforms_are_the_halves_of_32_bit_draws():
    """k / 2^16 for the low halves of the draws, then their high halves, cut to the width."""
    seed = tf.constant([4, 5])
    uniform = data_utils.stateless_uniform16((3, 5), seed, tf.float32, "philox").numpy()
    bits = tf.random.stateless_uniform(
        (3, 3), seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox"
    ).numpy()
    k = np.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[:, :5]
    np.testing.assert_array_equal(uniform, k.astype(np.float32) / 2**16)
