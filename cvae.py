"""The conditional VAE: encoder q(z|x,y), decoder p(x|z,y), and every equation of its bounds.

Kingma & Welling 2014 (VAE), Sohn et al. 2015 (conditional VAE). Shapes use
B for the batch, D = 784 pixels, C = 10 classes, Z = n_z.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import keras
import tensorflow as tf

import draws
from data_utils import N_CLASSES, N_PIXELS

LEAKY_ALPHA = 0.2
STD_FLOOR = 1e-6  # Keeps log std finite when softplus underflows.


LIKELIHOODS = ("bernoulli", "gaussian")


class CVAE(keras.Model):
    """Two-hidden-layer MLP encoder and decoder, both conditioned on a one-hot label.

    With `conditional=False` neither network sees a label: the plain VAE of
    Kingma & Welling 2014, M1 of Kingma et al. 2014 (the label arguments are
    then ignored, and the first layers have no label rows). The decoder's
    likelihood is Bernoulli over pixels (logits), or for M2 on M1's real-valued
    features Gaussian (Kingma et al. 2014, §3.2: a mean and a log-variance).

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
        n_pixels: int = N_PIXELS,
        seed: int = 0,
        dtype_policy: str = "float32",
        classifier: bool = False,
        conditional: bool = True,
        likelihood: str = "bernoulli",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(n_hidden) != 4:
            raise ValueError(f"n_hidden needs four sizes (enc1, enc2, dec1, dec2), got {n_hidden}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.n_z = n_z
        self.keep_prob = keep_prob
        self.conditional = conditional
        self.likelihood = likelihood
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
        if likelihood == "gaussian":
            # Mean and log-variance, zero at the start: N(0, I), a model that knows nothing
            # yet, as Kingma's near-zero initialisation. He's would start at log-variances
            # of ±several, so at a likelihood thousands of nats off.
            self.dec_out = keras.layers.Dense(
                2 * n_pixels, kernel_initializer="zeros", dtype=dtype_policy
            )
        else:
            self.dec_out = dense(n_pixels, 5)  # Bernoulli logits
        # Build now so that checkpoints can be restored before the first step.
        self.encode(tf.zeros((1, n_pixels)), tf.zeros((1, N_CLASSES)))
        self.decode(tf.zeros((1, n_z)), tf.zeros((1, N_CLASSES)))
        self.has_classifier = classifier
        if classifier:
            # q(y|x) of M2 (Kingma et al. 2014, eq. 4): an MLP like the encoder. Only
            # then created, so that a plain model's checkpoint layout is unchanged.
            self.cls_hidden1, self.cls_hidden2 = dense(enc1, 6), dense(enc2, 7)
            self.cls_out = dense(N_CLASSES, 8)  # Logits of q(y|x)
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
            tf.unstack(draws.split_seed(seed, len(layers))) if training else [None] * len(layers)
        )
        for layer, layer_seed in zip(layers, seeds, strict=True):
            h = tf.nn.leaky_relu(layer(h), alpha=LEAKY_ALPHA)
            if training and self.keep_prob < 1.0:
                h = draws.dropout(h, self.keep_prob, layer_seed)
        return h

    def _with_labels(self, h: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """concat(h, one-hot labels) for a conditional model; h alone for a plain VAE."""
        return tf.concat([h, labels], axis=-1) if self.conditional else h

    def encode(
        self, x: tf.Tensor, labels: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z|x,y): images (B, D) and one-hot labels (B, C) -> mean, std (B, Z)."""
        h = self._mlp(self._with_labels(x, labels), self.encoder_hidden, training, seed)
        # float32 from here on, also under mixed precision: the loss terms need it.
        mean, raw_std = tf.split(tf.cast(self.enc_out(h), tf.float32), 2, axis=-1)
        return mean, tf.nn.softplus(raw_std) + STD_FLOOR

    def decode(
        self, z: tf.Tensor, labels: tf.Tensor, training: bool = False, seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        """p(x|z,y): latents (B, Z) and one-hot labels (B, C) -> the likelihood's
        parameters: Bernoulli logits (B, D), or the Gaussian's mean ‖ log-variance (B, 2D)."""
        h = self._mlp(self._with_labels(z, labels), self.decoder_hidden, training, seed)
        return tf.cast(self.dec_out(h), tf.float32)

    def log_likelihood(self, x: tf.Tensor, decoded: tf.Tensor) -> tf.Tensor:
        """log p(x|z,y) of rows x (B, D) under `decode`'s output, summed over D: (B,)."""
        if self.likelihood == "gaussian":
            mean, log_var = tf.split(decoded, 2, axis=-1)
            return gaussian_log_likelihood(x, mean, log_var)
        return bernoulli_log_likelihood(x, decoded)

    def mean_output(self, decoded: tf.Tensor) -> tf.Tensor:
        """E[x|z,y] under `decode`'s output: σ(logits), or the Gaussian's mean."""
        if self.likelihood == "gaussian":
            return tf.split(decoded, 2, axis=-1)[0]
        return tf.sigmoid(decoded)

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
        seeds = tf.unstack(draws.split_seed(seed, 2)) if training else [None, None]
        for index, layer_seed in enumerate(seeds):
            if index:
                h = self.enc_hidden2(h)
            h = tf.nn.leaky_relu(h, alpha=LEAKY_ALPHA)
            if training and self.keep_prob < 1.0:
                h = draws.dropout(h, self.keep_prob, layer_seed)
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
    n_pixels: int = N_PIXELS,
    n_classes: int = N_CLASSES,
    classifier: bool = False,
    conditional: bool = True,
    likelihood: str = "bernoulli",
) -> int:
    """The trainable weights and biases of `CVAE(n_z, n_hidden, classifier=...)`, counted
    without building it.

    `n_hidden` holds the four sizes (enc1, enc2, dec1, dec2); a dense layer
    from `a` to `b` units holds a·b + b numbers.
    """
    enc1, enc2, dec1, dec2 = n_hidden
    n_labels = n_classes if conditional else 0
    n_out = n_pixels * (2 if likelihood == "gaussian" else 1)
    layers = [
        (n_pixels + n_labels, enc1), (enc1, enc2), (enc2, 2 * n_z),  # encoder
        (n_z + n_labels, dec1), (dec1, dec2), (dec2, n_out),  # decoder
    ]  # fmt: skip
    if classifier:
        layers += [(n_pixels, enc1), (enc1, enc2), (enc2, n_classes)]
    return sum(n_in * n_out + n_out for n_in, n_out in layers)


