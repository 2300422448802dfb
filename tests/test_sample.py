"""sample.py and the SavedModel export: the export loaded without this project gives the
run's own numbers; a prior grid's rows are the labels asked for; images made by another
program are restored; every refusal is one line; nothing is overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import XLA_OFF, canvas_tiles, read_canvas, single_run_dir, tree
from PIL import Image

import data_utils
import main
import sample
from config import Config

PROJECT = Path(__file__).resolve().parents[1]
EVALUATION = ["--seed", "3", "--n_eval", "100", "--iw_samples", "2", *XLA_OFF]
TINY = ["--n_train", "300", "--epochs", "2", "--batch_size", "64", *EVALUATION]
# The run whose samples are judged by its own classifier: five epochs on 3,000 images at
# ten times the default learning rate, enough for its generative classifier to read its
# own prior samples (99 to 100 of 100 for --seed 0 to 3), in seconds.
TRAINED = ["--n_train", "3000", "--epochs", "5", "--learning_rate", "1e-3", *EVALUATION]
KINDS = {
    "cvae": TRAINED,
    "m2": [*TINY, "--n_labeled", "100", "--n_z", "3", "--n_hidden", "100"],
    "vae": [*TINY, "--conditional", "False", "--n_z", "4", "--n_hidden", "100"],
}  # And "features": M2 on the "vae" run's features, in pixels through it.
N_IMAGES = 20  # Test images sent through each export.


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished runs of each kind, trained once through main.main; every one wrote its
    export/ at its end. Tests read them, never modify them."""
    results = tmp_path_factory.mktemp("runs")
    folders = {}
    for kind, flags in [*KINDS.items(), ("features", None)]:
        if kind == "features":  # M1+M2: M2 on the plain VAE's features.
            flags = [*TINY, "--n_labeled", "100", "--n_hidden", "100"]
            flags += ["--features", str(folders["vae"])]
        assert main.main([*flags, "--results_dir", str(results / kind)]) == 0
        folders[kind] = single_run_dir(results / kind)
    return folders


def own_model(run_dir: Path):
    """(model, M1's FeatureSource or None) of the run's latest checkpoint, restored as
    --eval_only restores it, every saved object matched."""
    import tensorflow as tf

    import checkpoints
    import features

    values = json.loads((run_dir / "config.json").read_text())
    config = Config.from_json(values)
    source = None
    if config.features:
        empty = np.zeros((0, data_utils.N_PIXELS), np.uint8)
        source = features.open_source(config, empty, values["features_source"])
    state = checkpoints.build_state(config, n_features=len(source.active) if source else None)
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    checkpoints.restore_checkpoint(state.checkpoint, latest, "test")
    return state.model, source


def own_numbers(run_dir: Path, pixels: np.ndarray, labels: np.ndarray, z: np.ndarray) -> dict:
    """What the run's own model gives, by the project's functions (not export.py's):
    q(z|x,y)'s mean and std, the mean images at z, and p(y|x) (q(y|x), or the
    generative classifier's log p(x|y) by evaluate's importance weighting, with the
    export's K, seed and chunks of samples). A run on M1's features reads and draws
    through M1, as the canvases do (train.canvas_model)."""
    import tensorflow as tf

    import cvae
    import draws
    import evaluate
    import export

    model, source = own_model(run_dir)
    x = source.means(pixels) if source else data_utils.scale(pixels)
    y = draws.one_hot(tf.constant(labels)) if model.conditional else tf.zeros((len(x), 0))
    mean, std = model.encode(tf.constant(x), y)
    images = cvae.mean_image(model, tf.constant(z), tf.constant(labels)).numpy()
    numbers = {
        "encode__mean": mean.numpy(),
        "encode__std": std.numpy(),
        "decode__probabilities": source.decode(tf.constant(images)).numpy() if source else images,
    }
    if model.has_classifier:
        logits = model.classifier_logits(tf.constant(x))
    elif model.conditional:
        logits = evaluate.iw_log_likelihoods(
            model, tf.constant(x), export.CLASSIFY_SAMPLES, evaluate.IW_SEED,
            images_per_batch=export.CLASSIFY_IMAGES, verbose=False,
        )  # fmt: skip
    else:
        return numbers
    numbers["classify__logits"] = logits.numpy()
    numbers["classify__probabilities"] = tf.nn.softmax(logits).numpy()
    numbers["classify__label"] = cvae.classify(logits).numpy()
    return numbers


