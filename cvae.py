"""The conditional VAE: encoder q(z|x,y), decoder p(x|z,y), losses, compiled steps.

Kingma & Welling 2014 (VAE), Sohn et al. 2015 (conditional VAE). Shapes use
B for the batch, D = 784 pixels, C = 10 classes, Z = n_z.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import keras
import tensorflow as tf

import data_utils

LEAKY_ALPHA = 0.2
STD_FLOOR = 1e-6  # Keeps log std finite when softplus underflows.


class CVAE(keras.Model):
    """Two-hidden-layer MLP encoder and decoder, both conditioned on a one-hot label.

    Dropout is stateless and driven by an explicit seed, so that a run is
    repeatable and resumable from the RNG state saved in its checkpoint.
    With `dtype_policy="mixed_float16"` the layers compute in float16 and keep
    float32 weights; `encode` and `decode` still return float32.
    """

    def __init__(
        self,
        n_z: int = 2,
        n_hidden: Sequence[int] = (500, 500, 500, 500),
        keep_prob: float = 0.6,
        n_pixels: int = data_utils.N_PIXELS,
        seed: int = 0,
        dtype_policy: str = "float32",
        classifier: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(n_hidden) != 4:
            raise ValueError(f"n_hidden needs four sizes (enc1, enc2, dec1, dec2), got {n_hidden}")
        self.n_z = n_z
        self.keep_prob = keep_prob
        enc1, enc2, dec1, dec2 = n_hidden

        def dense(units: int, index: int) -> keras.layers.Dense:
            # He initialisation (factor 2, fan-in, truncated normal), as the README
            # promises; the original's code called `variance_scaling_initializer(
            # factor=1.0)` (README, "Differences from the original"). Zero biases. An
            # explicit seed per layer: an unseeded Keras initializer draws its seed
            # at creation.
            init = keras.initializers.VarianceScaling(
                2.0, "fan_in", "truncated_normal", seed=seed * 10 + index
            )
            return keras.layers.Dense(
                units, kernel_initializer=init, bias_initializer="zeros", dtype=dtype_policy
            )

        # One attribute per layer, not a list: tf.train.Checkpoint tracks
        # attributes of a Keras 3 model, but not layers held in a Python list.
        self.enc_hidden1, self.enc_hidden2 = dense(enc1, 0), dense(enc2, 1)
        self.enc_out = dense(2 * n_z, 2)  # mean and pre-softplus std
        self.dec_hidden1, self.dec_hidden2 = dense(dec1, 3), dense(dec2, 4)
        self.dec_out = dense(n_pixels, 5)  # Bernoulli logits
        # Build now so that checkpoints can be restored before the first step.
        self.encode(tf.zeros((1, n_pixels)), tf.zeros((1, data_utils.N_CLASSES)))
        self.decode(tf.zeros((1, n_z)), tf.zeros((1, data_utils.N_CLASSES)))
        self.has_classifier = classifier
        if classifier:
            # q(y|x) of M2 (Kingma et al. 2014, eq. 4): an MLP like the encoder. Only
            # then created, so that a plain model's checkpoint layout is unchanged.
            self.cls_hidden1, self.cls_hidden2 = dense(enc1, 6), dense(enc2, 7)
            self.cls_out = dense(data_utils.N_CLASSES, 8)  # Logits of q(y|x)
            self.classifier_logits(tf.zeros((1, n_pixels)))

    @property
    def dense_layers(self) -> dict[str, keras.layers.Dense]:
        """Every layer by name, in the order of a forward pass (encoder, then decoder)."""
        return {
            "enc1": self.enc_hidden1,
            "enc2": self.enc_hidden2,
            "enc_out": self.enc_out,
            "dec1": self.dec_hidden1,
            "dec2": self.dec_hidden2,
            "dec_out": self.dec_out,
            **(
                {"cls1": self.cls_hidden1, "cls2": self.cls_hidden2, "cls_out": self.cls_out}
                if self.has_classifier
                else {}
            ),
        }

    @property
    def encoder_hidden(self) -> list[keras.layers.Dense]:
        return [self.enc_hidden1, self.enc_hidden2]

    @property
    def decoder_hidden(self) -> list[keras.layers.Dense]:
        return [self.dec_hidden1, self.dec_hidden2]

    def _mlp(self, h: tf.Tensor, layers: list, training: bool, seed: tf.Tensor | None):
        seeds = (
            tf.unstack(data_utils.split_seed(seed, len(layers)))
            if training
            else [None] * len(layers)
        )
        for layer, layer_seed in zip(layers, seeds, strict=True):
            h = tf.nn.leaky_relu(layer(h), alpha=LEAKY_ALPHA)
            if training and self.keep_prob < 1.0:
                h = dropout(h, self.keep_prob, layer_seed)
        return h

    def encode(
        self, x: tf.Tensor, labels: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z|x,y): images (B, D) and one-hot labels (B, C) -> mean, std (B, Z)."""
        h = self._mlp(tf.concat([x, labels], axis=-1), self.encoder_hidden, training, seed)
        # float32 from here on, also under mixed precision: the loss terms need it.
        mean, raw_std = tf.split(tf.cast(self.enc_out(h), tf.float32), 2, axis=-1)
        return mean, tf.nn.softplus(raw_std) + STD_FLOOR

    def decode(
        self, z: tf.Tensor, labels: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        """p(x|z,y): latents (B, Z) and one-hot labels (B, C) -> Bernoulli logits (B, D)."""
        h = self._mlp(tf.concat([z, labels], axis=-1), self.decoder_hidden, training, seed)
        return tf.cast(self.dec_out(h), tf.float32)

    def classifier_logits(
        self, x: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        """q(y|x), M2's classifier: images (B, D) -> logits (B, C), float32."""
        h = self._mlp(x, [self.cls_hidden1, self.cls_hidden2], training, seed)
        return tf.cast(self.cls_out(h), tf.float32)

    def encode_all_labels(
        self, x: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z|x,y) for every label at once: images (B, D) -> mean, std (B·C, Z).

        Row i·C + c is image i with label c, the rows `encode` would give for
        `repeat(x, C)` and `tile(one_hot(range(C)), B)`, with the same dropout
        masks. The first layer acts on concat(x, y), i.e. x·W_x + W_y[y] + b:
        x·W_x, its largest product, is computed once for the ten labels.
        """
        layer = self.enc_hidden1
        dtype = layer.compute_dtype
        kernel = tf.cast(layer.kernel, dtype)
        n_pixels = int(x.shape[-1])
        shared = tf.matmul(tf.cast(x, dtype), kernel[:n_pixels])  # (B, H), x·W_x
        per_label = kernel[n_pixels:] + tf.cast(layer.bias, dtype)  # (C, H), W_y + b
        h = tf.reshape(shared[:, None, :] + per_label[None], [-1, kernel.shape[-1]])
        # The seeds of `_mlp` over the encoder's two layers, so the same dropout masks.
        seeds = tf.unstack(data_utils.split_seed(seed, 2)) if training else [None, None]
        for index, layer_seed in enumerate(seeds):
            if index:
                h = self.enc_hidden2(h)
            h = tf.nn.leaky_relu(h, alpha=LEAKY_ALPHA)
            if training and self.keep_prob < 1.0:
                h = dropout(h, self.keep_prob, layer_seed)
        mean, raw_std = tf.split(tf.cast(self.enc_out(h), tf.float32), 2, axis=-1)
        return mean, tf.nn.softplus(raw_std) + STD_FLOOR

    def call(self, inputs, training: bool = False):
        """Reconstruct from the posterior mean: (images, one-hot labels) -> logits."""
        x, labels = inputs
        mean, _ = self.encode(x, labels, training=False)
        return self.decode(mean, labels, training=False)


def parameter_count(
    n_z: int,
    n_hidden: Sequence[int],
    n_pixels: int = data_utils.N_PIXELS,
    n_classes: int = data_utils.N_CLASSES,
    classifier: bool = False,
) -> int:
    """The trainable weights and biases of `CVAE(n_z, n_hidden, classifier=...)`, counted
    without building it.

    `n_hidden` holds the four sizes (enc1, enc2, dec1, dec2); a dense layer
    from `a` to `b` units holds a·b + b numbers.
    """
    enc1, enc2, dec1, dec2 = n_hidden
    layers = [
        (n_pixels + n_classes, enc1), (enc1, enc2), (enc2, 2 * n_z),  # encoder
        (n_z + n_classes, dec1), (dec1, dec2), (dec2, n_pixels),  # decoder
    ]  # fmt: skip
    if classifier:
        layers += [(n_pixels, enc1), (enc1, enc2), (enc2, n_classes)]
    return sum(n_in * n_out + n_out for n_in, n_out in layers)


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TensorFlow variable (the TF backend passes both)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


# TF 1.x's AdamOptimizer, which the original used, defaulted to ε = 1e-8; Keras' Adam to 1e-7.
ADAM_EPSILON = 1e-8


def learning_rate_schedule(
    initial: float, decay_per_epoch: float, steps_per_epoch: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The original's decay, smooth per step: initial · decay^(step / steps_per_epoch).

    The optimizer evaluates it at its own step count (checkpointed), inside the
    compiled loop, so a resumed run continues the same curve.
    """
    return keras.optimizers.schedules.ExponentialDecay(initial, steps_per_epoch, decay_per_epoch)


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam, each variable updated by TensorFlow's one-pass Adam kernel.

    The same maths (Kingma & Ba 2015, with the bias correction folded into the
    step size, as Keras does), the same slot variables (so checkpoints of either
    load into the other), but one fused op per variable instead of a dozen
    elementwise passes over 1.3 M parameters, which cost as much as the
    matmuls on a CPU. Falls back to Keras' update for AMSGrad. ε defaults to
    TF 1.x's 1e-8, as the original's optimizer.
    """

    def __init__(self, learning_rate=1e-3, epsilon: float = ADAM_EPSILON, **kwargs):
        super().__init__(learning_rate, epsilon=epsilon, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable),
            m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype),
            beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


def dropout(h: tf.Tensor, keep_prob: float, seed: tf.Tensor) -> tf.Tensor:
    """Inverted dropout: keep each unit with probability keep_prob, scaled by 1/keep_prob.

    The same values as `tf.nn.experimental.stateless_dropout` (a dropped
    negative unit is −0.0 here, +0.0 there), with the mask
    drawn by `data_utils.batch_uniform` so that several replicas drop exactly
    the units one device would. A product with the scaled mask, not a select:
    its gradient is one more product, and selects are slow on a CPU.
    """
    keep = data_utils.batch_uniform(tf.shape(h), seed, h.dtype) >= 1.0 - keep_prob
    return h * (tf.cast(keep, h.dtype) * tf.cast(1.0 / keep_prob, h.dtype))


def bernoulli_log_likelihood(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """log p(x|z) = Σ_pixels [x log σ(l) + (1−x) log(1−σ(l))], on logits for stability.

    Returns shape (B,). Grey-level x in [0, 1] gives the cross-entropy the
    original optimised; binary x gives a proper Bernoulli likelihood.
    """
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), -1)


def gaussian_kl(mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """KL(N(mean, std²) ‖ N(0, I)) = ½ Σ (mean² + std² − log std² − 1), shape (B,).

    Kingma & Welling 2014, appendix B. (The original added +1 here, which
    shifted its reported bound by n_z nats.)
    """
    return 0.5 * tf.reduce_sum(tf.square(mean) + tf.square(std) - 2.0 * tf.math.log(std) - 1.0, -1)


def negative_elbo(
    model: CVAE,
    x_input: tf.Tensor,
    x_target: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    training: bool = False,
) -> dict[str, tf.Tensor]:
    """Per-example −ELBO = −E_q[log p(x_target|z,y)] + KL(q(z|x_input,y) ‖ p(z)).

    One reparameterised sample z = mean + std·ε. With noise on, x_input is the
    noised image and x_target the clean one (a denoising CVAE).

    Returns dict of (B,) tensors: "loss", "recon" (−log-likelihood), "kl".
    """
    seed_enc, seed_eps, seed_dec = tf.unstack(data_utils.split_seed(seed, 3))
    mean, std = model.encode(x_input, labels, training=training, seed=seed_enc)
    eps = data_utils.batch_draw(tf.random.stateless_normal, tf.shape(mean), seed_eps, mean.dtype)
    z = mean + std * eps  # (B, Z)
    logits = model.decode(z, labels, training=training, seed=seed_dec)
    recon = -bernoulli_log_likelihood(x_target, logits)
    kl = gaussian_kl(mean, std)
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def negative_iw_bound(
    model: CVAE,
    x_input: tf.Tensor,
    x_target: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    n_samples: int,
    beta: tf.Tensor | None = None,
    training: bool = False,
) -> dict[str, tf.Tensor]:
    """Per-example −L_K, the importance-weighted bound of Burda et al. 2015 (eq. 8).

    L_K = log (1/K) Σ_k w_k,  w_k = p(x_target|z_k,y) p(z_k) / q(z_k|x_input,y),
    with K reparameterised samples z_k = mean + std·ε_k from one encoder pass.
    The gradient flows through all K samples, each weighted by its normalised
    w_k (Burda et al., eq. 14). K = 1 is an ELBO with a sampled KL:
    `training_terms` uses `negative_elbo` then.

    Returns dict of (B,) tensors: "loss" (−L_K), and for the curves the ELBO's
    terms: "recon" (−log p(x|z) averaged over the K samples) and "kl" (closed
    form). With `beta`, also "objective": −L_K with the prior ratio raised to
    the power β (the KL warm-up of Sønderby et al. 2016 carried over to L_K).
    """
    seed_enc, seed_eps, seed_dec = tf.unstack(data_utils.split_seed(seed, 3))
    mean, std = model.encode(x_input, labels, training=training, seed=seed_enc)
    shape = tf.shape(mean)  # (B, Z)
    eps = data_utils.batch_draw(  # Rows first, so that replicas draw as one device.
        tf.random.stateless_normal, [shape[0], n_samples, shape[1]], seed_eps, mean.dtype
    )
    z = mean[:, None, :] + std[:, None, :] * eps  # (B, K, Z)
    logits = model.decode(
        tf.reshape(z, [-1, shape[1]]), tf.repeat(labels, n_samples, axis=0),
        training=training, seed=seed_dec,
    )  # fmt: skip
    log_px = tf.reshape(
        bernoulli_log_likelihood(tf.repeat(x_target, n_samples, axis=0), logits), [-1, n_samples]
    )  # (B, K)
    log_ratio = log_prior_ratio(z, eps, std[:, None, :])  # (B, K)
    log_k = tf.math.log(tf.cast(n_samples, log_px.dtype))

    def negative_bound(log_w: tf.Tensor) -> tf.Tensor:
        return log_k - tf.reduce_logsumexp(log_w, axis=1)

    terms = {
        "loss": negative_bound(log_px + log_ratio),
        "recon": -tf.reduce_mean(log_px, axis=1),
        "kl": gaussian_kl(mean, std),
    }
    if beta is not None:
        terms["objective"] = negative_bound(log_px + beta * log_ratio)
    return terms


def warmup_ramp(step: tf.Tensor, warmup_steps: int) -> tf.Tensor:
    """The KL warm-up of Sønderby et al. 2016: min(1, step / warmup_steps).

    Linear from 0 at the first step to 1 after `warmup_steps` (the steps of
    --kl_warmup epochs); `step` is the optimizer's checkpointed step count, so a
    resumed run continues the same ramp.
    """
    return tf.minimum(1.0, tf.cast(step, tf.float32) / float(warmup_steps))


def training_terms(
    model: CVAE,
    x_input: tf.Tensor,
    x_target: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    n_samples: int = 1,
    beta: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """The per-example training terms, dropout on: −ELBO (K = 1) or −L_K (K > 1).

    "objective" is what the gradient descends; "loss", "recon" and "kl" are
    reported with the full KL (β = 1), so that curves with and without warm-up
    compare. `beta` (KL warm-up) weighs the KL, or for K > 1 the prior ratio;
    None is the full objective, computed by exactly the ops of the plain −ELBO.
    """
    if n_samples > 1:
        terms = negative_iw_bound(
            model, x_input, x_target, labels, seed, n_samples, beta, training=True
        )
    else:
        terms = negative_elbo(model, x_input, x_target, labels, seed, training=True)
        if beta is not None:
            terms["objective"] = terms["recon"] + beta * terms["kl"]
    terms.setdefault("objective", terms["loss"])
    return terms


# --- M2, semi-supervised (Kingma, Rezende, Mohamed & Welling 2014, arXiv 1406.5298) ---


def negative_elbo_all_labels(
    model: CVAE, x_input: tf.Tensor, x_target: tf.Tensor, seed: tf.Tensor, training: bool = False
) -> dict[str, tf.Tensor]:
    """−L(x, y) of Kingma et al. 2014, eq. 6, for every label y in one batched pass.

    −L(x, y) = −E_q(z|x,y)[log p(x|y,z)] + KL(q(z|x,y) ‖ p(z)) − log p(y); the
    constant −log p(y) = log 10 of a uniform p(y) is left out, as in the
    conditional model's −ELBO. One reparameterised sample per (image, label).
    The draws are those of `negative_elbo` on the B·C rows (image i, label c)
    at row i·C + c, and the encoder's x·W_x is shared by the ten labels
    (`CVAE.encode_all_labels`).

    Returns dict of (B, C) tensors: "loss", "recon", "kl".
    """
    n_classes = data_utils.N_CLASSES
    seed_enc, seed_eps, seed_dec = tf.unstack(data_utils.split_seed(seed, 3))
    mean, std = model.encode_all_labels(x_input, training=training, seed=seed_enc)  # (B·C, Z)
    eps = data_utils.batch_draw(tf.random.stateless_normal, tf.shape(mean), seed_eps, mean.dtype)
    z = mean + std * eps
    labels = data_utils.one_hot(tf.tile(tf.range(n_classes), [tf.shape(x_input)[0]]))
    logits = model.decode(z, labels, training=training, seed=seed_dec)  # (B·C, D)
    recon = -bernoulli_log_likelihood(tf.repeat(x_target, n_classes, axis=0), logits)
    kl = gaussian_kl(mean, std)
    terms = {"loss": recon + kl, "recon": recon, "kl": kl}
    return {name: tf.reshape(value, [-1, n_classes]) for name, value in terms.items()}


def unlabelled_bound(
    terms: dict[str, tf.Tensor], logits: tf.Tensor, beta: tf.Tensor | None = None
) -> dict[str, tf.Tensor]:
    """−U(x) of Kingma et al. 2014, eq. 7, per image: Σ_y q(y|x)·(−L(x,y)) − H(q(·|x)).

    Args:
      terms: `negative_elbo_all_labels`' (B, C) terms −L(x, y) for every label.
      logits: q(y|x)'s logits (B, C); log_softmax keeps log q finite.
      beta: the KL weight of a warm-up or β-VAE for "objective"; None = the bound.

    Returns dict of (B,) tensors: "loss" (−U), "objective" (−U with β·KL), and
    under q's expectation "recon" and "kl"; "entropy" H(q(·|x)).
    """
    log_q = tf.nn.log_softmax(logits, axis=-1)
    q = tf.exp(log_q)
    entropy = -tf.reduce_sum(q * log_q, -1)
    per_label = terms["loss"] if beta is None else terms["recon"] + beta * terms["kl"]
    return {
        "loss": tf.reduce_sum(q * terms["loss"], -1) - entropy,
        "objective": tf.reduce_sum(q * per_label, -1) - entropy,
        "recon": tf.reduce_sum(q * terms["recon"], -1),
        "kl": tf.reduce_sum(q * terms["kl"], -1),
        "entropy": entropy,
    }


class M2Batch(NamedTuple):
    """One step's rows for M2: unlabelled images and labelled (image, label) pairs."""

    input_u: tf.Tensor  # (B_u, D) encoder and classifier inputs of the unlabelled images
    target_u: tf.Tensor  # (B_u, D) their reconstruction targets
    input_l: tf.Tensor  # (B_l, D) the same for the labelled images
    target_l: tf.Tensor  # (B_l, D)
    labels_l: tf.Tensor  # (B_l,) int labels of the labelled images only


def m2_terms(
    model: CVAE, batch: M2Batch, seed: tf.Tensor, beta: tf.Tensor | None = None,
    training: bool = True,
) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:  # fmt: skip
    """Per-image terms of M2: (unlabelled −U(x), eq. 7; labelled −L(x,y), eq. 6, with
    "cross_entropy" −log q(y|x), eq. 9's extra term).

    q(y|x) runs once on the unlabelled and labelled rows together. The
    unlabelled images' labels never enter: `batch` holds none.
    """
    seed_cls, seed_u, seed_l = tf.unstack(data_utils.split_seed(seed, 3))
    n_u = tf.shape(batch.input_u)[0]
    logits = model.classifier_logits(
        tf.concat([batch.input_u, batch.input_l], 0), training=training, seed=seed_cls
    )  # (B_u + B_l, C)
    all_labels = negative_elbo_all_labels(
        model, batch.input_u, batch.target_u, seed_u, training=training
    )
    unlabelled = unlabelled_bound(all_labels, logits[:n_u], beta)
    labelled = negative_elbo(
        model, batch.input_l, batch.target_l, data_utils.one_hot(batch.labels_l), seed_l,
        training=training,
    )  # fmt: skip
    labelled["objective"] = (
        labelled["loss"] if beta is None else labelled["recon"] + beta * labelled["kl"]
    )
    labelled["cross_entropy"] = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=batch.labels_l, logits=logits[n_u:]
    )
    return unlabelled, labelled


def m2_loss(
    unlabelled: dict[str, tf.Tensor],
    labelled: dict[str, tf.Tensor],
    weight_u: tf.Tensor,
    labelled_share: float,
    alpha: float,
) -> dict[str, tf.Tensor]:
    """J^α of Kingma et al. 2014 (eq. 9) per training image, estimated on one batch.

    J^α / N = (N_l/N)·mean_l(−L) + (N_u/N)·mean_u(−U) + a·mean_l(−log q(y|x)),
    with a = α/N (Kingma's code: α = 0.1·N, so a = 0.1), N_l/N = `labelled_share`.
    Each mean is unbiased, so the batch sizes only trade variance for cost.
    `weight_u` (B_u,) is 0 for padding rows of the unlabelled batch.

    Returns scalars: "objective" (descended, with β), "loss" (J^α/N at β = 1),
    and the ELBO's "recon" and "kl" mixed with the same shares (the unlabelled
    ones under q(y|x)); "cross_entropy", the labelled mean of −log q(y|x).
    """
    n_u = tf.reduce_sum(weight_u)
    share_u = 1.0 - labelled_share

    def mixed(name: str) -> tf.Tensor:
        mean_u = tf.reduce_sum(weight_u * unlabelled[name]) / n_u
        return labelled_share * tf.reduce_mean(labelled[name]) + share_u * mean_u

    cross_entropy = tf.reduce_mean(labelled["cross_entropy"])
    return {
        "objective": mixed("objective") + alpha * cross_entropy,
        "loss": mixed("loss") + alpha * cross_entropy,
        "recon": mixed("recon"),
        "kl": mixed("kl"),
        "cross_entropy": cross_entropy,
    }


def q_error(model: CVAE, x: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """100 where argmax q(y|x) misses the label, else 0, dropout off: (B,) float32."""
    predicted = tf.argmax(model.classifier_logits(x), axis=-1, output_type=tf.int32)
    return 100.0 * tf.cast(predicted != tf.cast(labels, tf.int32), tf.float32)


def prepare_batch(
    x: tf.Tensor, seed: tf.Tensor, add_noise: bool, binarize: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Clean images -> (encoder input, reconstruction target) for one batch."""
    seed_bin, seed_noise = tf.unstack(data_utils.split_seed(seed, 2))
    target = data_utils.binarize(x, seed_bin) if binarize else x
    x_input = data_utils.salt_and_pepper(target, seed_noise) if add_noise else target
    return x_input, target


TERMS = ("loss", "recon", "kl")
# (batches (S, B) int32, seeds (S, 2), start, stop, sums (3,) float64)
#   -> (sums (3,) float64, steps done)
ChunkFn = Callable[..., tuple[tf.Tensor, tf.Tensor]]


class Objective(NamedTuple):
    """What a training step optimises: its data corruption and its bound."""

    add_noise: bool = False  # Salt-and-pepper noise on the encoder's input.
    binarize: bool = False  # Resample binary pixels (dynamic binarisation).
    train_samples: int = 1  # K of the importance-weighted bound; 1 = the ELBO.
    kl_warmup_steps: int = 0  # Steps over which the KL weight rises to kl_weight; 0 = off.
    kl_weight: float = 1.0  # β, the KL's weight once warm (Higgins et al. 2017); 1 = the bound.
    # M2 (Kingma et al. 2014): labelled rows per step; 0 = every image labelled, no q(y|x).
    labelled_batch: int = 0
    labelled_share: float = 0.0  # M2: N_l / N, the labelled images' share of the training set.
    alpha: float = 0.1  # M2: weight of q(y|x)'s cross-entropy per image (the paper's α / N).

    @property
    def semi_supervised(self) -> bool:
        """Whether the steps train M2 on labelled and unlabelled rows (`m2_loss`)."""
        return self.labelled_batch > 0

    def beta(self, step: tf.Tensor) -> tf.Tensor | None:
        """The KL weight β at this optimizer step, or None for the plain bound's exact ops."""
        if not self.kl_warmup_steps and self.kl_weight == 1.0:
            return None
        ramp = warmup_ramp(step, self.kl_warmup_steps) if self.kl_warmup_steps else 1.0
        return self.kl_weight * ramp


def _apply_step(
    model: CVAE,
    optimizer: keras.optimizers.Optimizer,
    x: tf.Tensor,
    labels: tf.Tensor,
    weight: tf.Tensor,
    global_batch: tf.Tensor,
    seed: tf.Tensor,
    objective: Objective,
) -> dict[str, tf.Tensor]:
    """One optimiser step on this replica's rows of a batch; returns per-term sums.

    The loss is Σ weight·(objective) / global_batch: the mean over the global
    batch once the optimizer sums the replicas' gradients (one replica: a plain
    mean). `weight` is 0 for padding rows, 1 otherwise; `global_batch` counts
    the rows of weight 1 over all replicas.
    """
    seed_batch, seed_model = tf.unstack(data_utils.split_seed(seed, 2))
    x_input, target = prepare_batch(x, seed_batch, objective.add_noise, objective.binarize)
    y = data_utils.one_hot(labels)
    beta = objective.beta(optimizer.iterations)
    with tf.GradientTape() as tape:
        terms = training_terms(model, x_input, target, y, seed_model, objective.train_samples, beta)
        loss = tf.reduce_sum(weight * terms["objective"]) / global_batch
        # A no-op, except under a LossScaleOptimizer (mixed precision).
        scaled_loss = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return {name: tf.reduce_sum(weight * terms[name]) for name in TERMS}


def _apply_m2_step(
    model: CVAE,
    optimizer: keras.optimizers.Optimizer,
    images: tf.Tensor,
    labels: tf.Tensor,
    batch: tf.Tensor,
    seed: tf.Tensor,
    objective: Objective,
) -> dict[str, tf.Tensor]:
    """One optimiser step of M2 on one device; returns per-term sums over the unlabelled rows.

    `batch` holds B_u unlabelled indices (−1 pads the last step), then
    `objective.labelled_batch` labelled ones. The unlabelled rows' labels are
    never gathered. The sums are the per-image terms of `m2_loss` times the
    unlabelled rows, so that an epoch's means are per-image values of J^α/N.
    """
    n_u = int(batch.shape[0]) - objective.labelled_batch
    index_u, index_l = batch[:n_u], batch[n_u:]
    weight_u = tf.cast(index_u >= 0, tf.float32)
    rows = tf.concat([tf.maximum(index_u, 0), index_l], 0)
    x = data_utils.scale_in_graph(tf.gather(images, rows))
    seed_batch, seed_model = tf.unstack(data_utils.split_seed(seed, 2))
    x_input, target = prepare_batch(x, seed_batch, objective.add_noise, objective.binarize)
    m2_batch = M2Batch(
        x_input[:n_u], target[:n_u], x_input[n_u:], target[n_u:], tf.gather(labels, index_l)
    )
    beta = objective.beta(optimizer.iterations)
    with tf.GradientTape() as tape:
        unlabelled, labelled = m2_terms(model, m2_batch, seed_model, beta, training=True)
        terms = m2_loss(unlabelled, labelled, weight_u, objective.labelled_share, objective.alpha)
        scaled_loss = optimizer.scale_loss(terms["objective"])
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return {name: terms[name] * tf.reduce_sum(weight_u) for name in TERMS}


def replicate(strategy: tf.distribute.Strategy, tensor: tf.Tensor):
    """A copy of `tensor` on each replica's device, made once (not at every step)."""
    if strategy.num_replicas_in_sync == 1:
        return tensor
    devices = strategy.extended.worker_devices

    def copy(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        # Replica ids are global across workers; each worker holds len(devices).
        with tf.device(devices[context.replica_id_in_sync_group % len(devices)]):
            return tf.identity(tensor)

    return strategy.experimental_distribute_values_from_function(copy)


def make_train_chunk(
    model: CVAE,
    optimizer: keras.optimizers.Optimizer,
    images: tf.Tensor,
    labels: tf.Tensor,
    objective: Objective,
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
) -> ChunkFn:
    """Training in compiled chunks of steps, the data resident on the device(s).

    Returns `train_chunk(batches, seeds, start, stop, sums)`: it runs steps
    `start .. stop-1`, step i training on images `batches[i]` (B indices into
    `images`) with random draws from `seeds[i]`. `images` (N, D) may be uint8
    pixels, scaled to [0, 1] after the gather (a resident copy 4× smaller than
    float32), or float32 in [0, 1]. It adds each step's per-term
    sums over its images to `sums` (float64, one per name of TERMS) and returns
    them with the number of steps run; it stops right after a step whose
    terms are not finite, so that the caller can say which step. Carrying the
    sums through makes them independent of where an epoch is cut into chunks.
    Between chunks, Python is free to update a progress bar or to stop.

    With `jit_compile`, a whole chunk is one XLA program on one device (`--xla`;
    see `train.use_xla` for when it is on), whose draws use threefry, the
    algorithm XLA fuses, and uniform numbers of 16 bits (probabilities exact to
    2^-16; `data_utils.random_algorithm`); without, Philox and 32 bits. Under a
    strategy with several replicas, each replica trains on its rows of the
    global batch (B split evenly, padded with weight-0 rows if B is not a
    multiple of the replicas). Index −1 in `batches` marks a padding row.

    For M2 (`objective.semi_supervised`) each row of `batches` holds B_u
    unlabelled indices then B_l labelled ones (`_apply_m2_step`); one replica only.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if objective.semi_supervised and replicas > 1:
        raise ValueError("M2 (semi-supervised) training runs on one replica only")
    with strategy.scope():
        images, labels = replicate(strategy, images), replicate(strategy, labels)

    def replica_step(images, labels, batch, seed):
        if objective.semi_supervised:
            terms = _apply_m2_step(model, optimizer, images, labels, batch, seed, objective)
            return tf.stack([terms[name] for name in TERMS])
        # This replica's share of the global batch's rows; index -1 pads.
        rows = -(-int(batch.shape[0]) // replicas)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        padded = tf.pad(batch, [[0, rows * replicas - batch.shape[0]]], constant_values=-1)
        index = padded[replica * rows :][:rows]
        weight = tf.cast(index >= 0, tf.float32)
        index = tf.maximum(index, 0)
        x = data_utils.scale_in_graph(tf.gather(images, index))
        terms = _apply_step(
            model, optimizer, x, tf.gather(labels, index), weight,
            tf.reduce_sum(tf.cast(batch >= 0, tf.float32)), seed, objective,
        )  # fmt: skip
        # One tensor, not a dict: MultiWorkerMirroredStrategy's reduce takes a single
        # value (MirroredStrategy's maps over a nest); one all-reduce a step, not three.
        return tf.stack([terms[name] for name in TERMS])

    compiled = jit_compile and replicas == 1

    @tf.function(jit_compile=compiled)
    def train_chunk(batches, seeds, start, stop, sums):
        # XLA: threefry, which it fuses, and two 16-bit uniforms per 32-bit draw (an epoch
        # of the benchmark: 5.73 s with 32-bit ones, 4.63 s; benchmarks/README.md).
        draws = ("threefry", 16) if compiled else ("auto_select", 32)  # Philox
        with data_utils.random_algorithm(*draws):
            return chunk_loop(batches, seeds, start, stop, sums)

    def chunk_loop(batches, seeds, start, stop, sums):
        sums = tf.convert_to_tensor(sums, tf.float64)  # (len(TERMS),)
        step = tf.convert_to_tensor(start, tf.int32)
        # A counter, not `tf.range(start, stop)`: XLA needs the range's length at
        # compile time, and compiled the chunk again for every (start, stop).
        while step < stop:
            per_replica = strategy.run(
                replica_step, args=(images, labels, batches[step], seeds[step])
            )
            terms = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            # float64 sums: 55,000 values near 10² lose no digit that matters.
            sums += tf.cast(terms, tf.float64)
            step += 1
            if not tf.reduce_all(tf.math.is_finite(terms)):
                break
        return sums, step - start

    return train_chunk


def _eval_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A held-out batch's seed -> (seed of its binarisation and noise, seed of ε)."""
    return tuple(tf.unstack(data_utils.split_seed(seed, 2)))


def make_eval_step(model: CVAE, add_noise: bool, binarize: bool) -> Callable[..., dict]:
    """Compiled evaluation of the training objective with dropout off.

    (images (B, D), int labels (B,), seed (2,)) -> per-example terms (B,), and
    for a model with q(y|x) (M2) "q_error", 100 per misclassified image. A
    fixed seed makes the noise, binarisation and ε the same at every call, so
    validation numbers of different epochs are comparable.
    """

    @tf.function
    def eval_step(x: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        seed_batch, seed_model = _eval_seeds(seed)
        x = data_utils.scale_in_graph(x)  # uint8 pixels or float32.
        x_input, target = prepare_batch(x, seed_batch, add_noise, binarize)
        terms = negative_elbo(model, x_input, target, data_utils.one_hot(labels), seed_model)
        if model.has_classifier:  # M2: also q(y|x)'s error on what it sees in training.
            terms["q_error"] = q_error(model, x_input, labels)
        return terms

    return eval_step


def seeded_batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[slice, tf.Tensor]]:
    """The rows of each batch of a held-out split, and its seed: batch i draws from (seed, i).

    Every held-out pass cuts its split this way, so that a batch's random draws
    depend on the seed, the batch size and the batch's place only, never on what
    ran before.
    """
    for i, start in enumerate(range(0, n, batch_size)):
        yield slice(start, start + batch_size), tf.constant([seed, i], dtype=tf.int64)


def heldout_elbo(
    eval_step: Callable[..., dict],
    x: tf.Tensor,
    labels: tf.Tensor,
    seed: int,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean −ELBO, reconstruction and KL over a whole split (nats per image).

    The batches draw as `seeded_batches` says: the result depends on the seed
    and the batch size only.
    """
    totals: dict[str, float] = {}
    n = int(x.shape[0])
    for rows, batch_seed in seeded_batches(n, batch_size, seed):
        terms = eval_step(x[rows], labels[rows], batch_seed)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(tf.reduce_sum(value))
    return {name: total / n for name, total in totals.items()}


# --- Held-out evaluation: importance-weighted likelihood, classifier, restoration ---

# Rows (images × labels × samples) decoded at once by the importance-weighted
# estimator: bounds its memory whatever K is, and is large enough that the
# evaluation is no slower (README, "Speed").
IW_MAX_ROWS = 2_000


def log_prior_ratio(z: tf.Tensor, eps: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """log p(z) − log q(z|x) for z = mean + std·ε, summed over the last axis.

    p = N(0, I), q = N(mean, diag std²); the ½ log 2π terms cancel, and q's
    quadratic form is ½ε², which is exact even where std is tiny.
    """
    return tf.reduce_sum(0.5 * tf.square(eps) - 0.5 * tf.square(z) + tf.math.log(std), -1)


def iw_log_likelihood(
    log_likelihood: Callable[[tf.Tensor], tf.Tensor],
    mean: tf.Tensor,
    std: tf.Tensor,
    n_samples: int,
    seed: tf.Tensor,
    chunk_size: int = 100,
) -> tf.Tensor:
    """Importance-weighted estimate of log p(x) (Burda et al. 2015, eq. 8).

    log p̂(x) = log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q = N(mean, std²),
    with the prior p(z) = N(0, I). E[log p̂] is the ELBO at K = 1, never exceeds
    log p(x), and rises to it as K grows. The K samples are drawn `chunk_size`
    at a time and their log-sum-exp accumulated, so memory does not grow with K.

    Args:
      log_likelihood: z (S, B, Z) -> log p(x|z) (S, B) for the B data points;
        any model (the CVAE's decoder, or a closed-form toy in the tests).
      mean, std: q(z|x) for the B points, (B, Z).
      n_samples: K >= 1, a Python int (fixed per compiled function).
      seed: (2,) int tensor; sample k draws from fold_in(seed, k).
      chunk_size: samples per chunk; sets the memory, not the estimate.

    Returns:
      (B,) estimates of log p(x), in the dtype of `mean`.
    """
    if n_samples < 1 or chunk_size < 1:
        raise ValueError(f"need n_samples, chunk_size >= 1, got {n_samples}, {chunk_size}")
    chunk_size = min(chunk_size, n_samples)
    n_full, rest = divmod(n_samples, chunk_size)
    shape = tf.shape(mean)

    def chunk_logsumexp(index: tf.Tensor, size: int) -> tf.Tensor:
        # Sample k draws from fold_in(seed, k), whatever chunk it falls in: the
        # estimate does not depend on chunk_size, a memory setting.
        first = index * chunk_size
        eps = tf.stack(
            [
                tf.random.stateless_normal(
                    shape,
                    seed=tf.random.experimental.stateless_fold_in(seed, first + k),
                    dtype=mean.dtype,
                )
                for k in range(size)
            ]
        )
        z = mean + std * eps  # (S, B, Z)
        log_w = log_likelihood(z) + log_prior_ratio(z, eps, std)  # (S, B)
        return tf.reduce_logsumexp(log_w, axis=0)  # (B,)

    total = chunk_logsumexp(tf.constant(0), chunk_size)
    for index in tf.range(1, n_full):  # A graph loop under tf.function: no unrolling.
        # One chunk at a time: a chunk does not depend on the running total, so the
        # loop's default of 10 iterations in flight held up to 10 chunks' decoder
        # outputs (+120 MB at the default run's peak) for at most a few per cent of
        # speed (100 images at K = 100, alternated on a shared CPU: 3.18 s, 3.09 s).
        tf.autograph.experimental.set_loop_options(parallel_iterations=1)
        total = tf.reduce_logsumexp(tf.stack([total, chunk_logsumexp(index, chunk_size)]), 0)
    if rest:
        total = tf.reduce_logsumexp(
            tf.stack([total, chunk_logsumexp(tf.constant(n_full), rest)]), 0
        )
    return total - tf.math.log(tf.cast(n_samples, mean.dtype))


def log_marginal_over_labels(log_p_x_given_y: tf.Tensor) -> tf.Tensor:
    """log p(x) = log Σ_y p(y) p(x|y) with a uniform p(y): (B, C) -> (B,)."""
    n_classes = tf.cast(tf.shape(log_p_x_given_y)[-1], log_p_x_given_y.dtype)
    return tf.reduce_logsumexp(log_p_x_given_y, axis=-1) - tf.math.log(n_classes)


def make_iw_step(model: CVAE, n_samples: int, images_per_batch: int) -> Callable[..., tf.Tensor]:
    """Compiled log p(x|y) for every label y, by importance weighting.

    (encoder inputs (B, D), images x (B, D), seed (2,)) -> log p(x|y), (B, C); the
    images as uint8 pixels or float32.
    The proposal is the encoder's q(z|input, y): the image x itself, or for a
    denoising model also its noised version; any proposal gives a valid bound
    on the same log p(x|y). Every (image, label) pair gets its own K samples;
    the sample chunk keeps each decoder call within IW_MAX_ROWS rows.
    """
    n_classes = data_utils.N_CLASSES
    chunk_size = max(1, IW_MAX_ROWS // (images_per_batch * n_classes))

    @tf.function
    def iw_step(x_input: tf.Tensor, x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        x_input, x = data_utils.scale_in_graph(x_input), data_utils.scale_in_graph(x)
        n_images = tf.shape(x)[0]
        # Pair every image with every label: row i*C + c is image i, label c.
        y = data_utils.one_hot(tf.tile(tf.range(n_classes), [n_images]))  # (B*C, C)
        x_rows = tf.repeat(x, n_classes, axis=0)  # (B*C, D)
        mean, std = model.encode(tf.repeat(x_input, n_classes, axis=0), y)

        def log_likelihood(z: tf.Tensor) -> tf.Tensor:
            n_draws = tf.shape(z)[0]
            logits = model.decode(tf.reshape(z, [-1, model.n_z]), tf.tile(y, [n_draws, 1]))
            log_px = bernoulli_log_likelihood(tf.tile(x_rows, [n_draws, 1]), logits)
            return tf.reshape(log_px, [n_draws, -1])  # (S, B*C)

        log_px_y = iw_log_likelihood(log_likelihood, mean, std, n_samples, seed, chunk_size)
        return tf.reshape(log_px_y, [n_images, n_classes])

    return iw_step


def iw_log_likelihoods(
    model: CVAE,
    x: tf.Tensor,
    n_samples: int,
    seed: int,
    images_per_batch: int = 100,
    verbose: bool = True,
    x_input: tf.Tensor | None = None,
) -> tf.Tensor:
    """log p(x|y) for every image and every label, (N, C), with a progress bar.

    The encoder sees `x_input` (default: x itself). The batches draw as
    `seeded_batches` says: an image's estimates depend only on its batch,
    never on what ran before.
    """
    x_input = x if x_input is None else x_input
    iw_step = make_iw_step(model, n_samples, images_per_batch)
    n = int(x.shape[0])
    n_batches = -(-n // images_per_batch)
    progbar = keras.utils.Progbar(n_batches, unit_name="batch", verbose=1 if verbose else 0)
    parts = []
    for done, (rows, batch_seed) in enumerate(seeded_batches(n, images_per_batch, seed), 1):
        parts.append(iw_step(x_input[rows], x[rows], batch_seed))
        progbar.update(done)
    return tf.concat(parts, axis=0)


def prepare_heldout(
    x: tf.Tensor, seed: int, add_noise: bool, binarize: bool, batch_size: int = 1000
) -> tuple[tf.Tensor, tf.Tensor]:
    """A held-out split's (encoder inputs, targets), drawn once from a fixed seed.

    The same draws as `heldout_elbo` with `make_eval_step` at the same seed and
    batch size. The binarisation does not depend on `add_noise`, so the
    targets are also those of an eval step without noise: the test −ELBO
    (computed without noise) and the importance-weighted metrics score the same
    binary images. Only the denoising metrics use the noised inputs.

    x as uint8 pixels gives uint8 results (`data_utils.to_pixels`, exact): the test
    split's two copies then take 16 MB, not 63, at the evaluation's memory peak.
    """
    pixels = x.dtype == tf.uint8
    inputs, targets = [], []
    for rows, batch_seed in seeded_batches(int(x.shape[0]), batch_size, seed):
        seed_batch, _ = _eval_seeds(batch_seed)
        batch = data_utils.scale_in_graph(x[rows])
        x_input, target = prepare_batch(batch, seed_batch, add_noise, binarize)
        if pixels:
            x_input, target = data_utils.to_pixels(x_input), data_utils.to_pixels(target)
        inputs.append(x_input)
        targets.append(target)
    return tf.concat(inputs, 0), tf.concat(targets, 0)


def posterior_mean(model: CVAE, x: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The mean of q(z|x,y), dropout off: images (B, D), int labels (B,) -> (B, Z)."""
    mean, _ = model.encode(x, data_utils.one_hot(labels), training=False)
    return mean


def mean_image(model: CVAE, z: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """E[x|z,y] = σ(logits), the mean of the Bernoulli p(x|z,y), dropout off: (B, D) in (0, 1).

    z (B, Z), int labels (B,). What every canvas shows: a mean, not a sample,
    since Bernoulli samples of grey-level digits are speckled noise.
    """
    return tf.sigmoid(model.decode(z, data_utils.one_hot(labels), training=False))


def reconstruct(
    model: CVAE, x_input: tf.Tensor, labels: tf.Tensor, batch_size: int = 1000
) -> tf.Tensor:
    """The mean image decoded at the posterior mean of q(z|x_input, y): (N, D) in (0, 1).

    For a denoising run, with the noised image as x_input, this is its restoration.
    x_input as uint8 pixels or float32.
    """
    parts = []
    for start in range(0, int(x_input.shape[0]), batch_size):
        x = data_utils.scale_in_graph(x_input[start : start + batch_size])
        y = labels[start : start + batch_size]
        parts.append(mean_image(model, posterior_mean(model, x, y), y))
    return tf.concat(parts, 0)


def classify(log_p_x_given_y: tf.Tensor) -> tf.Tensor:
    """The generative classifier: argmax_y p(y|x) = argmax_y p(x|y) under a uniform p(y).

    (B, C) -> int32 labels (B,). Ties go to the lower label (argmax's first index).
    """
    return tf.argmax(log_p_x_given_y, axis=-1, output_type=tf.int32)


def log_likelihood_of_labels(log_p_x_given_y: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """log p(x|y) at each image's own label: (B, C) and int labels (B,) -> (B,)."""
    return tf.gather(log_p_x_given_y, labels, batch_dims=1)