def bernoulli_log_likelihood(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """log p(x|z) = Σ_pixels [x log σ(l) + (1−x) log(1−σ(l))], on logits for stability.

    Returns shape (B,). Grey-level x in [0, 1] gives the cross-entropy the
    original optimised; binary x gives a proper Bernoulli likelihood.
    """
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), -1)


def gaussian_log_likelihood(x: tf.Tensor, mean: tf.Tensor, log_var: tf.Tensor) -> tf.Tensor:
    """log N(x; mean, diag exp(log_var)) = −½ Σ_d [log 2π + log_var + (x − mean)² e^(−log_var)].

    M2's likelihood of M1's real-valued features (Kingma et al. 2014, §3.2,
    M1+M2; their code's p(z1|y,z2)). Returns shape (B,).
    """
    log_2pi = tf.math.log(tf.constant(2.0 * 3.141592653589793, x.dtype))
    return -0.5 * tf.reduce_sum(log_2pi + log_var + tf.square(x - mean) * tf.exp(-log_var), -1)


def gaussian_kl(mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """KL(N(mean, std²) ‖ N(0, I)) = ½ Σ (mean² + std² − log std² − 1), shape (B,).

    Kingma & Welling 2014, appendix B. (The original added +1 here, which
    shifted its reported bound by n_z nats.)
    """
    return 0.5 * tf.reduce_sum(tf.square(mean) + tf.square(std) - 2.0 * tf.math.log(std) - 1.0, -1)


class Posterior(NamedTuple):
    """q(z|x,y) of one batch and its reparameterised samples z = mean + std·ε."""

    mean: tf.Tensor  # (B, Z)
    std: tf.Tensor  # (B, Z)
    eps: tf.Tensor  # (B, Z), or (B, K, Z) for K samples per row
    z: tf.Tensor  # The shape of eps
    decoder_seed: tf.Tensor  # (2,): the decoder's dropout masks


def sample_posterior(
    encode: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    seed: tf.Tensor,
    n_samples: int | None = None,
) -> Posterior:
    """Encode, then draw z = mean + std·ε, ε ~ N(0, I): the reparameterisation trick
    (Kingma & Welling 2014, eq. 10), one sample per row or `n_samples` of them.

    `encode(seed)` -> (mean, std) runs the encoder with that dropout seed. One
    seed is split three ways (encoder dropout, ε, decoder dropout), so every
    bound that starts here draws alike.
    """
    seed_enc, seed_eps, seed_dec = tf.unstack(draws.split_seed(seed, 3))
    mean, std = encode(seed_enc)
    if n_samples is None:
        eps = draws.batch_draw(tf.random.stateless_normal, tf.shape(mean), seed_eps, mean.dtype)
        return Posterior(mean, std, eps, mean + std * eps, seed_dec)
    shape = tf.shape(mean)
    eps = draws.batch_draw(  # Rows first, so that replicas draw as one device.
        tf.random.stateless_normal, [shape[0], n_samples, shape[1]], seed_eps, mean.dtype
    )
    return Posterior(mean, std, eps, mean[:, None, :] + std[:, None, :] * eps, seed_dec)


def _one_sample_elbo(
    model: CVAE, posterior: Posterior, labels: tf.Tensor, x_target: tf.Tensor, training: bool
) -> dict[str, tf.Tensor]:
    """−ELBO's terms from one sample per row: −log p(x_target|z,y) and the analytic KL."""
    decoded = model.decode(posterior.z, labels, training=training, seed=posterior.decoder_seed)
    recon = -model.log_likelihood(x_target, decoded)
    kl = gaussian_kl(posterior.mean, posterior.std)
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def negative_elbo(
    model: CVAE,
    x_input: tf.Tensor,
    x_target: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    training: bool = False,
) -> dict[str, tf.Tensor]:
    """Per-example −ELBO = −E_q[log p(x_target|z,y)] + KL(q(z|x_input,y) ‖ p(z)).

    Kingma & Welling 2014, eq. 10, with one sample z = mean + std·ε. With noise
    on, x_input is the noised image and x_target the clean one (a denoising CVAE).

    Returns dict of (B,) tensors: "loss", "recon" (−log-likelihood), "kl".
    """
    posterior = sample_posterior(
        lambda s: model.encode(x_input, labels, training=training, seed=s), seed
    )
    return _one_sample_elbo(model, posterior, labels, x_target, training)


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
    posterior = sample_posterior(
        lambda s: model.encode(x_input, labels, training=training, seed=s), seed, n_samples
    )
    mean, std, eps, z = posterior.mean, posterior.std, posterior.eps, posterior.z  # z: (B, K, Z)
    logits = model.decode(
        tf.reshape(z, [-1, model.n_z]), tf.repeat(labels, n_samples, axis=0),
        training=training, seed=posterior.decoder_seed,
    )  # fmt: skip
    log_px = tf.reshape(
        model.log_likelihood(tf.repeat(x_target, n_samples, axis=0), logits), [-1, n_samples]
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
    n_classes = N_CLASSES
    posterior = sample_posterior(  # (B·C, Z)
        lambda s: model.encode_all_labels(x_input, training=training, seed=s), seed
    )
    labels = draws.one_hot(tf.tile(tf.range(n_classes), [tf.shape(x_input)[0]]))
    targets = tf.repeat(x_target, n_classes, axis=0)  # (B·C, D)
    terms = _one_sample_elbo(model, posterior, labels, targets, training)
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
    seed_cls, seed_u, seed_l = tf.unstack(draws.split_seed(seed, 3))
    n_u = tf.shape(batch.input_u)[0]
    logits = model.classifier_logits(
        tf.concat([batch.input_u, batch.input_l], 0), training=training, seed=seed_cls
    )  # (B_u + B_l, C)
    all_labels = negative_elbo_all_labels(
        model, batch.input_u, batch.target_u, seed_u, training=training
    )
    unlabelled = unlabelled_bound(all_labels, logits[:n_u], beta)
    labelled = negative_elbo(
        model, batch.input_l, batch.target_l, draws.one_hot(batch.labels_l), seed_l,
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


# --- Held-out evaluation: importance-weighted likelihood, classifier, restoration ---


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
        # One chunk at a time: chunks do not depend on the running total, so the loop's
        # default of 10 in flight would hold 10 chunks' decoder outputs for little speed.
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


def posterior_mean(model: CVAE, x: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The mean of q(z|x,y), dropout off: images (B, D), int labels (B,) -> (B, Z)."""
    mean, _ = model.encode(x, draws.one_hot(labels), training=False)
    return mean


def mean_image(model: CVAE, z: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """E[x|z,y], dropout off: σ(logits) of the Bernoulli p(x|z,y), (B, D) in (0, 1), or
    the Gaussian's mean.

    z (B, Z), int labels (B,). What every canvas shows: a mean, not a sample,
    since Bernoulli samples of grey-level digits are speckled noise.
    """
    return model.mean_output(model.decode(z, draws.one_hot(labels), training=False))


def classify(log_p_x_given_y: tf.Tensor) -> tf.Tensor:
    """The generative classifier: argmax_y p(y|x) = argmax_y p(x|y) under a uniform p(y).

    (B, C) -> int32 labels (B,). Ties go to the lower label (argmax's first index).
    """
    return tf.argmax(log_p_x_given_y, axis=-1, output_type=tf.int32)


def log_likelihood_of_labels(log_p_x_given_y: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """log p(x|y) at each image's own label: (B, C) and int labels (B,) -> (B,)."""
    return tf.gather(log_p_x_given_y, labels, batch_dims=1)
