"""A run's model as a TensorFlow SavedModel that loads without this project: `RUN/export/`.

Three serving signatures, in pixel space for every kind of run; images are float32
(B, 784) in [0, 1] (28 x 28, row by row, the digit light on dark as in MNIST),
labels int32 (B,) in 0..9:

    encode(image, label) -> mean, std        q(z|x,y): (B, n_z) each
    decode(z, label) -> probabilities        E[x|z,y], the pixels' means: (B, 784) in [0, 1]
    classify(image) -> label, probabilities, logits    p(y|x): (B,), (B, 10), (B, 10)

`classify` is that of the run: M2's q(y|x) (--n_labeled), else the generative
classifier argmax_y log p(x|y) by importance weighting. Its logits are then the
estimates of log p(x|y), K = CLASSIFY_SAMPLES per image and label (10·K decoder passes
per image), drawn from seeds set by each row's place in the batch: the same batch
gives the same answer, the same image in another batch a slightly different one.
A plain VAE (--conditional False) has no `classify`, and its `encode` and `decode`
accept a label and ignore it, so that every export is called alike. A run on M1's
features (--features) is exported through M1: `encode` reads M1's posterior means
(the dimensions M2 was trained on) of the image, `decode` gives M1's mean image of
M2's output.
`model.json` beside the SavedModel says which of these the run is. In a Python with
only TensorFlow installed:

    model = tf.saved_model.load("RUN/export")
    digits = model.signatures["decode"](z=tf.zeros([1, n_z]), label=tf.constant([3]))
    digits["probabilities"]  # (1, 784)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import tensorflow as tf

import cvae
import draws
import evaluate
import features
import utils
from config import DEFAULT_IW_SAMPLES
from data_utils import N_CLASSES, N_PIXELS

EXPORT_DIR = utils.EXPORT_DIR
INFO_FILE = "model.json"  # Inside EXPORT_DIR: what the run is, for people and sample.py.
PARTIAL_STEM = ".export-partial"  # An export being written, renamed to EXPORT_DIR when whole.
# Importance samples per (image, label) of the exported generative classifier: those of
# the default run's test evaluation.
CLASSIFY_SAMPLES = DEFAULT_IW_SAMPLES
CLASSIFY_IMAGES = 100  # Images per IW chunk plan (evaluate.make_iw_step): memory, not values.

IMAGE = tf.TensorSpec([None, N_PIXELS], tf.float32, name="image")
LABEL = tf.TensorSpec([None], tf.int32, name="label")


class ServingModel(tf.Module):
    """The exported functions of a trained model (dropout off), as tf.functions.

    `sample.py` calls these same functions on a restored checkpoint, so that a
    run and its export give the same pictures.
    """

    def __init__(self, model: cvae.CVAE, source: features.FeatureSource | None = None):
        super().__init__(name="cvae")
        self.model = model
        self.source = source
        self.m1 = source.model if source is not None else None  # Tracked: saved with M2.
        self.encode = tf.function(self._encode, input_signature=[IMAGE, LABEL])
        z_spec = tf.TensorSpec([None, model.n_z], tf.float32, name="z")
        self.decode = tf.function(self._decode, input_signature=[z_spec, LABEL])
        if model.conditional:
            if not model.has_classifier:
                self._iw_step = evaluate.make_iw_step(model, CLASSIFY_SAMPLES, CLASSIFY_IMAGES)
            self.classify = tf.function(self._classify, input_signature=[IMAGE])

    @property
    def classifier(self) -> str | None:
        """What `classify` computes, in words; None for a plain VAE."""
        if not self.model.conditional:
            return None
        if self.model.has_classifier:
            return "q(y|x), M2's classifier"
        return (
            f"argmax_y log p(x|y), importance-weighted with K={CLASSIFY_SAMPLES} samples "
            "(the generative classifier)"
        )

    def signatures(self) -> dict:
        functions = {"encode": self.encode, "decode": self.decode}
        if self.model.conditional:
            functions["classify"] = self.classify
        return functions

    def _one_hot(self, label: tf.Tensor) -> tf.Tensor:
        """One-hot labels (B, 10), a label outside 0..9 refused; (B, 0) for a plain VAE,
        which ignores them."""
        if not self.model.conditional:
            return tf.zeros([tf.shape(label)[0], 0])
        tf.debugging.assert_non_negative(label, message="labels must be in 0..9")
        tf.debugging.assert_less(label, N_CLASSES, message="labels must be in 0..9")
        return draws.one_hot(label)

    def _model_input(self, image: tf.Tensor) -> tf.Tensor:
        """What the model reads: the pixels, or M1's posterior means on its active dims."""
        return image if self.source is None else self.source.encode(image)[0]

    def _encode(self, image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        mean, std = self.model.encode(self._model_input(image), self._one_hot(label))
        return {"mean": mean, "std": std}

    def _decode(self, z: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        means = self.model.mean_output(self.model.decode(z, self._one_hot(label)))
        if self.source is not None:  # M2's mean features -> M1's mean image.
            means = self.source.decode(means)
        return {"probabilities": means}

    def _classify(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        x = self._model_input(image)
        if self.model.has_classifier:
            logits = self.model.classifier_logits(x)
        else:
            # The seed of evaluate.iw_log_likelihoods' first batch at IW_SEED: the same
            # draws as the evaluation code given the same batch.
            seed = tf.constant([evaluate.IW_SEED, 0], tf.int64)
            logits = self._iw_step(x, x, seed)  # log p(x|y), (B, C)
        return {
            "label": tf.argmax(logits, axis=-1, output_type=tf.int32),
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "logits": logits,
        }


def export_info(module: ServingModel, dataset: str, checkpoint: str | None, source=None) -> dict:
    """model.json: what the export is, readable without TensorFlow or this project."""
    return {
        "dataset": dataset,
        "image_shape": [28, 28],
        "n_z": module.model.n_z,
        "conditional": module.model.conditional,
        "classify": module.classifier,
        "features": None if source is None else source.record(),
        "checkpoint": checkpoint,
        "signatures": {
            "encode": "image float32 (B, 784) in [0, 1], label int32 (B,) -> mean, std (B, n_z)",
            "decode": "z float32 (B, n_z), label int32 (B,) -> probabilities (B, 784)",
            **(
                {"classify": "image (B, 784) -> label (B,), probabilities, logits (B, 10)"}
                if module.model.conditional
                else {}
            ),
        },
        "labels": "ignored (a plain VAE)" if not module.model.conditional else "0..9",
    }


def _fsync_tree(folder: Path) -> None:
    """Flush every file, then the folders, so that the rename publishes whole files."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_export(
    run_dir: str | os.PathLike,
    model: cvae.CVAE,
    source: features.FeatureSource | None,
    checkpoint: str | None,
    dataset: str,
) -> Path:
    """Write the SavedModel of `model` (and M1's, with `source`) as `run_dir`/export/.

    It is written into a hidden folder of the run, then renamed: a kill leaves
    the previous export/ or the new one, never half of one. A previous export is
    kept as export.<its time>/, as metrics.json is. `checkpoint` (the one the
    weights came from) and `dataset` are recorded in model.json. The caller
    holds the run folder's lock, so hidden partial exports left by a killed
    writer are removed. Returns the export's path.
    """
    run_dir = Path(run_dir)
    for stale in run_dir.glob(f"{PARTIAL_STEM}*"):
        shutil.rmtree(stale, ignore_errors=True)
    module = ServingModel(model, source)
    info = export_info(module, dataset, checkpoint and Path(checkpoint).name, source)
    partial = utils.create_fresh(run_dir, PARTIAL_STEM, "", folder=True)
    final = run_dir / EXPORT_DIR
    try:
        tf.saved_model.save(module, str(partial), signatures=module.signatures())
        utils.write_json(partial / INFO_FILE, info)
        _fsync_tree(partial)
        if final.exists():
            kept = utils.reserve_aside(final)
            os.replace(final, kept)  # Onto the empty folder just reserved.
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
