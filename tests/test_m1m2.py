"""M1+M2 (Kingma et al. 2014, issue 26): a plain VAE (M1, `--conditional False`), and M2 on
its latent features (`--features RUN`).

The Gaussian likelihood against its closed form in float64, and the ten-label bound over
Gaussian features against a loop over labels; a plain VAE has no label inputs, and its
steps and its whole run are bit-identical with the labels scrambled; the features are
drawn afresh at each step from M1's posterior [mean ‖ std] (these tests fail if the
posterior mean is used instead), and M1's folder is never written; end to end through
main.py: M1, M2 on its features, an exact resume and --eval_only of the M2 run; the flag
combinations and the M1 runs that are refused, in one line.

The end-to-end tests share one tiny M1 run (`m1_run`) and one set of M2 runs on it
(`m2_runs`), both module-scoped.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    XLA_OFF,
    numpy_bernoulli_nll,
    one_error_line,
    restore_run_model,
    rows_without_seconds,
    run_config,
    single_run_dir,
    ten_label_reference,
    tree,
    whole_and_resumed_runs,
)

import checkpoints
import cvae
import data_utils
import draws
import evaluate
import features
import main
import steps
import train
import utils

C = data_utils.N_CLASSES
LOG_2PI = math.log(2.0 * math.pi)

# The brief's tiny M1 and M2 (issue 26, "Tests"): 300 images, 16 units, n_z 4, XLA off.
M1_FLAGS = [
    *("--conditional", "False", "--n_train", "300", "--n_z", "4", "--n_hidden", "16"),
    *("--epochs", "1", "--batch_size", "64", "--n_eval", "100", "--iw_samples", "2", *XLA_OFF),
]


def m2_flags(m1_dir: Path) -> list[str]:
    """M2 with 20 labels on the features of the M1 run in `m1_dir` (no --epochs)."""
    return [
        *("--features", str(m1_dir), "--n_labeled", "20", "--n_train", "300"),
        *("--n_hidden", "16", "--n_z", "4", "--batch_size", "64"),
        *("--n_eval", "100", "--iw_samples", "2", *XLA_OFF),
    ]


@pytest.fixture(scope="module")
def pixels() -> data_utils.Splits:
    """The real MNIST splits, loaded once for this file."""
    return data_utils.load_dataset("mnist")


def run_main(argv: list[str]) -> tuple[int, str]:
    """main.main(argv) -> (exit code, what it printed to stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main.main(argv)
    return code, out.getvalue()


class M1Run(NamedTuple):
    folder: Path
    stdout: str


@pytest.fixture(scope="module")
def m1(tmp_path_factory) -> M1Run:
    """One tiny M1 through the real main.py, shared by this file; tests never modify it."""
    results = tmp_path_factory.mktemp("m1")
    code, out = run_main([*M1_FLAGS, "--results_dir", str(results)])
    assert code == 0, out
    return M1Run(single_run_dir(results), out)


class M2Runs(NamedTuple):
    whole: Path  # Three epochs in one go.
    resumed: Path  # One epoch, then --resume to three.
    m1_tree_before: dict[str, str]  # Every file of M1's folder -> sha256, before any M2 ran.


@pytest.fixture(scope="module")
def m2_runs(m1, tmp_path_factory) -> M2Runs:
    """M2 on M1's features through the real main.py: 3 epochs, and 1 resumed to 3."""
    before = tree(m1.folder)
    with contextlib.redirect_stdout(io.StringIO()):
        whole, resumed = whole_and_resumed_runs(m2_flags(m1.folder), tmp_path_factory.mktemp("m2"))
    return M2Runs(whole, resumed, before)


KERNEL = "model/{}/_kernel/.ATTRIBUTES/VARIABLE_VALUE"  # A layer's kernel in a checkpoint.


def checkpoint_values(run_dir: Path) -> dict[str, np.ndarray]:
    """Every variable of the run's latest epoch-end checkpoint, by name."""
    path = tf.train.latest_checkpoint(str(run_dir / utils.CHECKPOINTS_DIR))
    return {
        name: tf.train.load_variable(path, name)
        for name, _ in tf.train.list_variables(path)
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"  # Names Python objects by their creation.
    }


def assert_same_checkpoints(a: Path, b: Path) -> None:
    values_a, values_b = checkpoint_values(a), checkpoint_values(b)
    assert values_a.keys() == values_b.keys()
    for name, value in values_a.items():
        np.testing.assert_array_equal(value, values_b[name], err_msg=name)


def metrics_without_seconds(run_dir: Path) -> dict:
    """metrics.json without its wall-clock times (`*_seconds`)."""
    values = json.loads((run_dir / utils.METRICS_JSON).read_text())
    return {k: v for k, v in values.items() if not k.endswith("_seconds")}


def weights(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.trainable_variables]


# --- 1. The Gaussian log-likelihood ----------------------------------------------------------


def numpy_gaussian_log_pdf(x, mean, log_var) -> np.ndarray:
    """log N(x; mean, σ²) per element in float64, written as −log σ − ½ log 2π − ½ ((x−m)/σ)²
    with σ = e^(log_var / 2): scipy.stats.norm.logpdf's form (scipy is not installed)."""
    sigma = np.exp(0.5 * np.asarray(log_var, np.float64))
    r = (np.asarray(x, np.float64) - mean) / sigma
    return -np.log(sigma) - 0.5 * LOG_2PI - 0.5 * r * r


def test_gaussian_log_likelihood_against_its_closed_form():
    rng = np.random.default_rng(0)
    x, mean, log_var = (rng.uniform(-8.0, 8.0, (7, 13)) for _ in range(3))
    got = cvae.gaussian_log_likelihood(*(tf.constant(a, tf.float64) for a in (x, mean, log_var)))
    assert got.dtype == tf.float64 and got.shape == (7,)
    expected = numpy_gaussian_log_pdf(x, mean, log_var).sum(axis=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # At its mean with unit variance: −D/2 · log 2π.
    at_mean = cvae.gaussian_log_likelihood(
        tf.constant(x), tf.constant(x), tf.zeros((7, 13), tf.float64)
    )
    np.testing.assert_allclose(at_mean.numpy(), np.full(7, -13 / 2 * LOG_2PI), rtol=1e-15)
    # A density: in one dimension, e^(log N) over a fine grid integrates to 1.
    grid = np.linspace(-40.0, 40.0, 400_001)[:, None]
    for m, lv in ((0.0, 0.0), (1.5, -3.0), (-2.0, 2.0)):
        log_pdf = cvae.gaussian_log_likelihood(
            tf.constant(grid),
            tf.constant(np.full_like(grid, m)),
            tf.constant(np.full_like(grid, lv)),
        )
        density = np.exp(log_pdf.numpy())
        area = np.sum((density[1:] + density[:-1]) / 2.0) * (grid[1, 0] - grid[0, 0])
        assert area == pytest.approx(1.0, abs=1e-9), (m, lv)


def test_the_gaussian_model_reads_mean_and_log_variance_and_starts_knowing_nothing():
    """`log_likelihood` splits the decoder's 2d outputs into mean ‖ log-variance,
    `mean_output` keeps the mean; a fresh Gaussian decoder outputs 0 (N(0, I)) whatever z,
    and so scores features as features.know_nothing_nats says."""
    d = 3
    model = cvae.CVAE(n_z=2, n_hidden=(8,) * 4, n_pixels=d, likelihood="gaussian")
    assert model.dec_out.kernel.shape == (8, 2 * d)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (5, d)).astype(np.float32)
    decoded = rng.normal(0, 1, (5, 2 * d)).astype(np.float32)
    np.testing.assert_allclose(
        model.log_likelihood(tf.constant(x), tf.constant(decoded)).numpy(),
        numpy_gaussian_log_pdf(x, decoded[:, :d], decoded[:, d:]).sum(1),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(model.mean_output(tf.constant(decoded)).numpy(), decoded[:, :d])
    fresh = model.decode(tf.constant(rng.normal(0, 3, (5, 2)), tf.float32), draws.one_hot([0] * 5))
    np.testing.assert_array_equal(fresh.numpy(), np.zeros((5, 2 * d), np.float32))
    table = np.concatenate([x, np.zeros_like(x)], axis=1)  # std 0: z1 = the means
    nats = -float(tf.reduce_mean(model.log_likelihood(tf.constant(x), fresh)))
    assert nats == pytest.approx(features.know_nothing_nats(table), rel=1e-6)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        cvae.CVAE(n_z=2, n_hidden=(8,) * 4, likelihood="poisson")


# --- 2. The ten-label bound over Gaussian features --------------------------------------------

B, Z, D_FEATURES = 5, 3, 6
# Float32 sums of 6 terms of a few nats, against float64: a few 1e-6 relative; near-zero
# terms (a density above 1 gives a negative −log) need the absolute part.
RTOL, ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def feature_model():
    """A tiny M2 over 6 Gaussian features, dropout on, its decoder's output layer made
    random (it starts at 0, where every label and z would decode alike), and 5 rows of
    real-valued features."""
    model = cvae.CVAE(
        n_z=Z, n_hidden=(16,) * 4, keep_prob=0.8, seed=2, n_pixels=D_FEATURES,
        likelihood="gaussian", classifier=True,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    for variable in (model.dec_out.kernel, model.dec_out.bias):
        variable.assign(rng.normal(0.0, 0.3, variable.shape).astype(np.float32))
    x = rng.normal(0.0, 1.5, (B, D_FEATURES)).astype(np.float32)
    return model, tf.constant(x)


def test_ten_label_bound_over_gaussian_features_against_a_loop_over_labels(feature_model):
    """Dropout off: label by label, the encoder and decoder called on one-hot c, z with the
    pass's own ε for (image, c), and −log N and the KL written out in float64."""
    model, x = feature_model
    seed = tf.constant([3, 1], tf.int64)
    terms = cvae.negative_elbo_all_labels(model, x, x, seed)

    def gaussian_nll(xs: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        mean, log_var = decoded[:, :D_FEATURES], decoded[:, D_FEATURES:]
        return -numpy_gaussian_log_pdf(xs, mean, log_var).sum(axis=1)

    expected = ten_label_reference(model, x, seed, gaussian_nll)
    for name in ("recon", "kl", "loss"):
        got = terms[name].numpy()
        np.testing.assert_allclose(got, expected[name], rtol=RTOL, atol=ATOL, err_msg=name)
    # The labels matter, in the reconstruction too: equal columns would be a pass that
    # ignored them.
    for name in ("recon", "kl"):
        assert np.abs(np.diff(terms[name].numpy(), axis=1)).min() > 1e-3, name


def test_ten_label_bound_over_gaussian_features_is_the_elbo_of_every_label_row(feature_model):
    """Dropout on: the same draws (dropout masks, ε) as `negative_elbo` on the B·C rows."""
    model, x = feature_model
    seed = tf.constant([7, 8], tf.int64)
    terms = cvae.negative_elbo_all_labels(model, x, x, seed, training=True)
    x_rows, y_rows = tf.repeat(x, C, axis=0), draws.one_hot(tf.tile(tf.range(C), [B]))
    rows = cvae.negative_elbo(model, x_rows, x_rows, y_rows, seed, training=True)
    for name in ("loss", "recon", "kl"):
        np.testing.assert_allclose(
            terms[name].numpy(), tf.reshape(rows[name], (B, C)).numpy(), rtol=RTOL, atol=ATOL
        )


# --- 3. A plain VAE ---------------------------------------------------------------------------


def test_a_plain_vae_has_no_label_inputs():
    model = cvae.CVAE(n_z=3, n_hidden=(16, 12, 14, 10), conditional=False)
    assert model.enc_hidden1.kernel.shape == (data_utils.N_PIXELS, 16)
    assert model.dec_hidden1.kernel.shape == (3, 14)
    n_weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert n_weights == cvae.parameter_count(3, (16, 12, 14, 10), conditional=False)
    assert n_weights == cvae.parameter_count(3, (16, 12, 14, 10)) - C * (16 + 14)
    # The label arguments are ignored: any labels, or none, give the same outputs.
    x = tf.random.stateless_uniform((4, data_utils.N_PIXELS), [1, 2])
    z = tf.random.stateless_normal((4, 3), [3, 4])
    outputs = [
        (*model.encode(x, y), model.decode(z, y))
        for y in (draws.one_hot([0, 1, 2, 3]), draws.one_hot([9, 9, 9, 9]), tf.zeros((4, 0)))
    ]
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # As the run builds it from `--conditional False`.
    config = main.parse_args(["--conditional", "False", "--n_z", "4", "--n_hidden", "16"])
    state = checkpoints.build_state(config)
    assert state.model.enc_hidden1.kernel.shape == (data_utils.N_PIXELS, 16)
    assert state.model.dec_hidden1.kernel.shape == (4, 16)
    assert not state.model.conditional and not state.model.has_classifier


@pytest.mark.parametrize(
    "objective",
    [steps.Objective(), steps.Objective(add_noise=True, binarized=True, train_samples=2)],
    ids=["elbo", "noise-binarized-k2"],
)
def test_plain_vae_steps_do_not_depend_on_the_labels(pixels, objective):
    """Five compiled steps with the true labels and with permuted ones: the same weights,
    Adam slots and sums to the bit. A conditional model given the same two label sets
    ends elsewhere, so the comparison can tell."""
    n, batch = 160, 32
    images = pixels.train_images[:n]
    labels = pixels.train_labels[:n]
    permuted = labels[np.random.default_rng(0).permutation(n)]
    assert np.mean(permuted != labels) > 0.8
    batches = steps.epoch_batches(n, batch, tf.constant([5, 6], tf.int64))
    seeds = tf.random.stateless_uniform((5, 2), [7, 8], minval=0, maxval=2**30, dtype=tf.int64)

    def train(step_labels: np.ndarray, conditional: bool):
        model = cvae.CVAE(n_z=3, n_hidden=(16,) * 4, keep_prob=0.8, seed=1, conditional=conditional)
        optimizer = steps.FusedAdam(1e-3)
        optimizer.build(model.trainable_variables)
        chunk = steps.make_train_chunk(
            model, optimizer, tf.constant(images), tf.constant(step_labels), objective
        )
        sums, done = chunk(batches, seeds, tf.constant(0), tf.constant(5), tf.zeros(3, tf.float64))
        assert int(done) == 5 and np.isfinite(sums.numpy()).all()
        return sums.numpy(), [v.numpy() for v in optimizer.variables], weights(model)

    true_sums, true_slots, true_weights = train(labels, conditional=False)
    sums, slots, trained = train(permuted, conditional=False)
    np.testing.assert_array_equal(sums, true_sums)
    for a, b in zip([*trained, *slots], [*true_weights, *true_slots], strict=True):
        np.testing.assert_array_equal(a, b)

    _, _, conditional_true = train(labels, conditional=True)
    _, _, conditional_permuted = train(permuted, conditional=True)
    assert not np.array_equal(conditional_true[0], conditional_permuted[0])


@pytest.mark.slow
def test_a_plain_vae_run_end_to_end(m1, pixels):
    """M1 through main.py: no label rows in its checkpoint, its canvases without the
    per-label ones, and IW −log p(x) only, which is recomputed here in NumPy from the
    checkpoint's model (one column, no label: nothing like log 10 subtracted)."""
    folder = m1.folder
    assert folder.name.endswith("_vae")
    assert "A plain VAE (--conditional False)" in m1.stdout
    values = checkpoint_values(folder)
    shapes = {name: value.shape for name, value in values.items()}
    assert shapes[KERNEL.format("enc_hidden1")] == (784, 16)
    assert shapes[KERNEL.format("dec_hidden1")] == (4, 16)
    assert not any("cls_" in name for name in values)
    names = {p.name for p in folder.rglob("*.png")}  # Wherever the layout puts them.
    assert any(n.startswith("manifold") for n in names), names
    assert any(n.startswith("latent") for n in names), names
    assert not [n for n in names if n.startswith(("manifold_label", "analogy"))], names

    metrics = json.loads((folder / utils.METRICS_JSON).read_text())
    assert metrics["test_nll_x_given_y"] is None and metrics["test_classifier_error"] is None
    assert "test_q_error" not in metrics
    assert "-log p(x), K=2" in m1.stdout and "-log p(x|y)" not in m1.stdout
    assert evaluate.FEATURES_NOTE not in m1.stdout

    _, model = restore_run_model(folder)
    x = data_utils.scale(pixels.test_images[:100]).astype(np.float64)
    mean, std = model.encode(tf.constant(x, tf.float32), tf.zeros((100, 0)))
    batch_seed = tf.constant([evaluate.IW_SEED, 0], tf.int64)  # seeded_batches' first batch
    log_w = []
    for k in range(2):
        fold = tf.random.experimental.stateless_fold_in(batch_seed, k)
        eps = tf.random.stateless_normal(mean.shape, seed=fold)
        z = mean + std * eps
        logits = model.decode(z, tf.zeros((100, 0))).numpy()
        eps64, z64, std64 = (t.numpy().astype(np.float64) for t in (eps, z, std))
        log_ratio = np.sum(0.5 * eps64**2 - 0.5 * z64**2 + np.log(std64), axis=1)
        log_w.append(-numpy_bernoulli_nll(x, logits) + log_ratio)
    log_px = np.logaddexp(*log_w) - math.log(2)
    assert metrics["test_nll_x"] == pytest.approx(-np.mean(log_px), rel=1e-5)


@pytest.mark.slow
def test_a_plain_vae_run_is_bit_identical_with_the_labels_scrambled(m1, monkeypatch, tmp_path):
    """The same run with every split's labels permuted: metrics.csv (but its seconds),
    metrics.json (but its times) and every checkpoint variable, to the bit."""
    real_load = train.load_splits
    scrambled_splits = []

    def scrambled(config):
        splits = real_load(config)
        rng = np.random.default_rng(11)
        parts = {}
        for part in ("train", "valid", "test"):
            labels = getattr(splits, f"{part}_labels")
            parts[f"{part}_images"] = getattr(splits, f"{part}_images")
            parts[f"{part}_labels"] = labels[rng.permutation(len(labels))]
            assert np.mean(parts[f"{part}_labels"][:300] != labels[:300]) > 0.8
        scrambled_splits.append(parts)
        return data_utils.Splits(**parts)

    monkeypatch.setattr(train, "load_splits", scrambled)
    code, out = run_main([*M1_FLAGS, "--results_dir", str(tmp_path)])
    assert code == 0, out
    assert len(scrambled_splits) == 1  # The run read the scrambled labels.
    run_dir = single_run_dir(tmp_path)
    assert rows_without_seconds(run_dir) == rows_without_seconds(m1.folder)
    assert metrics_without_seconds(run_dir) == metrics_without_seconds(m1.folder)
    assert_same_checkpoints(run_dir, m1.folder)


# --- 4. Features drawn afresh at each step; M1 never written ---------------------------------


def feature_table(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows [mean ‖ std] (n, 2d) float32 as FeatureSource.splits gives them, the stds
    spread over two decades."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 1.5, (n, d))
    std = np.exp(rng.uniform(np.log(0.05), np.log(3.0), (n, d)))
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def test_features_are_sampled_not_the_mean():
    table = feature_table(8, 3)
    rows, mean = tf.constant(table), table[:, :3]
    a = draws.sample_features(rows, tf.constant([1, 2], tf.int64)).numpy()
    b = draws.sample_features(rows, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == b.shape == mean.shape
    assert np.all(a != b) and np.all(a != mean) and np.all(b != mean)
    np.testing.assert_array_equal(
        a, draws.sample_features(rows, tf.constant([1, 2], tf.int64)).numpy()
    )  # A seed is one draw: a resumed step redraws the same z1.
    # The step's inputs: one z1, both the encoder's input and the target.
    z_input, target = steps.batch_inputs(
        rows, tf.constant([1, 2], tf.int64), steps.Objective(features=True)
    )
    np.testing.assert_array_equal(z_input.numpy(), a)
    np.testing.assert_array_equal(target.numpy(), a)


def test_feature_draws_over_many_seeds_are_standard_normal_noise():
    """ε = (z1 − mean)/std over 4,000 seeds × 8 rows × 3 dims (96,000 values): its mean is
    0 ± 0.02 (the standard error is 0.0032) and its variance 1 ± 0.03 (0.0046); per
    element (4,000 draws) the mean is 0 ± 0.1 and the variance 1 ± 0.15 (each about 6
    standard errors), so the std scales each element; P(|ε| < 1) is 0.683 ± 0.01; two
    consecutive seeds' draws are uncorrelated, |r| < 0.02."""
    n_seeds = 4000
    table = feature_table(8, 3, seed=1)
    mean, std = table[:, :3].astype(np.float64), table[:, 3:].astype(np.float64)

    @tf.function
    def draw_all(rows, seeds):
        return tf.map_fn(
            lambda s: draws.sample_features(rows, s), seeds, fn_output_signature=tf.float32
        )

    seeds = tf.stack(
        [tf.fill([n_seeds], tf.constant(9, tf.int64)), tf.range(n_seeds, dtype=tf.int64)], 1
    )
    z1 = draw_all(tf.constant(table), seeds).numpy().astype(np.float64)
    eps = (z1 - mean) / std  # (seeds, 8, 3)
    assert abs(eps.mean()) < 0.02 and abs(eps.var() - 1.0) < 0.03
    assert np.abs(eps.mean(axis=0)).max() < 0.1
    assert np.abs(eps.var(axis=0) - 1.0).max() < 0.15
    assert abs(np.mean(np.abs(eps) < 1.0) - 0.6827) < 0.01
    flat = eps.reshape(n_seeds, -1)
    r = np.corrcoef(flat[:-1].ravel(), flat[1:].ravel())[0, 1]
    assert abs(r) < 0.02


# One M2 step on a table of features: rows 0..7 unlabelled (two padding rows), then four
# labelled rows from 30..39.
STEP_BATCH = [[0, 1, 2, 3, 4, 5, 6, 7, -1, -1, 30, 31, 35, 31]]
STEP_SEED = [[2, 3]]
FEATURE_OBJECTIVE = steps.Objective(labelled_batch=4, labelled_share=0.1, alpha=0.1, features=True)
D_STEP = 3
LR = 0.05


def one_m2_step(table: np.ndarray, labels: np.ndarray):
    """One compiled M2 step (SGD) on `table`; returns (weights before, after, sums)."""
    model = cvae.CVAE(
        n_z=2, n_hidden=(16,) * 4, keep_prob=0.8, seed=4, n_pixels=D_STEP,
        likelihood="gaussian", classifier=True,
    )  # fmt: skip
    chunk = steps.make_train_chunk(
        model, keras.optimizers.SGD(LR), tf.constant(table), tf.constant(labels),
        FEATURE_OBJECTIVE,
    )  # fmt: skip
    before = weights(model)
    sums, done = chunk(
        tf.constant(STEP_BATCH, tf.int32), tf.constant(STEP_SEED, tf.int64), tf.constant(0),
        tf.constant(1), tf.zeros(3, tf.float64),
    )  # fmt: skip
    assert int(done) == 1
    return model, before, weights(model), sums.numpy()


def test_an_m2_step_on_features_draws_z1_from_the_posterior(pixels):
    """One step on a table [mean ‖ std] against the same table with std 0 gives other
    weights: a step that read the means only would give the same. And the step is one SGD
    step on m2_loss with z1 = mean + std·ε, ε from the step's own seed, written out here."""
    table = feature_table(40, D_STEP, seed=2)
    labels = pixels.train_labels[:40]
    _, before, after, sums = one_m2_step(table, labels)
    _, _, again, _ = one_m2_step(table, labels)
    for a, b in zip(after, again, strict=True):
        np.testing.assert_array_equal(a, b)  # Deterministic: the difference below is std's.
    no_std = table.copy()
    no_std[:, D_STEP:] = 0.0
    _, _, at_means, _ = one_m2_step(no_std, labels)
    changed = [not np.array_equal(a, b) for a, b in zip(after, at_means, strict=True)]
    assert any(changed)
    assert changed[0], "the encoder's first kernel must see another z1"

    # The step written out: the same model, freshly built, one SGD step.
    model = cvae.CVAE(
        n_z=2, n_hidden=(16,) * 4, keep_prob=0.8, seed=4, n_pixels=D_STEP,
        likelihood="gaussian", classifier=True,
    )  # fmt: skip
    step_seed = tf.constant(STEP_SEED[0], tf.int64)
    seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(step_seed, 2))
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 30, 31, 35, 31])
    mean, std = table[rows, :D_STEP], table[rows, D_STEP:]
    eps = tf.random.stateless_normal(mean.shape, seed=seed_batch).numpy()
    z1 = tf.constant(mean + std * eps)
    m2 = cvae.M2Batch(z1[:10], z1[:10], z1[10:], z1[10:], tf.constant(labels[rows[10:]]))
    weight_u = tf.constant([1.0] * 8 + [0.0] * 2)
    with tf.GradientTape() as tape:
        unlabelled, labelled = cvae.m2_terms(model, m2, seed_model)
        terms = cvae.m2_loss(unlabelled, labelled, weight_u, 0.1, 0.1)
    grads = tape.gradient(terms["objective"], model.trainable_variables)
    np.testing.assert_allclose(sums[0], 8 * float(terms["loss"]), rtol=1e-5)
    for start, end, grad in zip(before, after, grads, strict=True):
        update = end - start
        np.testing.assert_allclose(
            update, -LR * grad.numpy(), atol=1e-4 * np.abs(update).max() + 1e-12
        )


@pytest.mark.slow
def test_m2_training_leaves_every_file_of_m1_unchanged(m1, m2_runs):
    """Three M2 runs read M1 (a new run, a new run and its resume): M1's folder hashes
    the same, file by file (checkpoints, metrics, events, canvases)."""
    assert tree(m1.folder) == m2_runs.m1_tree_before
    assert any(name.startswith("checkpoints/ckpt-1") for name in m2_runs.m1_tree_before)


# --- 5. End to end: M1, M2 on its features, an exact resume, --eval_only ----------------------


@pytest.mark.slow
def test_m2_on_m1_features_resumes_exactly(m2_runs):
    whole, resumed = m2_runs.whole, m2_runs.resumed
    assert whole.name.endswith("_labels20_m1-features")
    rows = rows_without_seconds(whole)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows == rows_without_seconds(resumed)
    assert metrics_without_seconds(whole) == metrics_without_seconds(resumed)
    assert_same_checkpoints(whole, resumed)
    metrics = json.loads((whole / utils.METRICS_JSON).read_text())
    assert metrics["epochs"] == 3 and 0.0 <= metrics["test_q_error"] <= 100.0
    assert all(0.0 <= float(row["valid_q_error"]) <= 100.0 for row in rows)
    # The model reads d features by a Gaussian: its decoder's output is 2d wide, and its
    # first kernels take d features (+ 10 labels) and n_z (+ 10 labels).
    d = len(json.loads((whole / utils.CONFIG_FILE).read_text())["features_source"]["active_dims"])
    shapes = {name: value.shape for name, value in checkpoint_values(whole).items()}
    assert shapes[KERNEL.format("enc_hidden1")] == (d + C, 16)
    assert shapes[KERNEL.format("cls_hidden1")] == (d, 16)
    assert shapes[KERNEL.format("dec_out")] == (16, 2 * d)


@pytest.mark.slow
def test_m2_config_records_the_m1_run_and_its_active_dims(m1, m2_runs, pixels):
    """config.json's features_source: M1's folder, the checkpoint its metrics.json
    evaluated, and the dims whose posterior means vary over the 300 training images by
    more than ACTIVE_STD, recomputed here from M1's checkpoint. A resume keeps it."""
    _, m1_model = restore_run_model(m1.folder)
    x = tf.constant(data_utils.scale(pixels.train_images[:300]))
    means = m1_model.encode(x, tf.zeros((300, 0)))[0].numpy()
    active = np.flatnonzero(means.std(axis=0) > features.ACTIVE_STD).tolist()
    assert active, "the tiny M1 must use a dim for this test to mean anything"
    m1_checkpoint = json.loads((m1.folder / utils.METRICS_JSON).read_text())["checkpoint"]
    for run_dir in (m2_runs.whole, m2_runs.resumed):
        saved = json.loads((run_dir / utils.CONFIG_FILE).read_text())
        assert saved["features"] == str(m1.folder)
        assert saved["features_source"] == {
            "run": str(m1.folder), "checkpoint": m1_checkpoint, "active_dims": active,
            "weights_sha256": features.weights_digest(m1_model),
        }  # fmt: skip
        assert run_config(run_dir).features == str(m1.folder)


@pytest.mark.slow
def test_the_feature_tables_are_m1s_posterior(m1, pixels):
    """What M2 reads (FeatureSource.splits): training rows [mean ‖ std] of q(z1|x) on the
    active dims, the std > 0 (a fresh z1 per step needs it), validation and test rows the
    means; recomputed here from M1's checkpoint. And back through M1's decoder."""
    config = main.parse_args([*m2_flags(m1.folder), "--epochs", "1"])
    with contextlib.redirect_stdout(io.StringIO()):
        source = features.open_source(config, pixels.train_images[:300])
    d = len(source.active)
    small = data_utils.Splits(*(getattr(pixels, f.name)[:200] for f in fields(data_utils.Splits)))
    tables = source.splits(small)
    _, m1_model = restore_run_model(m1.folder)

    def posterior(images):
        mean, std = m1_model.encode(tf.constant(data_utils.scale(images)), tf.zeros((200, 0)))
        return mean.numpy()[:, source.active], std.numpy()[:, source.active]

    mean, std = posterior(small.train_images)
    assert tables.train_images.shape == (200, 2 * d) and tables.train_images.dtype == np.float32
    np.testing.assert_allclose(tables.train_images[:, :d], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tables.train_images[:, d:], std, rtol=1e-5, atol=1e-6)
    assert std.min() > 0.01
    for part in ("valid", "test"):
        np.testing.assert_allclose(
            getattr(tables, f"{part}_images"), posterior(getattr(small, f"{part}_images"))[0],
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
        np.testing.assert_array_equal(
            getattr(tables, f"{part}_labels"), getattr(small, f"{part}_labels")
        )
    # And back: M2's features on the active dims, the prior's mean 0 on the others.
    z1 = np.zeros((200, m1_model.n_z), np.float32)
    z1[:, source.active] = mean
    expected = m1_model.mean_output(m1_model.decode(tf.constant(z1), tf.zeros((200, 0))))
    np.testing.assert_array_equal(source.decode(tf.constant(mean)).numpy(), expected.numpy())


@pytest.mark.slow
def test_an_m2_run_reopens_m1_from_any_working_directory(m1, pixels, monkeypatch, tmp_path):
    """`--features` given relative to the working directory; the resume (or --eval_only)
    that reopens what config.json recorded runs from another one."""
    monkeypatch.chdir(m1.folder.parent)
    flags = [*m2_flags(Path(m1.folder.name)), "--epochs", "1"]
    config = main.parse_args(flags)
    with contextlib.redirect_stdout(io.StringIO()):
        recorded = features.open_source(config, pixels.train_images[:300]).record()
        monkeypatch.chdir(tmp_path)
        reopened = features.open_source(config, pixels.train_images[:300], recorded)
    assert reopened.run_dir.resolve() == m1.folder.resolve()


@pytest.mark.slow
def test_a_resume_refuses_an_m1_whose_weights_changed(m1, pixels, tmp_path):
    """M1's checkpoint rewritten with other weights under the same name (its folder
    copied, one bias nudged): reopening the record refuses in one line; the record
    itself, and one made before the digest existed, reopen."""
    copy = tmp_path / "m1"
    shutil.copytree(m1.folder, copy)
    config = main.parse_args([*m2_flags(copy), "--epochs", "1"])
    with contextlib.redirect_stdout(io.StringIO()):
        recorded = features.open_source(config, pixels.train_images[:300]).record()
        features.open_source(config, pixels.train_images[:300], recorded)
        older = {k: v for k, v in recorded.items() if k != "weights_sha256"}
        features.open_source(config, pixels.train_images[:300], older)
    m1_config = run_config(copy)
    model = cvae.CVAE(m1_config.n_z, m1_config.hidden_sizes, 1.0, conditional=False)
    prefix = str(copy / utils.CHECKPOINTS_DIR / recorded["checkpoint"])
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    model.dec_out.bias.assign_add(tf.fill(model.dec_out.bias.shape, 1e-3))
    checkpoint = tf.train.Checkpoint(model=model)
    checkpoint.save_counter  # noqa: B018 (created on first use; M1's checkpoints have one)
    checkpoint.write(prefix)
    refusal = pytest.raises(utils.UserError, match="holds other weights than this run was")
    with refusal, contextlib.redirect_stdout(io.StringIO()):
        features.open_source(config, pixels.train_images[:300], recorded)


@pytest.mark.slow
def test_m2_test_error_is_q_of_m1s_posterior_means(m1, m2_runs, pixels):
    """metrics.json's test_q_error is argmax q(y|x) of the M2 checkpoint on M1's posterior
    means of the first 100 test digits (active dims), recomputed here."""
    saved = json.loads((m2_runs.whole / utils.CONFIG_FILE).read_text())
    active = saved["features_source"]["active_dims"]
    _, m1_model = restore_run_model(m1.folder)
    x = tf.constant(data_utils.scale(pixels.test_images[:100]))
    means = tf.gather(m1_model.encode(x, tf.zeros((100, 0)))[0], active, axis=1)
    config = run_config(m2_runs.whole)
    state = checkpoints.build_state(config, n_features=len(active))
    latest = tf.train.latest_checkpoint(str(m2_runs.whole / utils.CHECKPOINTS_DIR))
    state.checkpoint.restore(latest).assert_existing_objects_matched()
    predicted = np.argmax(state.model.classifier_logits(means).numpy(), axis=1)
    expected = 100.0 * np.mean(predicted != pixels.test_labels[:100])
    metrics = json.loads((m2_runs.whole / utils.METRICS_JSON).read_text())
    assert metrics["test_q_error"] == pytest.approx(expected)


@pytest.mark.slow
def test_eval_only_of_an_m2_run(m1, m2_runs, tmp_path, capsys):
    """--eval_only of (a copy of) the M2 run reopens M1 as config.json says and scores
    the same checkpoint the same, in feature nats; the old metrics.json is kept. Flags
    that would change the source are refused."""
    copy = tmp_path / m2_runs.whole.name
    shutil.copytree(m2_runs.whole, copy)
    assert main.main(["--eval_only", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"M1 features: {m1.folder} (ckpt-1)" in out
    assert evaluate.FEATURES_NOTE in out
    assert metrics_without_seconds(copy) == metrics_without_seconds(m2_runs.whole)
    assert len(list(copy.glob("metrics.*.json"))) == 1
    assert tree(m1.folder) == m2_runs.m1_tree_before

    for argv in (
        ["--eval_only", str(copy), "--features", str(tmp_path)],
        ["--resume", str(copy), "--features", str(tmp_path), "--epochs", "4"],
        ["--resume", str(copy), "--conditional", "False", "--epochs", "4"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main.parse_args(argv)
        assert exit_info.value.code == 2, argv
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error:" in error and ("--features" in error or "--conditional" in error)


# --- 6. Refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--conditional", "False", "--n_labeled", "20"],
            "--n_labeled trains M2, which is conditional: drop --conditional False",
        ),
        (
            ["--conditional", "False", "--features", "X"],
            "--features trains on M1's features a conditional model: drop --conditional False",
        ),
        (["--features", "X", "--add_noise", "True"], "--features: drop --add_noise True:"),
        (["--features", "X", "--binarize", "dynamic"], "--features: drop --binarize dynamic:"),
        (
            [
                "--features",
                "X",
                "--n_labeled",
                "20",
                "--add_noise",
                "True",
                "--binarize",
                "dynamic",
            ],
            "--features: drop --add_noise True, --binarize dynamic:",
        ),
        (["--features", "X", "--strategy", "mirrored"], "--features: drop --strategy mirrored:"),
    ],
    ids=["vae-labels", "vae-features", "noise", "binarize", "noise-binarize", "strategy"],
)
def test_flags_that_do_not_combine_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        path = folder / utils.CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _remove_checkpoint(folder: Path) -> None:
    name = json.loads((folder / utils.METRICS_JSON).read_text())["checkpoint"]
    for path in (folder / utils.CHECKPOINTS_DIR).glob(f"{name}.*"):
        path.unlink()


def _collapse_posterior(folder: Path) -> None:
    """M1's checkpoint with the mean head of its encoder zeroed: every image's posterior
    mean is 0, so no dim varies over images."""
    config = run_config(folder)
    model = cvae.CVAE(config.n_z, config.hidden_sizes, config.keep_prob, conditional=False)
    name = json.loads((folder / utils.METRICS_JSON).read_text())["checkpoint"]
    prefix = str(folder / utils.CHECKPOINTS_DIR / name)
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    for variable in (model.enc_out.kernel, model.enc_out.bias):
        value = variable.numpy()
        value[..., : config.n_z] = 0.0
        variable.assign(value)
    checkpoint = tf.train.Checkpoint(model=model)
    checkpoint.save_counter  # noqa: B018 (created on first use; M1's checkpoints have one)
    checkpoint.write(prefix)


BAD_M1 = {
    "a conditional run": (_edit_config(conditional=True), "not an M1 run"),
    "an M2 run": (_edit_config(conditional=True, n_labeled=20), "not an M1 run"),
    "no config.json": (lambda f: (f / utils.CONFIG_FILE).unlink(), "no config.json there"),
    "unreadable config.json": (
        lambda f: (f / utils.CONFIG_FILE).write_text("{not json"),
        "cannot read its config.json",
    ),
    "unfinished": (lambda f: (f / utils.METRICS_JSON).unlink(), "has not finished"),
    "checkpoint gone": (_remove_checkpoint, "is gone; retrain M1"),
    "another dataset": (_edit_config(dataset="fashion_mnist"), "M1 was trained on fashion_mnist"),
    "config does not fit": (_edit_config(n_z=5), "does not fit its config.json"),
    "posterior collapsed": (_collapse_posterior, "uses none of its dimensions"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_M1))
def test_a_bad_m1_run_is_refused_in_one_line(case, m1, tmp_path, capsys):
    """M2 on a broken copy of M1: exit 1, one `error:` line naming the folder, and no run
    folder left behind."""
    spoil, message = BAD_M1[case]
    bad = tmp_path / "m1"
    shutil.copytree(m1.folder, bad)
    spoil(bad)
    results = tmp_path / "results"
    code = main.main([*m2_flags(bad), "--epochs", "1", "--results_dir", str(results)])
    assert code == 1
    error = one_error_line(capsys.readouterr())
    assert error.startswith(f"error: --features {bad}: ") and message in error, error
    assert not results.exists() or not any(results.iterdir())


@pytest.mark.slow
def test_a_missing_m1_folder_is_refused_in_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    nowhere = tmp_path / "nowhere"
    code = main.main([*m2_flags(nowhere), "--epochs", "1", "--results_dir", str(results)])
    assert code == 1
    error = one_error_line(capsys.readouterr())
    assert (
        error == f"error: --features {nowhere}: no config.json there; give the folder of an M1 run"
    )
    assert not results.exists() or not any(results.iterdir())
