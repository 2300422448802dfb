"""M2, semi-supervised learning from few labels (Kingma, Rezende, Mohamed & Welling 2014).

The ten-label pass against the plain −ELBO on repeated rows and against a loop
over labels; the unlabelled bound (eq. 7) against a brute-force loop in
float64; the per-image objective J^α/N (eq. 9) against its formula; the
default path untouched.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import XLA_OFF, restore_run_model, single_run_dir, ten_label_reference

import checkpoints
import cvae
import data_utils
import draws
import evaluate
import main
import steps
import train
import utils
from config import Config

B, Z, C = 5, 3, data_utils.N_CLASSES
TINY = dict(n_z=Z, n_hidden=(16, 16, 16, 16), keep_prob=0.8, seed=2)
# Float32 sums of 784 pixel terms of ~500 nats, in another order (x·W_x + W_y + b
# against concat(x, y)·W + b): 1e-4 relative, as in test_iwae.
RTOL = 1e-4


@pytest.fixture(scope="module")
def batch(splits):
    """A tiny M2 model with dropout, and five binarised digits with their labels."""
    model = cvae.CVAE(**TINY, classifier=True)
    x = (data_utils.scale(splits.train_images[:B]) > 0.5).astype(np.float32)
    return model, tf.constant(x), tf.constant(splits.train_labels[:B])


def rows_of_every_label(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Row i·C + c: image i with one-hot label c."""
    return tf.repeat(x, C, axis=0), draws.one_hot(tf.tile(tf.range(C), [B]))


def test_classifier_is_an_mlp_of_the_encoders_sizes(batch):
    model, x, _ = batch
    assert model.classifier_logits(x).shape == (B, C)
    assert model.cls_hidden1.kernel.shape == (data_utils.N_PIXELS, 16)
    assert model.cls_hidden2.kernel.shape == (16, 16)
    assert model.cls_out.kernel.shape == (16, C)
    # Dropout on and seeded: a seed gives one answer, another seed another.
    seed = tf.constant([1, 2], tf.int64)
    a, b = (model.classifier_logits(x, True, s) for s in (seed, seed + 1))
    np.testing.assert_array_equal(a.numpy(), model.classifier_logits(x, True, seed).numpy())
    assert not np.array_equal(a.numpy(), b.numpy())
    n_weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert n_weights == cvae.parameter_count(Z, TINY["n_hidden"], classifier=True)