# Runs in a fresh Python whose path holds the temporary folder and the installed
# packages only: TensorFlow and NumPy, no project module.
BARE_PYTHON = r"""
import importlib.util, json
import numpy as np
import tensorflow as tf

assert importlib.util.find_spec("cvae") is None, "the project is on the path"
inputs = np.load("inputs.npz")
outputs = {}
for kind, path in json.load(open("exports.json")).items():
    signatures = tf.saved_model.load(path).signatures
    image, label = tf.constant(inputs["image"]), tf.constant(inputs["label"])
    z = tf.constant(inputs[f"{kind}__z"])
    calls = {
        "encode": lambda: signatures["encode"](image=image, label=label),
        "decode": lambda: signatures["decode"](z=z, label=label),
        "classify": lambda: signatures["classify"](image=image),
        "decode_other": lambda: signatures["decode"](z=z, label=(label + 1) % 10),
    }
    for call, run in calls.items():
        if call.split("_")[0] in signatures:
            for name, value in run().items():
                outputs[f"{kind}__{call}__{name}"] = value.numpy()
    outputs[f"{kind}__signatures"] = np.array(sorted(signatures))
np.savez("outputs.npz", **outputs)
"""


@pytest.fixture(scope="module")
def bare(runs, splits, tmp_path_factory) -> tuple[dict, dict]:
    """(inputs, outputs) of every run's export/ called in a fresh Python process without
    the project on its path (cwd a temporary folder, PYTHONPATH unset)."""
    folder = tmp_path_factory.mktemp("bare")
    rng = np.random.default_rng(0)
    inputs = {
        "pixels": splits.test_images[:N_IMAGES].reshape(N_IMAGES, -1),
        "image": data_utils.scale(splits.test_images[:N_IMAGES]),
        "label": splits.test_labels[:N_IMAGES].astype(np.int32),
    }
    for kind, run_dir in runs.items():
        n_z = json.loads((run_dir / "export" / "model.json").read_text())["n_z"]
        inputs[f"{kind}__z"] = rng.standard_normal((N_IMAGES, n_z)).astype(np.float32)
    np.savez(folder / "inputs.npz", **inputs)
    exports = {kind: str(run_dir / "export") for kind, run_dir in runs.items()}
    (folder / "exports.json").write_text(json.dumps(exports))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", BARE_PYTHON], cwd=folder, env=env, capture_output=True,
        text=True, timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(folder / "outputs.npz") as outputs:
        return inputs, dict(outputs)


# The export runs the same float32 operations as the run's own model on the same batch
# (the importance samples too: same seed, same chunks), and the SavedModel holds the
# weights bit for bit; most numbers come out equal. A loaded graph may still fuse or
# order a sum differently (the measured gap: 2e-7 on pixel probabilities, nothing
# elsewhere), and float32 carries 6e-8 relative, which a decoder's 500-term sums can
# grow to 3e-5 in the worst case. Hence atol 1e-5 on means, stds and probabilities (of
# order 1: a thousandth of a grey level), and rtol 1e-5 on log p(x|y) (~300 nats: 3e-3
# nats, far below the gaps between labels that decide the class).
ATOL, RTOL = 1e-5, 1e-5


@pytest.mark.slow  # Trains four runs, starts a Python.
@pytest.mark.parametrize("kind", ["cvae", "m2", "vae", "features"])
def test_the_export_loads_without_the_project_and_gives_the_runs_numbers(kind, runs, bare):
    inputs, outputs = bare
    expected = own_numbers(runs[kind], inputs["pixels"], inputs["label"], inputs[f"{kind}__z"])
    conditional = kind != "vae"
    assert set(outputs[f"{kind}__signatures"]) == (
        {"encode", "decode", "classify"} if conditional else {"encode", "decode"}
    )
    for name, value in expected.items():
        got = outputs[f"{kind}__{name}"]
        assert got.shape == value.shape, name
        if name == "classify__label":
            np.testing.assert_array_equal(got, value, err_msg=name)
        elif name == "classify__logits":  # log p(x|y) of hundreds of nats, or q's logits
            np.testing.assert_allclose(got, value, rtol=RTOL, atol=ATOL, err_msg=name)
        else:
            np.testing.assert_allclose(got, value, atol=ATOL, rtol=0, err_msg=name)
    probabilities = outputs[f"{kind}__decode__probabilities"]
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    other = outputs[f"{kind}__decode_other__probabilities"]
    if conditional:  # The label is read (by 4e-3 at least here; float noise is 2e-7) ...
        assert np.abs(other - probabilities).max() > 1e-4
    else:  # ... or, by a plain VAE, accepted and ignored.
        np.testing.assert_array_equal(other, probabilities)


