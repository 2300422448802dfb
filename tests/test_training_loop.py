"""The compiled training loop: chunks, padding, NaN stop, determinism, precision."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_FLAGS, XLA_OFF, single_run_dir

import cvae
import data_utils
import main
import train
import utils

SMALL = dict(n_z=2, n_hidden=(32, 32, 32, 32), keep_prob=0.6)


def make_chunk(images, labels, optimizer=None, jit_compile=False):
    """A small model and its compiled chunk over (images, labels)."""
    model = cvae.CVAE(**SMALL)
    optimizer = optimizer or keras.optimizers.Adam(1e-3)
    chunk = cvae.make_train_chunk(
        model, optimizer, tf.constant(images), tf.constant(labels), cvae.Objective(add_noise=True),
        jit_compile=jit_compile,
    )  # fmt: skip
    return model, chunk


def run_chunk(chunk, batches, seeds, start=0, stop=None):
    stop = len(batches) if stop is None else stop
    batches = tf.constant(batches, tf.int32)
    zeros = tf.zeros(len(cvae.TERMS), tf.float64)
    sums, done = chunk(batches, seeds, tf.constant(start), tf.constant(stop), zeros)
    return dict(zip(cvae.TERMS, sums.numpy().tolist(), strict=True)), int(done)


def quiet_epoch(chunk, n_images, generator, batch_size, steps_per_chunk):
    with redirect_stdout(io.StringIO()):
        return train.train_one_epoch(
            chunk, n_images, generator, batch_size, steps_per_chunk=steps_per_chunk
        )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_epoch_does_not_depend_on_the_chunk_size(splits, jit_compile):
    x, y = data_utils.scale(splits.train_images[:100]), splits.train_y[:100]
    results = []
    # 7 steps: one per chunk, chunks of 3, 3 and 1, or all 7 in one. Each size builds its
    # own model, which XLA compiles anew (seconds each): there, uneven chunks against one.
    for steps_per_chunk in (3, 50) if jit_compile else (1, 3, 50):
        model, chunk = make_chunk(x, y, jit_compile=jit_compile)
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
    pixels, y = splits.train_images[:64], splits.train_y[:64]
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
    x, y = data_utils.scale(splits.train_images[:8]), splits.train_y[:8]
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
    """Per-term sums over 2 steps of 4 images: about 4·2·(the mean per image)."""
    x, y = data_utils.scale(splits.train_images[:8]), splits.train_y[:8]
    _, chunk = make_chunk(x, y)
    seeds = tf.constant([[1, 1], [1, 2]], tf.int64)
    sums, done = run_chunk(chunk, [[0, 1, 2, 3], [4, 5, 6, 7]], seeds)
    assert done == 2
    np.testing.assert_allclose(sums["loss"], sums["recon"] + sums["kl"], rtol=1e-6)
    # Untrained logits are near 0, so −log p(x|z) is near 784·log 2 per image.
    assert 8 * 300 < sums["recon"] < 8 * 900


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_chunk_stops_at_the_first_non_finite_step(splits, jit_compile):
    x = data_utils.scale(splits.train_images[:8])
    x[5] = np.nan  # In the second batch below.
    _, chunk = make_chunk(x, splits.train_y[:8], jit_compile=jit_compile)
    seeds = tf.constant([[0, 1], [0, 2], [0, 3]], tf.int64)
    sums, done = run_chunk(chunk, [[0, 1], [4, 5], [2, 3]], seeds)
    assert done == 2
    assert not np.isfinite(sums["recon"])


def test_epoch_names_the_non_finite_step(splits):
    x = np.full((40, 784), np.nan, np.float32)
    _, chunk = make_chunk(x, splits.train_y[:40])
    generator = tf.random.Generator.from_seed(0)
    with pytest.raises(train.NonFiniteLoss, match=r"at epoch 1, step 1 of 4: loss=nan, recon=nan"):
        quiet_epoch(chunk, 40, generator, 10, steps_per_chunk=3)


def test_same_seed_gives_the_same_metrics(tiny_run, tmp_path):
    code = main.main([*TINY_FLAGS, "--add_noise", "True", "--results_dir", str(tmp_path)])
    assert code == 0
    again = utils.read_csv(single_run_dir(tmp_path) / "metrics.csv")
    first = utils.read_csv(tiny_run / "metrics.csv")
    assert len(first) == len(again) == 2
    for row_a, row_b in zip(first, again, strict=True):
        for key in row_a:
            if key != "seconds":
                np.testing.assert_allclose(float(row_a[key]), float(row_b[key]), rtol=1e-5)


def test_mixed_precision_keeps_float32_weights_and_outputs(splits):
    model = cvae.CVAE(**SMALL, dtype_policy="mixed_float16")
    x, y = (
        tf.constant(data_utils.scale(splits.train_images[:4])),
        tf.one_hot(splits.train_y[:4], 10),
    )
    mean, std = model.encode(x, y)
    logits = model.decode(mean, y)
    assert mean.dtype == std.dtype == logits.dtype == tf.float32
    assert model.enc_hidden1.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_mixed_precision_run_trains(tmp_path):
    # Loss scaling skips the first steps while it lowers its scale from 2¹⁵, so
    # give it enough steps to learn something.
    flags = ["--n_train", "512", "--epochs", "2", "--batch_size", "32", "--n_hidden", "64"]
    # Not compiled: XLA took 37 s longer to compile float16 steps on a CPU than the run
    # takes without it, and mixed precision is for GPUs.
    flags += ["--learning_rate", "1e-3", *XLA_OFF]
    out = io.StringIO()
    with redirect_stdout(out):
        code = main.main([*flags, "--mixed_precision", "--results_dir", str(tmp_path)])
    assert code == 0
    assert "mixed_float16" in out.getvalue()
    rows = utils.read_csv(single_run_dir(tmp_path) / "metrics.csv")
    losses = [float(row["train_loss"]) for row in rows]
    assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_multi_worker_without_tf_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = main.main(["--strategy", "multi_worker", "--results_dir", str(tmp_path)])
    assert code == 1
    assert "TF_CONFIG" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fused_adam_follows_keras_adam():
    """Same maths as keras.optimizers.Adam, step for step, and the same slot variables."""
    results = []
    for optimizer in (keras.optimizers.Adam(1e-2), cvae.FusedAdam(1e-2)):
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
