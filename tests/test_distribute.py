"""MirroredStrategy on two logical CPU devices trains as one device does.

Logical devices must be configured before TensorFlow initialises its devices,
which the test session has already done, so the comparison runs in a fresh
Python process and reports back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import utils  # First: it quiets TensorFlow's start-up chatter.
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import cvae, data_utils, main, steps, train

splits = data_utils.load_dataset("mnist")
x = tf.constant(data_utils.scale(splits.train_images[:64]))
y = tf.constant(splits.train_labels[:64])

def sgd_steps(strategy, objective):
    # Plain SGD: a wrongly scaled loss would show in the weights (Adam hides it).
    with strategy.scope():
        model = cvae.CVAE(n_z=2, n_hidden=(32, 32, 32, 32), keep_prob=0.6, seed=1)
        optimizer = keras.optimizers.SGD(1e-3)
    before = [v.numpy() for v in model.trainable_variables]
    chunk = steps.make_train_chunk(model, optimizer, x, y, objective, strategy, jit_compile=False)
    # Two full batches of 24 and a short one of 13 (odd: one replica gets a padding row).
    order = list(range(61)) + [-1] * 11
    batches = tf.constant(order, tf.int32)[None].numpy().reshape(3, 24)
    seeds = tf.random.experimental.stateless_split(tf.constant([7, 7], tf.int64), 3)
    zeros = tf.zeros(len(steps.TERMS), tf.float64)
    sums, done = chunk(tf.constant(batches), seeds, tf.constant(0), tf.constant(3), zeros)
    updates = [(v.numpy() - b).tolist() for v, b in zip(model.trainable_variables, before)]
    return dict(zip(steps.TERMS, sums.numpy().tolist())), int(done), updates

# One MirroredStrategy for the whole process: two would reuse collective keys.
mirrored = train.make_strategy(main.parse_args(["--strategy", "mirrored"]))
# The ELBO, and the importance-weighted bound (K = 3) with the KL warm-up on: its
# (rows, K, Z) draw of ε must split over the replicas as the rows do.
objectives = {
    "elbo": steps.Objective(add_noise=True),
    "iw": steps.Objective(add_noise=True, train_samples=3, kl_warmup_steps=2),
}
results = {}
for name, strategy in [("one", tf.distribute.get_strategy()), ("two", mirrored)]:
    for kind, objective in objectives.items():
        found = dict(zip(("sums", "done", "updates"), sgd_steps(strategy, objective)))
        results[f"{name}-{kind}"] = {**found, "replicas": strategy.num_replicas_in_sync}

runs = {}
for name in ("none", "mirrored"):
    out = f"{sys.argv[1]}/{name}"
    # --xla off: a one-replica run compiles with XLA and draws with threefry, the
    # mirrored run (never compiled) with Philox; without XLA both draw the same numbers.
    flags = ["--n_train", "300", "--epochs", "2", "--batch_size", "64", "--seed", "3",
             "--add_noise", "True", "--n_hidden", "64", "--results_dir", out, "--strategy", name,
             "--xla", "off", "--n_eval", "100", "--iw_samples", "0"]
    config = main.parse_args(flags)
    assert train.run(config, mirrored if name == "mirrored" else None) == 0
    (run_dir,) = [p for p in __import__("pathlib").Path(out).iterdir()]
    runs[name] = utils.read_csv(run_dir / "metrics.csv")
results["runs"] = runs
print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
def test_two_replicas_train_like_one_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    results = json.loads(line.removeprefix("RESULT "))
    for kind in ("elbo", "iw"):
        _assert_same_steps(results[f"one-{kind}"], results[f"two-{kind}"])

    single, mirrored = results["runs"]["none"], results["runs"]["mirrored"]
    assert len(single) == len(mirrored) == 2
    # Epoch means of the same terms: 1e-4 as for the sums below. The 10 Adam steps
    # (lr 1e-4) keep the two runs' weights as close as their rounding (seen: 4e-8).
    for row_a, row_b in zip(single, mirrored, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "valid_loss"):
            np.testing.assert_allclose(float(row_b[key]), float(row_a[key]), rtol=1e-4)


def _assert_same_steps(one: dict, two: dict) -> None:
    """Three SGD steps on one device and on two replicas: the same sums and updates."""
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["done"] == two["done"] == 3
    # Each replica sums its 12 rows and the replicas' sums are added, where one device
    # sums 24: another order, and other matmul kernels for the other shapes. As in
    # test_padding_rows_weigh_nothing, the longest sums have n = 794 terms, each off
    # by up to n·u ≈ 5e-5 of its terms' magnitudes: 1e-4. These totals over 61
    # images are of terms >= 0; an image counted twice or not at all moves them by ~1/61.
    for name in ("loss", "recon", "kl"):
        np.testing.assert_allclose(two["sums"][name], one["sums"][name], rtol=1e-4)
    # The weight updates, not the weights: a wrongly scaled gradient shows there.
    # Against each variable's largest update: 1e-4 for the sums behind it, as above,
    # plus the weights' own rounding. SGD(1e-3) moves dec_out's weights (up to 0.57) by
    # at most 2.9e-3; each of the 3 steps rounds them to float32, which may differ by an
    # ulp (6e-8) between the runs: 1.8e-7, 6e-5 of that update. Hence 2e-4; a gradient
    # scaled by the wrong batch size is off by 1/2 or more.
    for a, b in zip(one["updates"], two["updates"], strict=True):
        a, b = np.array(a), np.array(b)
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * np.abs(a).max())
