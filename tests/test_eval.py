"""Evaluation: the importance-weighted estimator against a closed form, the label
marginal, the denoising measures, and `--eval_only` on the shared tiny run."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import cvae
import data_utils
import main
import train
import utils

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

    # Compiled, as in the evaluation, with a chunk that does not divide K.
    @tf.function
    def estimate(seed):
        return cvae.iw_log_likelihood(
            model.log_likelihood_fn(model.x),
            tf.constant(model.q_mean),
            tf.constant(model.q_std),
            n_samples=5000,
            seed=seed,
            chunk_size=300,
        )

    exact = model.log_px()
    assert np.all(model.elbo() < exact - 0.1)  # The proposal is far enough off to matter.
    np.testing.assert_allclose(estimate(tf.constant([1, 2], tf.int64)).numpy(), exact, atol=0.05)


def test_iw_estimate_does_not_depend_on_the_chunk_size():
    # The chunk size bounds memory (cvae.IW_MAX_ROWS); the draws are the samples'.
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


# --- Denoising measures ---


def test_psnr_hand_computed():
    reference = np.zeros((2, 4))
    estimate = np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # MSE 0.25/4 = 1/16 -> 10 log10(16) dB; a perfect copy hits the 1e-10 MSE floor.
    np.testing.assert_allclose(train.psnr(reference, estimate), [10 * math.log10(16), 100.0])
    assert train.psnr(reference[:1], estimate[:1] * 255, peak=255.0)[0] == pytest.approx(
        10 * math.log10(16)
    )


def test_binary_cross_entropy_hand_computed():
    target = np.array([[1.0, 0.0], [1.0, 1.0]])
    prob = np.array([[0.5, 0.25], [0.0, 1.0]])
    expected = [
        (math.log(2) + math.log(4 / 3)) / 2,
        -math.log(train.BCE_EPS) / 2,  # A hard 0 where the truth is 1 costs −log eps.
    ]
    np.testing.assert_allclose(train.binary_cross_entropy(target, prob), expected, rtol=1e-6)


def test_median_filter_on_a_known_image():
    image = np.zeros((28, 28), np.float32)
    image[3, 3] = 1.0  # Isolated salt: removed.
    image[10:15, 10:15] = 1.0  # A 5×5 square: only its corners (4 of 9 on) go.
    image[12, 12] = 0.0  # Pepper inside the square: filled.
    expected = np.zeros_like(image)
    expected[10:15, 10:15] = 1.0
    for row, col in ((10, 10), (10, 14), (14, 10), (14, 14)):
        expected[row, col] = 0.0
    filtered = train.median_filter(image.reshape(1, -1))
    np.testing.assert_array_equal(filtered.reshape(28, 28), expected)


def test_denoising_metrics_rank_a_perfect_restoration_first():
    rng = np.random.default_rng(0)
    clean = (rng.uniform(size=(5, 784)) < 0.2).astype(np.float32)
    noised = np.where(rng.uniform(size=clean.shape) < 0.3, 1.0 - clean, clean)
    metrics = train.denoising_metrics(clean, noised, restored=clean)
    assert metrics["denoise_psnr_cvae"] == 100.0
    assert metrics["denoise_psnr_noised"] == pytest.approx(10 * math.log10(1 / 0.3), abs=0.3)
    assert metrics["denoise_bce_cvae"] < metrics["denoise_bce_noised"]


def test_denoising_metrics_do_not_depend_on_the_chunk():
    rng = np.random.default_rng(1)
    clean = rng.uniform(size=(25, 784)).astype(np.float32)
    noised = rng.uniform(size=clean.shape).astype(np.float32)
    restored = rng.uniform(size=clean.shape).astype(np.float32)
    whole = train.denoising_metrics(clean, noised, restored, chunk=25)
    for chunk in (1, 7, 10):
        parts = train.denoising_metrics(clean, noised, restored, chunk=chunk)
        assert parts.keys() == whole.keys()
        for key, value in whole.items():
            assert parts[key] == pytest.approx(value, rel=1e-12)


# --- The CVAE's held-out inputs ---


def test_prepare_heldout_draws_what_evaluate_elbo_draws(splits):
    # As compute_test_metrics combines them: the test ELBO without noise, prepare_heldout
    # with the run's noise; its targets must be the binary images that ELBO scored.
    model = cvae.CVAE(n_z=2, n_hidden=(16, 16, 16, 16))
    x, labels = (
        tf.constant(data_utils.scale(splits.test_images[:250])),
        tf.constant(splits.test_y[:250]),
    )
    eval_step = cvae.make_eval_step(model, add_noise=False, binarize=True)
    expected = cvae.heldout_elbo(eval_step, x, labels, seed=5, batch_size=100)
    x_input, target = cvae.prepare_heldout(x, 5, add_noise=True, binarize=True, batch_size=100)
    losses = []
    for i, start in enumerate(range(0, 250, 100)):
        _, seed_model = cvae._eval_seeds(tf.constant([5, i], tf.int64))
        part = slice(start, start + 100)
        y = data_utils.one_hot(labels[part])
        losses.append(cvae.negative_elbo(model, target[part], target[part], y, seed_model)["loss"])
    assert float(tf.reduce_mean(tf.concat(losses, 0))) == pytest.approx(expected["loss"])
    assert set(np.unique(target.numpy())) == {0.0, 1.0}
    assert np.mean(x_input.numpy() != target.numpy()) > 0.01  # The noise is there.


def test_a_denoising_run_scores_the_clean_test_image(tiny_run, splits):
    config = main.Config.from_json(json.loads((tiny_run / "config.json").read_text()))
    assert config.add_noise and config.binarize == "none"
    state = train.build_state(config)
    model, checkpoint = state.model, state.checkpoint
    latest = tf.train.latest_checkpoint(str(tiny_run / "checkpoints"))
    checkpoint.restore(latest).assert_existing_objects_matched()
    saved = json.loads((tiny_run / "metrics.json").read_text())
    n, k = saved["n_eval"], saved["iw_samples"]
    x, labels = (
        tf.constant(data_utils.scale(splits.test_images[:n])),
        tf.constant(splits.test_y[:n]),
    )

    def test_elbo(add_noise: bool) -> float:
        step = cvae.make_eval_step(model, add_noise=add_noise, binarize=False)
        return cvae.heldout_elbo(step, x, labels, train.TEST_SEED)["loss"]

    def nll_x_given_y(images: tf.Tensor) -> float:
        log_px_y = cvae.iw_log_likelihoods(model, images, k, train.IW_SEED, verbose=False)
        return -float(tf.reduce_mean(tf.gather(log_px_y, labels, batch_dims=1)))

    clean, noised = test_elbo(add_noise=False), test_elbo(add_noise=True)
    assert saved["test_loss"] == pytest.approx(clean, rel=1e-6)
    # Apart by 100 times the tolerance above, so that it can tell them apart (a
    # barely trained model, as this one, is nearly blind to its input).
    assert abs(noised - clean) > 1e-4 * clean
    x_noised, _ = cvae.prepare_heldout(x, train.TEST_SEED, add_noise=True, binarize=False)
    assert saved["test_nll_x_given_y"] == pytest.approx(nll_x_given_y(x), rel=1e-6)
    assert abs(nll_x_given_y(x_noised) - nll_x_given_y(x)) > 1e-4 * saved["test_nll_x_given_y"]


# --- The script: --eval_only and its flags ---

EXPECTED_KEYS = {
    "epochs",
    "n_eval",
    "iw_samples",
    "test_loss",
    "test_recon",
    "test_kl",
    "test_nll_x_given_y",
    "test_nll_x",
    "test_classifier_error",
    *(f"denoise_{m}_{c}" for m in ("psnr", "bce") for c in ("noised", "median", "cvae")),
    "eval_seconds",
    "train_seconds",
    "checkpoint",
}


def test_eval_only_reproduces_the_end_of_training_metrics(tiny_run, tmp_path):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert set(trained) == EXPECTED_KEYS
    assert (trained["n_eval"], trained["iw_samples"]) == (200, 5)  # TINY_FLAGS

    assert main.main(["--eval_only", str(run_dir), "--n_eval", "200", "--iw_samples", "5"]) == 0

    evaluated = json.loads((run_dir / "metrics.json").read_text())
    assert set(evaluated) == EXPECTED_KEYS
    assert all(value is not None for value in evaluated.values())  # A noise run has them all.
    for key in EXPECTED_KEYS - {"eval_seconds", "checkpoint"}:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key
    assert evaluated["test_nll_x_given_y"] < evaluated["test_loss"]  # IW is the tighter bound.
    assert evaluated["test_nll_x"] <= evaluated["test_nll_x_given_y"] + math.log(10)
    assert 0.0 <= evaluated["test_classifier_error"] <= 100.0
    # The previous metrics.json is kept, byte for byte, and the source run is untouched.
    kept = list(run_dir.glob("metrics.*.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == (tiny_run / "metrics.json").read_bytes()
    assert not list(tiny_run.glob("metrics.*.json"))


def test_eval_only_with_iw_samples_zero_skips_the_likelihoods(tiny_run, tmp_path):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    # A run without the last epoch's pictures gets them drawn, identical to the originals.
    removed = [*sorted(p.name for p in run_dir.glob("*epoch002.png")), "curves.png"]
    assert len(removed) == 15
    for name in removed:
        (run_dir / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.png")}
    assert main.main(["--eval_only", str(run_dir), "--n_eval", "50", "--iw_samples", "0"]) == 0
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["n_eval"] == 50
    assert evaluated["test_nll_x"] is None and evaluated["test_classifier_error"] is None
    assert evaluated["denoise_psnr_cvae"] is not None
    for name in removed:
        assert (run_dir / name).read_bytes() == (tiny_run / name).read_bytes(), name
    assert {n: (run_dir / n).stat().st_mtime_ns for n in kept} == kept  # Others untouched.


def test_eval_only_flags(tiny_run, tmp_path, capsys):
    config = main.parse_args(["--eval_only", str(tiny_run), "--iw_samples", "7"])
    assert (config.add_noise, config.iw_samples, config.n_eval) == (True, 7, None)
    assert config.eval_only == str(tiny_run) and config.resume is None
    resumed = main.parse_args(["--resume", str(tiny_run), "--iw_samples", "7", "--n_eval", "9"])
    assert (resumed.iw_samples, resumed.n_eval) == (7, 9)
    bad = [
        (["--eval_only", str(tiny_run), "--n_z", "5"], "drop --n_z"),
        (["--eval_only", str(tmp_path)], "no config.json"),
        (["--eval_only", str(tiny_run), "--resume", str(tiny_run)], "exclude each other"),
        (["--iw_samples", "-1"], "--iw_samples must be >= 0"),
        (["--n_eval", "10001"], "--n_eval must be between 1 and 10000"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            main.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_eval_only_without_checkpoints_is_a_clear_error(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_run / "config.json", run_dir)
    assert main.main(["--eval_only", str(run_dir)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_only_of_a_folder_without_metrics_csv_is_a_clear_error(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "metrics.csv").unlink()
    assert main.main(["--eval_only", str(run_dir)]) == 1
    assert f"--eval_only {run_dir}: no metrics.csv there" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_bytes() == (tiny_run / "metrics.json").read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
def test_eval_only_of_an_unwritable_folder_is_a_clear_error(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)
    run_dir.chmod(0o500)
    try:
        assert main.main(["--eval_only", str(run_dir)]) == 1
    finally:
        run_dir.chmod(0o700)
    assert "metrics.json cannot be written" in capsys.readouterr().err


def test_ctrl_c_in_the_final_evaluation_says_how_to_evaluate(
    tiny_run, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "compute_test_metrics", interrupted)
    # The run has done its epochs: resuming it goes straight to the final evaluation.
    assert main.main(["--resume", str(run_dir)]) == utils.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "the training finished and its checkpoints are saved" in err
    assert f"python main.py --eval_only {run_dir}" in err
    assert "before a checkpoint could be saved" not in err
