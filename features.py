"""M1's latent features, for M2 on them (Kingma et al. 2014, M1+M2).

A finished plain-VAE run (`--conditional False`, M1) is opened read-only: its
frozen encoder turns every image into q(z1|x) once, as Kingma's code did. M2
then trains on z1 = mean + std·ε drawn afresh at each step (`draws.sample_features`)
and is validated and tested on the posterior means. Only the dimensions that M1
uses are kept: the others are its prior's noise, the same for every image.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

import cvae
import data_utils
import utils
from config import Config

# Kingma's code keeps the dimensions whose posterior means vary over images by more
# than this (learn_yz_x_ss.py); an unused one has means near 0 and std near 1.
ACTIVE_STD = 0.1
BATCH = 1000  # Images encoded at once: bounds the memory, not the values.


@dataclass(frozen=True)
class FeatureSource:
    """A finished M1 run, frozen, and the dimensions of its z1 that M2 sees."""

    run_dir: Path
    checkpoint: str  # The checkpoint's file prefix, as named in M1's metrics.json.
    model: cvae.CVAE  # M1; never trained here.
    active: np.ndarray  # (d,) int indices into M1's n_z.
    digest: str  # weights_digest(model): a resume checks that M1 is still the same.

    def encode(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z1|x) of images (B, D) in [0, 1] on the active dimensions: mean, std (B, d).
        TensorFlow in and out, so that the export traces the same ops."""
        mean, std = self.model.encode(x, tf.zeros([tf.shape(x)[0], 0]))  # No label: M1.
        return tf.gather(mean, self.active, axis=1), tf.gather(std, self.active, axis=1)

    def decode(self, features: tf.Tensor) -> tf.Tensor:
        """M1's mean images (B, D) at z1 = `features` (B, d) on the active dimensions and
        0, the prior's mean, on the others."""
        rows = tf.scatter_nd(  # (n_z, B): a scatter copies the values exactly.
            tf.constant(self.active[:, None], tf.int32),
            tf.transpose(features),
            tf.stack([self.model.n_z, tf.shape(features)[0]]),
        )
        z1 = tf.transpose(rows)
        return self.model.mean_output(self.model.decode(z1, tf.zeros([tf.shape(z1)[0], 0])))

    def posterior(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q(z1|x) of uint8 images (N, D) on the active dimensions: mean, std (N, d)."""
        means, stds = [], []
        for start in range(0, len(images), BATCH):
            mean, std = self.encode(tf.constant(data_utils.scale(images[start : start + BATCH])))
            means.append(mean.numpy())
            stds.append(std.numpy())
        return np.concatenate(means), np.concatenate(stds)

    def means(self, images: np.ndarray) -> np.ndarray:
        """The posterior means (N, d): what validation, test and the canvases see."""
        return self.posterior(images)[0]

    def splits(self, pixels: data_utils.Splits) -> data_utils.Splits:
        """The data as M2 sees it: training rows [mean ‖ std] (N, 2d), for a fresh z1 at
        each step; validation and test rows the posterior means (N, d). float32."""
        return data_utils.Splits(
            np.concatenate(self.posterior(pixels.train_images), axis=1),
            pixels.train_labels,
            self.means(pixels.valid_images),
            pixels.valid_labels,
            self.means(pixels.test_images),
            pixels.test_labels,
        )

    def record(self) -> dict:
        """What config.json keeps of the source: a resume reopens exactly this."""
        return {
            "run": str(self.run_dir),
            "checkpoint": Path(self.checkpoint).name,
            "active_dims": self.active.tolist(),
            "weights_sha256": self.digest,
        }


def weights_digest(model: tf.Module) -> str:
    """SHA-256 of a model's weights in their fixed order: equal iff the same weights."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()


def know_nothing_nats(table: np.ndarray) -> float:
    """−log p of training features (N, 2d) under N(0, I), a model that learnt nothing:
    ½ Σ_d (log 2π + E[z1²]) with E[z1²] = mean² + std². The divergence guard's scale."""
    mean, std = np.split(table, 2, axis=1)
    d = mean.shape[1]
    return 0.5 * d * math.log(2 * math.pi) + 0.5 * float(np.mean(np.sum(mean**2 + std**2, 1)))


def _refuse(run_dir: Path | str, why: str) -> utils.UserError:
    return utils.UserError(f"--features {run_dir}: {why}")


def _m1_config(run_dir: Path) -> Config:
    try:
        values = json.loads((run_dir / utils.CONFIG_FILE).read_text())
        return Config.from_json(values)
    except FileNotFoundError:
        raise _refuse(run_dir, "no config.json there; give the folder of an M1 run") from None
    except (OSError, ValueError, TypeError) as err:
        raise _refuse(run_dir, f"cannot read its config.json ({err})") from None


def open_source(
    config: Config, train_images: np.ndarray, recorded: dict | None = None
) -> FeatureSource:
    """Open the M1 run that `config.features` names, or refuse in one line.

    A new run takes the checkpoint that M1's metrics.json evaluated and the
    dimensions it uses on `train_images` (this run's, uint8); a resumed run
    (`recorded`, from its config.json) reopens exactly what it trained on.
    """
    # Absolute, so that config.json's record reopens it from any working directory.
    run_dir = Path(recorded["run"] if recorded else Path(config.features).resolve())
    m1 = _m1_config(run_dir)
    if m1.conditional or m1.n_labeled or m1.features:
        raise _refuse(run_dir, "not an M1 run: train one with --conditional False")
    if m1.dataset != config.dataset:
        raise _refuse(run_dir, f"M1 was trained on {m1.dataset}, this run is {config.dataset}")
    if recorded:
        name = recorded["checkpoint"]
    else:
        try:
            name = json.loads((run_dir / utils.METRICS_JSON).read_text())["checkpoint"]
        except (OSError, ValueError, KeyError):
            raise _refuse(
                run_dir, "M1 has not finished (no metrics.json): resume it to its end first"
            ) from None
    checkpoint = str(run_dir / utils.CHECKPOINTS_DIR / name)
    if not tf.io.gfile.exists(f"{checkpoint}.index"):
        raise _refuse(run_dir, f"its checkpoint {checkpoint} is gone; retrain M1")
    model = cvae.CVAE(
        m1.n_z, m1.hidden_sizes, m1.keep_prob, seed=m1.seed, conditional=False
    )  # fmt: skip
    try:
        status = tf.train.Checkpoint(model=model).restore(checkpoint)
        status.assert_existing_objects_matched().expect_partial()  # M1's optimizer: unread.
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise _refuse(run_dir, f"{checkpoint} does not fit its config.json ({err})") from None
    digest = weights_digest(model)
    # A resume must see the M1 it trained on; runs recorded before the digest have none.
    if recorded and recorded.get("weights_sha256", digest) != digest:
        raise _refuse(
            run_dir,
            f"{checkpoint} holds other weights than this run was trained on: put back "
            "the M1 run as it was, or train a new M2 run",
        )
    source = FeatureSource(run_dir, checkpoint, model, np.arange(m1.n_z), digest)
    if recorded:
        active = np.asarray(recorded["active_dims"], np.int64)
    else:
        means = source.means(train_images)
        active = np.flatnonzero(means.std(axis=0) > ACTIVE_STD)
    if len(active) == 0:
        raise _refuse(run_dir, "M1 uses none of its dimensions (its posterior collapsed)")
    print(f"M1 features: {run_dir} ({Path(checkpoint).name}), {len(active)} of {m1.n_z} active")
    return FeatureSource(run_dir, checkpoint, model, active, digest)
