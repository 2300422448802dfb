"""The compiled training loop: chunks, padding, NaN stop, determinism, precision, and a short
run that must learn."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import XLA_OFF, single_run_dir

import cvae
import data_utils
import draws
import main
import steps
import train
import utils

SMALL = dict(n_z=2, n_hidden=(32, 32, 32, 32), keep_prob=0.6)


def make_chunk(images, labels, optimizer=None, jit_compile=False):
    """A small model and its compiled chunk over (images, labels)."""
    model = cvae.CVAE(**SMALL)
    optimizer = optimizer or keras.optimizers.Adam(1e-3)
    chunk = steps.make_train_chunk(
        model, optimizer, tf.constant(images), tf.constant(labels), steps.Objective(add_noise=True),
        jit_compile=jit_compile,
    )  # fmt: skip
    return model, chunk


def run_chunk(chunk, batches, seeds, start=0, stop=None):
    stop = len(batches) if stop is None else stop
    batches = tf.constant(batches, tf.int32)
    zeros = tf.zeros(len(steps.TERMS), tf.float64)
    sums, done = chunk(batches, seeds, tf.constant(start), tf.constant(stop), zeros)
    return dict(zip(steps.TERMS, sums.numpy().tolist(), strict=True)), int(done)


def quiet_epoch(chunk, n_images, generator, batch_size, steps_per_chunk):
    with redirect_stdout(io.StringIO()):
        return train.train_one_epoch(
            chunk, n_images, generator, batch_size, steps_per_chunk=steps_per_chunk
        )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_epoch_does_not_depend_on_the_chunk_size(splits, jit_compile):
    x, y = data_utils.scale(splits.train_images[:100]), splits.train_labels[:100]
    optimizer = keras.optimizers.Adam(1e-3)
    model, chunk = make_chunk(x, y, optimizer=optimizer, jit_compile=jit_compile)
    optimizer.build(model.trainable_variables)
    # One model and one compiled chunk (XLA compiles it once), set back to the same
    # weights and optimizer state before each epoch.
    state = [*model.variables, *optimizer.variables]
    start = [v.numpy() for v in state]
    results = []
    # 7 steps: one per chunk, chunks of 3, 3 and 1, or all 7 in one.
    for steps_per_chunk in (1, 3, 50):
        for variable, value in zip(state, start, strict=True):
            variable.assign(value)
        generator = tf.random.Generator.from_seed(5)
        means = quiet_epoch(chunk, 100, generator, 16, steps_per_chunk)
        results.append((means, [w.numpy() for w in model.trainable_variables]))
    (first, weights), *others = results
    assert np.isfinite(list(first.values())).all()
    # The same steps in the same order, and the running sums carried through
    # the chunks: the same numbers to the last bit, which is what lets an
    # interrupted epoch resume exactly.
    for means, other_weights in others:
        assert means == first
        for a, b in zip(weights, other_weights, strict=True):
            np.testing.assert_array_equal(a, b)


def test_uint8_pixels_train_exactly_as_their_floats(splits):
    """main.py keeps the training images as uint8 and scales each batch in the graph."""
    pixels, y = splits.train_images[:64], splits.train_labels[:64]
    results = []
    for images in (pixels, data_utils.scale(pixels)):
        model, chunk = make_chunk(images, y)
        means = quiet_epoch(chunk, 64, tf.random.Generator.from_seed(3), 16, 50)
        results.append((means, [w.numpy() for w in model.trainable_variables]))
    (from_pixels, weights), (from_floats, float_weights) = results
    assert from_pixels == from_floats
    for a, b in zip(weights, float_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_padding_rows_weigh_nothing(splits):
    """A short batch padded with -1 trains exactly like the short batch itself."""
    x, y = data_utils.scale(splits.train_images[:8]), splits.train_labels[:8]
    seeds = tf.constant([[4, 2]], tf.int64)
    outcomes = []
    for batch in ([[0, 3, 5]], [[0, 3, 5, -1, -1]]):
        model, chunk = make_chunk(x, y, optimizer=keras.optimizers.SGD(0.1))
        before = [w.numpy().copy() for w in model.trainable_variables]  # Same seeded init.
        sums, done = run_chunk(chunk, batch, seeds)
        after = [w.numpy() for w in model.trainable_variables]
        outcomes.append((sums, [a - b for a, b in zip(after, before, strict=True)]))
    (short, short_updates), (padded, padded_updates) = outcomes
    assert done == 1
    # Equal in exact arithmetic, but 3 rows and 5 rows may get other matmul kernels
    # (oneDNN picks by shape and instruction set), which sum in another order. The
    # longest sums have n = 794 terms (the first layer's inputs; 784 going back
    # through the output layer), each off by up to about n·u ≈ 794 × 6e-8 ≈ 5e-5
    # of its terms' magnitudes: hence 1e-4. A padding row that counted would add
    # an image to these three, changing sums and updates by about 1/3.
    np.testing.assert_allclose(list(padded.values()), list(short.values()), rtol=1e-4)
    # The updates, not the weights, and against each variable's largest update: an
    # element's update can be the small difference of large terms (of about that
    # size), so its own relative error is unbounded (5.5e-5 seen on an AVX2 EPYC).
    for a, b in zip(short_updates, padded_updates, strict=True):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())


def test_sums_are_sums_over_the_images(splits):
    """Per-term sums over 2 steps of 4 images: each image's terms recomputed eagerly with
    the step's own draws (its seed split into the batch's and the model's). SGD with a
    zero rate leaves the weights as they were, so both steps see the same model."""
    x, y = data_utils.scale(splits.train_images[:8]), splits.train_labels[:8]
    model, chunk = make_chunk(x, y, optimizer=keras.optimizers.SGD(0.0))
    seeds = tf.constant([[1, 1], [1, 2]], tf.int64)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    sums, done = run_chunk(chunk, batches, seeds)
    assert done == 2
    expected = dict.fromkeys(steps.TERMS, 0.0)
    for rows, seed in zip(batches, seeds, strict=True):
        seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        x_input, target = draws.prepare_batch(tf.constant(x[rows]), seed_batch, True, False)
        labels = draws.one_hot(tf.constant(y[rows]))
        terms = cvae.negative_elbo(model, x_input, target, labels, seed_model, training=True)
        for name in steps.TERMS:
            expected[name] += float(np.sum(terms[name].numpy().astype(np.float64)))
    # A compiled graph against eager ops, as in test_one_train_step_on_real_images: 1e-5.
    # An image left out or counted twice moves a sum by about 1/8.
    for name in steps.TERMS:
        np.testing.assert_allclose(sums[name], expected[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(sums["loss"], sums["recon"] + sums["kl"], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_chunk_stops_at_the_first_non_finite_step(splits, jit_compile):
    x = data_utils.scale(splits.train_images[:8])
    x[5] = np.nan  # In the second batch below.
    _, chunk = make_chunk(x, splits.train_labels[:8], jit_compile=jit_compile)
    seeds = tf.constant([[0, 1], [0, 2], [0, 3]], tf.int64)
    sums, done = run_chunk(chunk, [[0, 1], [4, 5], [2, 3]], seeds)
    assert done == 2
    assert not np.isfinite(sums["recon"])


def test_epoch_names_the_non_finite_step(splits):
    x = np.full((40, 784), np.nan, np.float32)
    _, chunk = make_chunk(x, splits.train_labels[:40])
    generator = tf.random.Generator.from_seed(0)
    with pytest.raises(utils.NonFiniteLoss, match=r"at epoch 1, step 1 of 4: loss=nan, recon=nan"):
        quiet_epoch(chunk, 40, generator, 10, steps_per_chunk=3)


def test_mixed_precision_keeps_float32_weights_and_outputs(splits):
    model = cvae.CVAE(**SMALL, dtype_policy="mixed_float16")
    x, y = (
        tf.constant(data_utils.scale(splits.train_images[:4])),
        tf.one_hot(splits.train_labels[:4], 10),
    )
    mean, std = model.encode(x, y)
    logits = model.decode(mean, y)
    assert mean.dtype == std.dtype == logits.dtype == tf.float32
    assert model.enc_hidden1.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)


@pytest.mark.slow
def test_mixed_precision_run_trains(tmp_path):
    # Loss scaling skips the first steps while it lowers its scale from 2¹⁵, so
    # give it enough steps to learn something.
    flags = ["--n_train", "512", "--epochs", "2", "--batch_size", "32", "--n_hidden", "64"]
    # Not compiled: XLA compiles float16 steps on a CPU for longer than the run takes
    # without it, and mixed precision is for GPUs.
    flags += ["--learning_rate", "1e-3", *XLA_OFF]
    # The evaluation in float16 too, but of 100 images with K = 2: a CPU without native
    # float16 emulates it (the default 10,000 images × 10 labels × K = 25 ran > 15 min).
    flags += ["--n_eval", "100", "--iw_samples", "2"]
    out = io.StringIO()
    with redirect_stdout(out):
        code = main.main([*flags, "--mixed_precision", "--results_dir", str(tmp_path)])
    assert code == 0
    assert "mixed_float16" in out.getvalue()
    rows = utils.read_csv(single_run_dir(tmp_path) / "metrics.csv")
    losses = [float(row["train_loss"]) for row in rows]
    assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_fused_adam_follows_keras_adam():
    """Same maths as keras.optimizers.Adam, step for step, and the same slot variables."""
    results = []
    for optimizer in (keras.optimizers.Adam(1e-2), steps.FusedAdam(1e-2)):
        start = np.linspace(-1.0, 1.0, 50, dtype=np.float32).reshape(5, 10)
        w = tf.Variable(start)
        optimizer.build([w])
        for i in range(20):
            optimizer.apply_gradients([(tf.sin(w * (i + 1)) + 0.1 * i, w)])
        results.append((w.numpy(), [v.numpy() for v in optimizer.variables]))
    (w_keras, slots_keras), (w_fused, slots_fused) = results
    assert np.abs(w_keras - start).max() > 0.1  # 20 steps of 1e-2 moved the weights.
    # float32 rounding in another order: 1e-5 is 1e-4 of the distance travelled.
    np.testing.assert_allclose(w_fused, w_keras, rtol=1e-5, atol=1e-5)
    assert len(slots_fused) == len(slots_keras)
    for a, b in zip(slots_keras, slots_fused, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# --- A model that learns -------------------------------------------------------------------

# 3,000 images, 3 epochs at --learning_rate 1e-3 (90 steps), the test −ELBO of 1,000 images.
# Seed 1 gave a test −ELBO of 171.95 nats with a KL of 2.24; with the reparameterisation's
# gradient to std cut (z = mean + stop_gradient(std·ε): the same values), 180.05 nats with
# a KL of 0.07. Seeds 2 and 3 gave 174.05 and 170.51 (cut: 181.21 and 178.88), KLs 2.3 to
# 2.5 (cut: 0.05 to 0.10): other draws move the result by up to 3.5 nats. Another CPU
# rounds float32 otherwise in the last bits, which training amplifies, but far less than
# other draws do. So the bound sits midway, 4 nats from either result of seed 1 (more than
# the three seeds' whole spread), and the KL's 1 nat above the collapsed one.
LEARNING_FLAGS = [
    *("--n_train", "3000", "--epochs", "3", "--batch_size", "100", "--learning_rate", "1e-3"),
    *("--seed", "1", "--n_eval", "1000", "--iw_samples", "0", "--plot_every", "100", *XLA_OFF),
]
TEST_ELBO_BOUND = 176.0  # nats; the right code gives 172, a std without gradient 180.
TEST_KL_BOUND = 1.0  # nats; the right code gives 2.2, a std without gradient 0.07.


@pytest.mark.slow
def test_a_short_run_learns_as_far_as_the_right_gradient_takes_it(tmp_path):
    assert main.main([*LEARNING_FLAGS, "--results_dir", str(tmp_path)]) == 0
    metrics = json.loads((single_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["test_loss"] < TEST_ELBO_BOUND, metrics
    assert metrics["test_kl"] > TEST_KL_BOUND, metrics