def test_the_classifier_leaves_the_default_model_unchanged(batch):
    """Without classifier=True the model is today's (its checkpoints too); with it, the
    encoder and decoder start from the same weights, and the classifier from new seeds."""
    model, _, _ = batch
    plain = cvae.CVAE(**TINY)
    assert not plain.has_classifier and not hasattr(plain, "cls_hidden1")
    assert len(plain.trainable_variables) == 12
    for a, b in zip(plain.trainable_variables, model.trainable_variables[:12], strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    kernels = [model.enc_hidden1.kernel.numpy()[: data_utils.N_PIXELS]]
    kernels.append(model.cls_hidden1.kernel.numpy())
    assert not np.array_equal(*kernels)


def test_ten_label_pass_is_the_elbo_of_every_label_row(batch):
    """Dropout on: the same draws (dropout masks, ε) as `negative_elbo` on the B·C rows
    (image, label), only x·W_x shared."""
    model, x, _ = batch
    seed = tf.constant([7, 8], tf.int64)
    terms = cvae.negative_elbo_all_labels(model, x, x, seed, training=True)
    x_rows, y_rows = rows_of_every_label(x)
    rows = cvae.negative_elbo(model, x_rows, x_rows, y_rows, seed, training=True)
    for name in ("loss", "recon", "kl"):
        assert terms[name].shape == (B, C)
        np.testing.assert_allclose(
            terms[name].numpy(), tf.reshape(rows[name], (B, C)).numpy(), rtol=RTOL
        )
    # The labels matter: a pass that ignored them would give equal columns.
    assert np.abs(np.diff(terms["loss"].numpy(), axis=1)).min() > 1e-3


def test_ten_label_pass_against_a_loop_over_labels(batch):
    """Dropout off: label by label, the encoder and decoder called on one-hot c, with the
    pass's own ε for (image, c), and the terms written out in float64."""
    model, x, _ = batch
    seed = tf.constant([3, 1], tf.int64)
    terms = cvae.negative_elbo_all_labels(model, x, x, seed)

    def bernoulli_nll(xs: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return -np.sum(xs * logits - np.logaddexp(0.0, logits), -1)

    expected = ten_label_reference(model, x, seed, bernoulli_nll)
    for name in ("recon", "kl", "loss"):
        np.testing.assert_allclose(terms[name].numpy(), expected[name], rtol=RTOL, err_msg=name)


def brute_force_unlabelled(loss: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """−U(x) = Σ_y q(y|x)·(−L(x,y)) − H(q), image by image and label by label, float64."""
    result = []
    for row_loss, row_logits in zip(loss, logits, strict=True):
        top = max(row_logits)
        weights = [np.exp(v - top) for v in row_logits]
        q = [w / sum(weights) for w in weights]
        expected = sum(q[y] * row_loss[y] for y in range(C))
        entropy = -sum(q[y] * np.log(q[y]) for y in range(C) if q[y] > 0)
        result.append(expected - entropy)
    return np.array(result)


def test_unlabelled_bound_against_brute_force():
    rng = np.random.default_rng(0)
    loss = rng.uniform(50, 300, (6, C))
    logits = rng.normal(0, 3, (6, C))
    logits[4] = 0.0  # Uniform q: H = log 10.
    logits[5, 3] = 80.0  # q all but one-hot, where a naive log(softmax) underflows.
    recon, kl = 0.7 * loss, 0.3 * loss
    parts = {"loss": loss, "recon": recon, "kl": kl}
    terms = {name: tf.constant(value, tf.float32) for name, value in parts.items()}
    bound = cvae.unlabelled_bound(terms, tf.constant(logits, tf.float32))
    expected = brute_force_unlabelled(loss, logits)
    np.testing.assert_allclose(bound["loss"].numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(bound["objective"].numpy(), bound["loss"].numpy())
    assert bound["entropy"].numpy()[4] == pytest.approx(np.log(C), rel=1e-6)
    assert bound["loss"].numpy()[5] == pytest.approx(loss[5, 3], rel=1e-6)
    assert np.all(np.isfinite(bound["loss"].numpy()))
    # β weighs the KL inside the expectation: −U with L_β = recon + β·kl.
    warm = cvae.unlabelled_bound(terms, tf.constant(logits, tf.float32), tf.constant(0.25))
    expected_warm = brute_force_unlabelled(recon + 0.25 * kl, logits)
    np.testing.assert_allclose(warm["objective"].numpy(), expected_warm, rtol=1e-5)


def test_per_image_objective_weighs_its_parts_as_the_paper():
    """J^α/N = (N_l/N)·mean_l(−L) + (N_u/N)·mean_u(−U) + a·mean_l(−log q); padding rows of
    the unlabelled batch weigh nothing."""
    unlabelled = {k: tf.constant([10.0, 20.0, 999.0]) for k in ("loss", "objective")}
    unlabelled |= {"recon": tf.constant([6.0, 8.0, 999.0]), "kl": tf.constant([4.0, 12.0, 9.0])}
    labelled = {k: tf.constant([100.0, 300.0]) for k in ("loss", "objective")}
    labelled |= {"recon": tf.constant([90.0, 250.0]), "kl": tf.constant([10.0, 50.0])}
    labelled["cross_entropy"] = tf.constant([2.0, 4.0])
    weight_u = tf.constant([1.0, 1.0, 0.0])
    terms = cvae.m2_loss(unlabelled, labelled, weight_u, labelled_share=0.01, alpha=0.1)
    expected = 0.01 * 200.0 + 0.99 * 15.0 + 0.1 * 3.0
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(terms["objective"]) == pytest.approx(expected, rel=1e-6)
    assert float(terms["recon"]) == pytest.approx(0.01 * 170.0 + 0.99 * 7.0, rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(0.01 * 30.0 + 0.99 * 8.0, rel=1e-6)
    assert float(terms["cross_entropy"]) == 3.0
    no_alpha = cvae.m2_loss(unlabelled, labelled, weight_u, labelled_share=0.01, alpha=0.0)
    assert float(terms["loss"]) - float(no_alpha["loss"]) == pytest.approx(0.3, rel=1e-5)


def test_m2_terms_use_no_label_of_the_unlabelled_images(batch):
    """The labelled part is today's −ELBO with its labels, plus −log q(y|x); the unlabelled
    part is −U of the ten-label pass with q's logits on the same rows."""
    model, x, labels = batch
    seed = tf.constant([4, 4], tf.int64)
    m2 = cvae.M2Batch(x[:3], x[:3], x[3:], x[3:], labels[3:])
    unlabelled, labelled = cvae.m2_terms(model, m2, seed, training=False)
    _, seed_u, seed_l = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    logits = model.classifier_logits(x)
    elbo = cvae.negative_elbo(model, x[3:], x[3:], draws.one_hot(labels[3:]), seed_l)
    np.testing.assert_array_equal(labelled["loss"].numpy(), elbo["loss"].numpy())
    log_q = tf.nn.log_softmax(logits[3:]).numpy()
    ce = -log_q[np.arange(2), labels[3:].numpy()]
    np.testing.assert_allclose(labelled["cross_entropy"].numpy(), ce, rtol=1e-5)
    all_labels = cvae.negative_elbo_all_labels(model, x[:3], x[:3], seed_u)
    expected = brute_force_unlabelled(all_labels["loss"].numpy(), logits[:3].numpy())
    np.testing.assert_allclose(unlabelled["loss"].numpy(), expected, rtol=1e-5)


def m2_chunk(images, labels, objective, seed=4):
    model = cvae.CVAE(n_z=2, n_hidden=(32, 32, 32, 32), keep_prob=0.6, seed=seed, classifier=True)
    optimizer = keras.optimizers.SGD(0.01)
    chunk = steps.make_train_chunk(
        model, optimizer, tf.constant(images), tf.constant(labels), objective
    )
    return model, chunk


def test_m2_step_descends_the_objective_and_never_reads_unlabelled_labels(splits):
    """One compiled step equals one SGD step on `m2_loss` of the step's own draws; the
    labels of the unlabelled rows can be anything (here scrambled) without effect."""
    images, labels = data_utils.scale(splits.train_images[:40]), splits.train_labels[:40]
    objective = steps.Objective(binarized=True, labelled_batch=4, labelled_share=0.1, alpha=0.1)
    # Rows 0..9 unlabelled (the last two padding), then four labelled rows from 30..39.
    batch = tf.constant([[0, 1, 2, 3, 4, 5, 6, 7, -1, -1, 30, 31, 35, 31]], tf.int32)
    seed = tf.constant([[2, 3]], tf.int64)
    scrambled = labels.copy()
    scrambled[:30] = (scrambled[:30] + 3) % 10
    updates, sums = [], []
    for step_labels in (labels, scrambled):
        model, chunk = m2_chunk(images, step_labels, objective)
        before = [v.numpy().copy() for v in model.trainable_variables]
        total, done = chunk(batch, seed, tf.constant(0), tf.constant(1), tf.zeros(3, tf.float64))
        assert int(done) == 1
        sums.append(total.numpy())
        after = [v.numpy() for v in model.trainable_variables]
        updates.append([a - b for a, b in zip(after, before, strict=True)])
    np.testing.assert_array_equal(sums[0], sums[1])
    for a, b in zip(*updates, strict=True):
        np.testing.assert_array_equal(a, b)

    model, _ = m2_chunk(images, labels, objective)
    seed_batch, seed_model = tf.unstack(tf.random.experimental.stateless_split(seed[0], 2))
    rows = tf.constant([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 30, 31, 35, 31])
    x_input, target = draws.prepare_batch(tf.gather(images, rows), seed_batch, False, True)
    m2 = cvae.M2Batch(
        x_input[:10], target[:10], x_input[10:], target[10:], tf.gather(labels, rows[10:])
    )
    weight_u = tf.constant([1.0] * 8 + [0.0] * 2)
    with tf.GradientTape() as tape:
        unlabelled, labelled = cvae.m2_terms(model, m2, seed_model)
        terms = cvae.m2_loss(unlabelled, labelled, weight_u, 0.1, 0.1)
    grads = tape.gradient(terms["objective"], model.trainable_variables)
    np.testing.assert_allclose(sums[0][0], 8 * float(terms["loss"]), rtol=1e-5)
    for grad, update in zip(grads, updates[0], strict=True):
        assert np.abs(update).max() > 0  # The classifier learns too.
        np.testing.assert_allclose(update, -0.01 * grad.numpy(), atol=1e-4 * np.abs(update).max())


# --- The labelled subset, the flags, the epoch's batches ---


def test_labelled_subset_is_balanced_seeded_and_sorted(splits):
    labels = splits.train_labels[:600]
    chosen = data_utils.labelled_subset(labels, 50, seed=3)
    assert chosen.dtype == np.int32 and len(chosen) == 50 and len(set(chosen)) == 50
    assert np.all(np.diff(chosen) > 0) and chosen.max() < 600
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=C), [5] * C)
    np.testing.assert_array_equal(chosen, data_utils.labelled_subset(labels, 50, seed=3))
    assert not np.array_equal(chosen, data_utils.labelled_subset(labels, 50, seed=4))
    with pytest.raises(ValueError, match="multiple of 10"):
        data_utils.labelled_subset(labels, 55, seed=3)
    with pytest.raises(ValueError, match="raise --n_train"):
        data_utils.labelled_subset(labels[:100], 100, seed=3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n_labeled", "55"], "multiple of 10"),
        (["--n_labeled", "0"], "multiple of 10"),
        (["--n_labeled", "600", "--n_train", "600"], "no unlabelled image"),
        (["--n_labeled", "100", "--train_samples", "2"], "drop --train_samples"),
        (["--n_labeled", "100", "--strategy", "mirrored"], "drop --strategy mirrored"),
        (["--n_labeled", "100", "--batch_size", "3"], "--batch_size >= 4"),
        (["--alpha", "-1"], "--alpha must be a finite number >= 0"),
        (["--alpha", "nan"], "--alpha must be a finite number >= 0"),
    ],
)
def test_bad_m2_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_m2_config_and_objective():
    config = main.parse_args(["--n_train", "1000", "--n_labeled", "100", "--batch_size", "100"])
    assert config.labelled_batch == 25 and config.steps_per_epoch == 9  # 900 unlabelled
    assert config.run_tags()[-1] == "labels100"
    objective = train.objective(config)
    assert objective.semi_supervised and objective.labelled_share == 0.1
    assert objective.alpha == 0.1 and objective.labelled_batch == 25
    small = main.parse_args(["--n_labeled", "20", "--batch_size", "128"])
    assert small.labelled_batch == 20  # All of them when fewer than a quarter batch.
    default = main.parse_args([])
    assert default.labelled_batch == 0 and not train.objective(default).semi_supervised
    assert default.run_tags() == ["mnist", "nz2", "h500"]


def test_default_epoch_batches_are_todays():
    seed = tf.constant([11, 12], tf.int64)
    order = tf.random.experimental.stateless_shuffle(tf.range(100), seed=seed)
    expected = tf.reshape(tf.pad(order, [[0, 12]], constant_values=-1), (4, 28))
    np.testing.assert_array_equal(steps.epoch_batches(100, 28, seed).numpy(), expected.numpy())


def test_m2_epoch_batches_cycle_through_the_labelled_images():
    labelled = np.array([3, 17, 40, 41, 90], np.int32)
    unlabelled = np.setdiff1d(np.arange(100, dtype=np.int32), labelled)
    split = steps.LabelledSplit(tf.constant(labelled), tf.constant(unlabelled), 2)
    batches = steps.epoch_batches(95, 20, tf.constant([1, 2], tf.int64), split).numpy()
    assert batches.shape == (5, 22)
    shown = batches[:, :20].ravel()
    np.testing.assert_array_equal(np.sort(shown[shown >= 0]), unlabelled)
    assert np.sum(shown < 0) == 5
    drawn = batches[:, 20:].ravel()  # 10 draws: two whole cycles of the five
    for cycle in (drawn[:5], drawn[5:]):
        np.testing.assert_array_equal(np.sort(cycle), labelled)
    again = steps.epoch_batches(95, 20, tf.constant([1, 2], tf.int64), split).numpy()
    np.testing.assert_array_equal(batches, again)


def test_default_objective_never_takes_the_m2_step(splits, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the default path reached the M2 step")

    monkeypatch.setattr(steps, "_apply_m2_step", refuse)
    images, labels = data_utils.scale(splits.train_images[:16]), splits.train_labels[:16]
    model = cvae.CVAE(n_z=2, n_hidden=(8, 8, 8, 8))
    chunk = steps.make_train_chunk(
        model, keras.optimizers.SGD(0.1), tf.constant(images), tf.constant(labels),
        steps.Objective(alpha=0.5),
    )  # fmt: skip
    sums, done = chunk(
        tf.range(16)[None], tf.constant([[1, 2]], tf.int64), tf.constant(0), tf.constant(1),
        tf.zeros(3, tf.float64),
    )  # fmt: skip
    assert int(done) == 1 and np.isfinite(sums.numpy()).all()


def test_an_interrupted_m2_epoch_continues_exactly(splits):
    """A stop after the first chunk, then the rest from the epoch's progress (what a
    Ctrl-C checkpoint holds): the same batches, draws, weights and means as one go."""
    import io
    from contextlib import redirect_stdout

    images, labels = data_utils.scale(splits.train_images[:80]), splits.train_labels[:80]
    labelled = data_utils.labelled_subset(labels, 10, seed=0)
    unlabelled = np.setdiff1d(np.arange(80, dtype=np.int32), labelled)
    split = steps.LabelledSplit(tf.constant(labelled), tf.constant(unlabelled), 4)
    objective = steps.Objective(labelled_batch=4, labelled_share=10 / 80)
    results = []
    for stop_first in (False, True):
        model, chunk = m2_chunk(images, labels, objective)
        generator, progress = tf.random.Generator.from_seed(1), checkpoints.make_epoch_progress()
        with redirect_stdout(io.StringIO()):
            means = train.train_one_epoch(
                chunk, 70, generator, 16, progress=progress, steps_per_chunk=2,
                stop_requested=lambda stop=stop_first: stop, split=split,
            )  # fmt: skip
            if stop_first:
                assert means is None and int(progress.step) == 2
                means = train.train_one_epoch(
                    chunk, 70, generator, 16, progress=progress, split=split
                )
        results.append((means, [v.numpy() for v in model.trainable_variables]))
    (whole, weights), (resumed, resumed_weights) = results
    assert whole == resumed and np.isfinite(list(whole.values())).all()
    for a, b in zip(weights, resumed_weights, strict=True):
        np.testing.assert_array_equal(a, b)


# --- End to end ---

M2_FLAGS = [
    *("--n_train", "600", "--n_labeled", "50", "--batch_size", "64", "--seed", "3"),
    *("--n_eval", "100", "--iw_samples", "2", "--plot_every", "3", *XLA_OFF),
]


@pytest.mark.slow
def test_an_m2_run_trains_and_evaluates_its_classifier(tmp_path, capsys, splits):
    """The real main.py: the labelled subset is balanced, the classifier is in the
    checkpoints, valid_q_error per epoch, and the test's q(y|x) and generative classifier
    errors are those of the last checkpoint's model. (Its exact resume: test_resume.py.)"""
    assert main.main([*M2_FLAGS, "--epochs", "2", "--results_dir", str(tmp_path)]) == 0
    run_dir = single_run_dir(tmp_path)
    assert run_dir.name.endswith("_labels50")
    out = capsys.readouterr().out
    assert "per class [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]" in out and "valid q(y|x) error" in out
    rows = utils.read_csv(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    checkpoint = tf.train.latest_checkpoint(str(run_dir / utils.CHECKPOINTS_DIR))
    names = [name for name, _ in tf.train.list_variables(checkpoint)]
    assert any("cls_hidden1" in name for name in names), names

    # Both errors recomputed from the model on the test images as the run scored them:
    # the first 100, grey-level (no --binarize), seen by the encoder as they are.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _, model = restore_run_model(run_dir)
    x, labels = tf.constant(data_utils.scale(splits.test_images[:100])), splits.test_labels[:100]
    q_predicted = np.argmax(model.classifier_logits(x).numpy(), axis=1)
    assert metrics["test_q_error"] == pytest.approx(100 * np.mean(q_predicted != labels))
    # The last epoch's validation error: of all 5,000 validation images, as they are.
    valid = tf.constant(data_utils.scale(splits.valid_images))
    valid_predicted = np.argmax(model.classifier_logits(valid).numpy(), axis=1)
    valid_error = 100 * np.mean(valid_predicted != splits.valid_labels)
    assert float(rows[-1]["valid_q_error"]) == pytest.approx(valid_error, abs=1e-6)
    log_px_y = evaluate.iw_log_likelihoods(model, x, 2, evaluate.IW_SEED, verbose=False).numpy()
    generative = 100 * np.mean(np.argmax(log_px_y, axis=1) != labels)
    assert metrics["test_classifier_error"] == pytest.approx(generative)


# --- Pictures and the evaluation table ---


def test_analogy_canvas_encodes_with_the_label_q_predicts(splits):
    """An M2 model treats the analogy's test image as unlabelled: its style z is encoded
    with argmax q(y|x), not with the true label."""
    import plot

    config = Config(n_z=2, seed=5, n_labeled=100)
    model = cvae.CVAE(2, (16, 16, 16, 16), keep_prob=0.6, seed=1, classifier=True)
    inputs = train.make_canvas_inputs(splits.test_images, splits.test_labels, config)
    canvas_model = train.canvas_model(model)
    predicted = canvas_model.predict(inputs.analogy_inputs)
    assert not np.array_equal(predicted, inputs.analogy_labels)  # Untrained: a weak guess.
    grid = plot.canvas_arrays(canvas_model, inputs, config).grids["analogy"]
    z = canvas_model.encode(inputs.analogy_inputs, predicted)
    for i in (0, 6):
        expected = canvas_model.decode(np.repeat(z[i : i + 1], 10, 0), np.arange(10))
        np.testing.assert_allclose(grid[i, 1:], expected, atol=1e-4)
    assert train.canvas_model(cvae.CVAE(2, (16, 16, 16, 16))).predict is None


def test_curves_of_an_m2_run_add_the_q_error_panel(tmp_path, saved_figures):
    import plot

    rows = [
        {"epoch": e, "train_loss": 9 - e, "train_recon": 8 - e, "train_kl": e,
         "valid_loss": 10 - e, "valid_recon": 9 - e, "valid_kl": e, "valid_q_error": 50 / e}
        for e in (1, 2, 3)
    ]  # fmt: skip
    plot.plot_curves(tmp_path / "curves.png", rows)
    (figure,) = saved_figures
    assert len(figure.axes) == 4
    assert "J^α" in figure.axes[0].get_title()
    panel = figure.axes[3]
    assert panel.get_title() == "q(y|x) error (%)"
    np.testing.assert_allclose(panel.get_lines()[0].get_ydata(), [50, 25, 50 / 3])


def test_the_table_shows_q_errors_beside_the_generative_classifier():
    metrics = {
        "n_eval": 100, "iw_samples": 5, "test_loss": 1.0, "test_recon": 1.0, "test_kl": 0.0,
        "test_nll_x_given_y": 1.0, "test_nll_x": 1.0, "test_classifier_error": 12.0,
        "test_q_error": 7.5, "by_encoder_input": None, "denoise_psnr_cvae": None,
    }  # fmt: skip
    table = evaluate.format_metrics(metrics, "dynamic")
    assert "classifier error (%)     12.000" in table
    assert "q(y|x) error (%)         7.500" in table
    del metrics["test_q_error"]
    assert "q(y|x)" not in evaluate.format_metrics(metrics, "dynamic")