def run_sample(capsys, *argv) -> list[Path]:
    """sample.main in this process (TensorFlow is loaded once); returns the files it says
    it wrote, after checking it succeeded. What it printed stays in `run_sample.out`."""
    code = sample.main([str(arg) for arg in argv])
    run_sample.out = capsys.readouterr().out
    assert code == 0, run_sample.out
    lines = run_sample.out.splitlines()
    return [Path(line.split()[1]) for line in lines if line.startswith("wrote ")]


@pytest.mark.slow  # Uses the trained runs.
def test_a_grid_has_a_row_of_each_asked_label_by_the_runs_own_classifier(runs, capsys, tmp_path):
    """Rows in a shuffled label order, each tile read by the run's own generative
    classifier (argmax log p(x|y), K=25, evaluate's code) from the PNG as written.
    Thresholds: at least 90 of the 100 tiles, and at least 7 of each row's 10. Chance is
    1 in 10: a grid whose rows are in another order, or whose label is ignored, fails
    both by far. The trained run reads 99 or 100 (--seed 0 to 3; a miss is a prior draw
    far out in z, which no label explains well), so 90 leaves room for another CPU's
    rounding in training while still failing any wrong row."""
    import tensorflow as tf

    import cvae
    import evaluate

    order = [4, 9, 0, 7, 2, 5, 1, 8, 3, 6]
    (path,) = run_sample(capsys, runs["cvae"], "--labels", *order, "--n", 10, "--out", tmp_path)
    tiles = canvas_tiles(read_canvas(path))
    assert tiles.shape[:2] == (10, 10)
    model, _ = own_model(runs["cvae"])
    pixels = tf.constant(tiles.reshape(100, data_utils.N_PIXELS))  # uint8, as written
    log_p = evaluate.iw_log_likelihoods(model, pixels, 25, 7, verbose=False)
    read = cvae.classify(log_p).numpy().reshape(10, 10)
    asked = np.array(order)[:, None]
    assert np.mean(read == asked) >= 0.9, read
    assert np.all(np.mean(read == asked, axis=1) >= 0.7), read


def digit_as_another_program_draws_it(digit: np.ndarray, path: Path) -> None:
    """An MNIST digit as a user's PNG: four times the size, a margin making it 152 x 157,
    dark blue ink on a cream page (RGB, dark on light), written by Pillow."""
    import cv2

    ink = cv2.resize(digit.astype(np.float32) / 255, (112, 112), interpolation=cv2.INTER_CUBIC)
    ink = np.pad(np.clip(ink, 0, 1), ((10, 30), (40, 5)))[..., None]
    page, pen = np.array([250.0, 240.0, 200.0]), np.array([20.0, 30.0, 120.0])
    Image.fromarray(np.rint(page * (1 - ink) + pen * ink).astype(np.uint8)).save(path)


@pytest.mark.slow  # Uses the trained runs.
def test_restore_reads_a_png_made_by_another_program(runs, splits, capsys, tmp_path):
    """Without --label, the run's classifier picks the label; the converted image is the
    MNIST digit it was drawn from, and the restored one is the run's own model's
    E[x|z,y] at q(z|x,y)'s mean, to a grey level (cvae's functions, not export.py's)."""
    import tensorflow as tf

    import cvae

    image = tmp_path / "mine.png"
    digit, label = splits.test_images[0].reshape(28, 28), int(splits.test_labels[0])
    digit_as_another_program_draws_it(digit, image)
    (path,) = run_sample(capsys, runs["cvae"], "--restore", image, "--out", tmp_path)
    assert f"mine.png: label {label}, p = " in run_sample.out  # The run's classifier's pick.
    tiles = canvas_tiles(read_canvas(path))
    assert tiles.shape[:2] == (1, 2)
    converted, restored = (tile.astype(int).ravel() for tile in tiles[0])
    # Four times up, and down again with OpenCV's area average: close, not equal.
    assert np.corrcoef(converted, digit.ravel())[0, 1] > 0.9
    model, _ = own_model(runs["cvae"])
    x = tf.constant(sample.load_images([image], "mnist"))
    y = tf.constant([label])
    expected = cvae.mean_image(model, cvae.posterior_mean(model, x, y), y).numpy()
    assert np.abs(np.rint(expected[0] * 255) - restored).max() <= 1
    np.testing.assert_array_equal(np.rint(x.numpy()[0] * 255), converted)


