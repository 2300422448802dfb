"""draws.py: the random draws inside the graph (noise, binarisation, dropout, ε, seed
splitting), their algorithms inside and outside XLA, and the pixel conversions."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import data_utils
import draws


def test_one_hot_sets_exactly_the_labels_column():
    # Every column of every label: the IW step pairs images with labels through it.
    labels = np.array([3, 0, 9, 1, 8, 2, 7, 4, 6, 5, 9, 0])
    encoded = draws.one_hot(tf.constant(labels)).numpy()
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, np.eye(10, dtype=np.float32)[labels])


def test_scaling_in_numpy_and_in_the_graph_agree_on_every_level():
    # The model trains on pixels scaled in the graph and is evaluated on pixels
    # scaled by NumPy: both must give the same float for each of the 256 levels.
    levels = np.arange(256, dtype=np.uint8).reshape(1, 256)
    in_numpy = data_utils.scale(levels)
    in_graph = tf.function(draws.scale_in_graph)(tf.constant(levels)).numpy()
    np.testing.assert_array_equal(in_numpy, in_graph)
    assert in_numpy.dtype == np.float32 and in_numpy[0, 0] == 0.0 and in_numpy[0, -1] == 1.0
    floats = tf.constant(in_numpy)
    assert draws.scale_in_graph(floats) is floats  # Floats pass through.
    with pytest.raises(TypeError, match="uint8"):
        data_utils.scale(in_numpy)  # Floats scaled twice would be wrong silently.
    with pytest.raises(TypeError, match="uint8"):
        draws.scale_in_graph(tf.constant(levels, tf.int32))


def _fractions(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x == 0.0)), float(np.mean(x == 1.0))


def test_salt_and_pepper_statistics():
    # On a grey image: 0 with prob. 0.5 + 0.5·0.1 = 0.55, 1 with prob. 0.5·0.1 = 0.05,
    # unchanged with prob. 0.5·0.8 = 0.4.
    x = tf.fill((200, 784), 0.5)
    noised = draws.salt_and_pepper(x, tf.constant([1, 2])).numpy()
    zeros, ones = _fractions(noised)
    assert abs(zeros - 0.55) < 0.005 and abs(ones - 0.05) < 0.003
    assert abs(np.mean(noised == 0.5) - 0.40) < 0.005
    # On a white image every surviving pixel that is not flipped to 0 stays 1.
    white = draws.salt_and_pepper(tf.ones((200, 784)), tf.constant([1, 2])).numpy()
    assert abs(_fractions(white)[1] - 0.5 * 0.9) < 0.005


def test_noise_is_fixed_by_the_seed():
    x = tf.random.stateless_uniform((8, 784), seed=(1, 0))
    a = draws.salt_and_pepper(x, tf.constant([5, 6])).numpy()
    b = draws.salt_and_pepper(x, tf.constant([5, 6])).numpy()
    c = draws.salt_and_pepper(x, tf.constant([5, 7])).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dynamic_binarisation_follows_the_grey_level():
    x = tf.constant(np.tile(np.linspace(0, 1, 784, dtype=np.float32), (400, 1)))
    binary = draws.bernoulli_pixels(x, tf.constant([0, 1])).numpy()
    assert set(np.unique(binary)) <= {0.0, 1.0}
    np.testing.assert_allclose(binary.mean(axis=0), x.numpy()[0], atol=0.1)
    np.testing.assert_allclose(binary.mean(), 0.5, atol=0.01)


def test_denoising_objective_compares_against_the_clean_image():
    x = tf.fill((2, 784), 0.5)
    seed = tf.constant([3, 4])
    x_input, target = draws.prepare_batch(x, seed, add_noise=True, binarized=False)
    np.testing.assert_array_equal(target.numpy(), x.numpy())
    assert not np.array_equal(x_input.numpy(), x.numpy())
    x_input, target = draws.prepare_batch(x, seed, add_noise=False, binarized=False)
    np.testing.assert_array_equal(x_input.numpy(), x.numpy())
    np.testing.assert_array_equal(target.numpy(), x.numpy())


def test_dropout_equals_tensorflows_stateless_dropout():
    # The product form keeps TensorFlow's numbers: same units kept, same 1/keep scale.
    h = tf.random.stateless_normal((64, 300), seed=(3, 4))
    seed = tf.constant([7, 8], tf.int64)
    ours = draws.dropout(h, 0.6, seed).numpy()
    reference = tf.nn.experimental.stateless_dropout(h, rate=0.4, seed=seed).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert abs(np.mean(ours == 0.0) - 0.4) < 0.01


@pytest.mark.parametrize("uniform_bits", [32, 16])
def test_draws_inside_xla_use_threefry_with_the_same_statistics(uniform_bits):
    """Compiled training chunks draw with threefry and 16-bit uniforms
    (draws.random_algorithm): the noise, binarisation and dropout keep their
    distributions, and the numbers are threefry's, not Philox's (which TensorFlow's CPU
    kernels would have drawn)."""
    seed = tf.constant([1, 2])

    @tf.function(jit_compile=True)
    def draw_all(x, h):
        with draws.random_algorithm("threefry", uniform_bits):
            return (
                draws.salt_and_pepper(x, seed),
                draws.bernoulli_pixels(x, seed),
                draws.dropout(h, 0.6, seed),
                draws.split_seed(seed, 3),
                draws.batch_uniform(tf.shape(h), seed),
            )

    x, h = tf.fill((200, 784), 0.5), tf.ones((200, 500))
    noised, binary, dropped, seeds, uniform = (t.numpy() for t in draw_all(x, h))
    # As test_salt_and_pepper_statistics: 156,800 pixels (100,000 units), so a
    # fraction has a standard error of at most 0.0016; 0.005 is three of them.
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
    assert not np.array_equal(noised, draws.salt_and_pepper(x, seed).numpy())
    philox_seeds = tf.random.experimental.stateless_split(seed, 3, alg="philox").numpy()
    assert not np.array_equal(seeds, philox_seeds)


def test_draws_outside_xla_are_philox_from_one_key_kernel():
    """Outside `random_algorithm` blocks the draws are Philox's numbers (as
    `alg="philox"` gives them), asked for as auto_select: TensorFlow then derives
    the key from the seed in one kernel, where `alg="philox"` builds dozens of ops
    per draw into every uncompiled step."""
    seed = tf.constant([7, 8])
    shape = (4, 6)
    np.testing.assert_array_equal(
        draws.split_seed(seed, 3),
        tf.random.experimental.stateless_split(seed, 3, alg="philox"),
    )
    np.testing.assert_array_equal(
        draws.batch_uniform(shape, seed),
        tf.random.stateless_uniform(shape, seed, alg="philox"),
    )
    np.testing.assert_array_equal(
        draws.batch_draw(tf.random.stateless_normal, shape, seed, tf.float32),
        tf.random.stateless_normal(shape, seed, alg="philox"),
    )

    def ops_in(draw) -> int:
        return len(tf.function(draw).get_concrete_function(seed).graph.get_operations())

    ours = ops_in(lambda s: draws.split_seed(s, 3))
    explicit = ops_in(lambda s: tf.random.experimental.stateless_split(s, 3, alg="philox"))
    assert ours < explicit / 2, (ours, explicit)


def test_16_bit_uniforms_are_the_halves_of_32_bit_draws():
    """k / 2^16 for the low halves of the draws, then their high halves, cut to the width."""
    seed = tf.constant([4, 5])
    uniform = draws.stateless_uniform16((3, 5), seed, tf.float32, "philox").numpy()
    bits = tf.random.stateless_uniform(
        (3, 3), seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox"
    ).numpy()
    k = np.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[:, :5]
    np.testing.assert_array_equal(uniform, k.astype(np.float32) / 2**16)