@pytest.mark.slow  # Uses the trained runs.
def test_interpolate_and_the_plain_vae(runs, capsys, tmp_path):
    """Two rows (the second switching label) for a conditional run, one row for a plain
    VAE; both start and end with the two test digits."""
    (path,) = run_sample(capsys, runs["m2"], "--interpolate", 3, 8, "--steps", 6, "--out", tmp_path)
    assert path.name == "interpolate_3-8_seed0.png"
    tiles = canvas_tiles(read_canvas(path))
    assert tiles.shape[:2] == (2, 8)
    np.testing.assert_array_equal(tiles[0, 0], tiles[1, 0])  # The same test digit ...
    np.testing.assert_array_equal(tiles[0, :4], tiles[1, :4])  # ... and label, to half-way.
    assert np.abs(tiles[0, 4:7].astype(int) - tiles[1, 4:7]).max() > 2
    (path,) = run_sample(capsys, runs["vae"], "--interpolate", "--steps", 10, "--out", tmp_path)
    assert path.name == "interpolate_seed0.png"
    assert canvas_tiles(read_canvas(path)).shape[:2] == (1, 12)


@pytest.mark.slow  # Uses the trained runs.
def test_sample_never_overwrites(runs, capsys, tmp_path):
    """The same command twice writes two files; a file of the user's with the name is kept."""
    mine = tmp_path / "prior_3_seed0.png"
    mine.write_bytes(b"the user's")
    first = run_sample(capsys, runs["features"], "--labels", 3, "--n", 2, "--out", tmp_path)
    before = tree(tmp_path)
    second = run_sample(capsys, runs["features"], "--labels", 3, "--n", 2, "--out", tmp_path)
    assert [p.name for p in first + second] == ["prior_3_seed0_2.png", "prior_3_seed0_3.png"]
    assert mine.read_bytes() == b"the user's"
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert read_canvas(first[0]).tobytes() == read_canvas(second[0]).tobytes()  # Seeded.


@pytest.mark.slow  # Copies a trained run.
def test_export_of_an_old_run_and_samples_from_it(runs, capsys, tmp_path):
    """`--export` writes the export a run folder lacks (once: a second call finds it up to
    date), and a grid drawn from the export is the checkpoint's, pixel for pixel."""
    old = tmp_path / "old"
    shutil.copytree(runs["m2"], old, ignore=shutil.ignore_patterns("export"))
    assert run_sample(capsys, old, "--export") == [old / "export"]
    info = json.loads((old / "export" / "model.json").read_text())
    assert info["checkpoint"] == "ckpt-2" and info["classify"].startswith("q(y|x)")
    before = tree(old)
    assert sample.main([str(old), "--export"]) == 0
    assert "up to date" in capsys.readouterr().out and tree(old) == before
    (from_checkpoint,) = run_sample(capsys, old, "--labels", 1, 5, "--n", 4)
    (from_export,) = run_sample(capsys, old / "export", "--labels", 1, 5, "--n", 4)
    assert from_checkpoint.parent == from_export.parent == old / "samples"
    np.testing.assert_array_equal(read_canvas(from_checkpoint), read_canvas(from_export))


# --- What no model is needed for: flags, refusals, the conversion -----------------------


def fake_run(folder: Path, **config) -> Path:
    """A run folder as sample.py first sees it: config.json and a checkpoint index."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (folder / "config.json").write_text(json.dumps(Config(**config).to_json()))
    return folder


def refused(capsys, *argv) -> tuple[int, str]:
    """(exit code, the one line on stderr) of a refused command, nothing on stdout."""
    try:
        code = sample.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1, captured.err
    return code, lines[0]


def test_every_refusal_is_one_line(capsys, tmp_path):
    run = fake_run(tmp_path / "run")
    vae = fake_run(tmp_path / "vae", conditional=False)
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (50, 40), (255, 255, 255)).save(blank)
    cases = [
        # Bad flags: argparse's exit code 2.
        ((run, "--labels", 10), 2, "a label is a number 0..9, got 10"),
        ((run, "--restore", bad, "--label", -1), 2, "got -1"),
        ((run, "--interpolate", 1, 2, 3), 2, "at most two labels"),
        ((run, "--restore", bad, bad, "--label", 1, 2, 3), 2, "one per image (2), got 3"),
        ((run, "--label", 3), 2, "add --restore"),
        ((vae, "--labels", 3), 2, "is a plain VAE (--conditional False): it has no labels"),
        ((vae, "--restore", blank, "--label", 3), 2, "drop --label"),
        ((run, "--n", 0), 2, "expected 1..100"),
        # A bad run folder or file: 1.
        ((tmp_path / "nowhere",), 1, "no such folder"),
        ((tmp_path / "empty",), 1, "not a run folder (no config.json)"),
        ((run, "--restore", bad), 1, "OpenCV cannot read it as an image"),
        ((run, "--restore", tmp_path / "missing.png"), 1, "missing.png: no such file"),
        ((run, "--restore", blank), 1, "no digit found"),
    ]
    for argv, code, words in cases:
        got_code, line = refused(capsys, *argv)
        assert (got_code, words in line) == (code, True), (argv, line)
    shutil.rmtree(run / "checkpoints")
    code, line = refused(capsys, run)
    assert code == 1 and "no checkpoint in" in line


@pytest.mark.slow  # Starts a Python.
def test_flags_and_refusals_load_no_tensorflow(tmp_path):
    """sample.py parses its flags, reads the folder and the images, and refuses, before it
    imports TensorFlow: --help and every mistake are instant."""
    fake_run(tmp_path / "run")
    (tmp_path / "bad.png").write_text("not an image")
    code = f"""
import contextlib, sys
import sample
for argv in (["--help"], ["{tmp_path}/run", "--labels", "11"],
             ["{tmp_path}/run", "--restore", "{tmp_path}/bad.png"], ["{tmp_path}/none"]):
    with contextlib.suppress(SystemExit):
        sample.main(argv)
print(sorted({{"tensorflow", "keras"}} & set(sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_images_are_converted_as_mnist_was_made(splits):
    """Either polarity, any size, colour or grey with transparency: the digit light on
    dark, its box 20 px at most, its centre of mass at (14, 14) within half a pixel."""
    import cv2

    def box(image: np.ndarray) -> tuple[int, int]:
        rows, cols = np.nonzero(image > 0.2)
        return np.ptp(rows) + 1, np.ptp(cols) + 1

    digit = splits.test_images[1].reshape(28, 28)
    big = cv2.resize(digit, (140, 84), interpolation=cv2.INTER_CUBIC)  # 5 x wider, 3 x taller
    as_read = big.astype(np.float32) / 255
    light_on_dark = sample.as_mnist(as_read).reshape(28, 28)
    dark_on_light = sample.as_mnist(1.0 - as_read).reshape(28, 28)
    np.testing.assert_allclose(light_on_dark, dark_on_light, atol=1e-6)
    (height, width), (big_height, big_width) = box(light_on_dark), box(as_read)
    assert max(height, width) == 20
    assert height / width == pytest.approx(big_height / big_width, rel=0.15)  # Aspect kept.
    moments = cv2.moments(light_on_dark)
    centre = np.array([moments["m10"], moments["m01"]]) / moments["m00"]
    assert np.all(np.abs(centre - sample.MNIST_CENTRE) <= 0.5), centre
    assert light_on_dark.max() == pytest.approx(1.0, abs=0.05) and light_on_dark[0, 0] == 0


def test_transparent_and_sixteen_bit_images_are_read(splits, tmp_path):
    """Black ink on a transparent page reads as a viewer shows it (over white); a 16-bit
    grey PNG reads at its full depth."""
    digit = splits.test_images[2].reshape(28, 28)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit  # Black ink where the digit is, transparent elsewhere.
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ink.png")
    import cv2

    cv2.imwrite(str(tmp_path / "deep.png"), digit.astype(np.uint16) * 257)
    expected = sample.as_mnist(digit.astype(np.float32) / 255)
    for name in ("ink.png", "deep.png"):
        converted = sample.as_mnist(sample.read_image(tmp_path / name))
        np.testing.assert_allclose(converted, expected, atol=2 / 255, err_msg=name)


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """An export that fails half-way (or a writer killed earlier) leaves export/ as it was
    and no partial folder; a later export keeps the previous one as export.<its time>/."""
    import tensorflow as tf

    import cvae
    import export

    assert (sample.EXPORT_DIR, sample.EXPORT_INFO) == (export.EXPORT_DIR, export.INFO_FILE)
    model = cvae.CVAE(n_z=2, n_hidden=(8, 8, 8, 8))
    first = export.write_export(tmp_path, model, None, None, "mnist")
    before = tree(first)
    (tmp_path / ".export-partial_7").mkdir()  # Left by a writer that was killed.
    real_save = tf.saved_model.save

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError):
        export.write_export(tmp_path, model, None, None, "mnist")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert tree(first) == before
    monkeypatch.undo()
    assert export.write_export(tmp_path, model, None, None, "mnist") == first
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "export" and names[1].startswith("export.")
    assert tree(tmp_path / names[1]) == before  # The previous export, kept whole.
    assert tree(first).keys() == before.keys()
