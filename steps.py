"""Compiled training: the optimiser and its schedule, the objective, one step, the chunk.

`make_train_chunk` returns one `tf.function` that runs a chunk of optimiser
steps with the data resident on the device(s); train.py calls it between its
looks from Python (progress, Ctrl-C, NaN). The equations are cvae.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import keras
import tensorflow as tf

import cvae
import draws
import utils


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


def warmup_ramp(step: tf.Tensor, warmup_steps: int) -> tf.Tensor:
    """The KL warm-up of Sønderby et al. 2016: min(1, step / warmup_steps).

    Linear from 0 at the first step to 1 after `warmup_steps` (the steps of
    --kl_warmup epochs); `step` is the optimizer's checkpointed step count, so a
    resumed run continues the same ramp.
    """
    return tf.minimum(1.0, tf.cast(step, tf.float32) / float(warmup_steps))


def training_terms(
    model: cvae.CVAE,
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
        terms = cvae.negative_iw_bound(
            model, x_input, x_target, labels, seed, n_samples, beta, training=True
        )
    else:
        terms = cvae.negative_elbo(model, x_input, x_target, labels, seed, training=True)
        if beta is not None:
            terms["objective"] = terms["recon"] + beta * terms["kl"]
    terms.setdefault("objective", terms["loss"])
    return terms


TERMS = ("loss", "recon", "kl")


# (batches (S, B) int32, seeds (S, 2), start, stop, sums (3,) float64)
#   -> (sums (3,) float64, steps done)
ChunkFn = Callable[..., tuple[tf.Tensor, tf.Tensor]]


class Objective(NamedTuple):
    """What a training step optimises: its data corruption and its bound."""

    add_noise: bool = False  # Salt-and-pepper noise on the encoder's input.
    binarized: bool = False  # Resample binary pixels (dynamic binarisation).
    train_samples: int = 1  # K of the importance-weighted bound; 1 = the ELBO.
    kl_warmup_steps: int = 0  # Steps over which the KL weight rises to kl_weight; 0 = off.
    kl_weight: float = 1.0  # β, the KL's weight once warm (Higgins et al. 2017); 1 = the bound.
    # M2 (Kingma et al. 2014): labelled rows per step; 0 = every image labelled, no q(y|x).
    labelled_batch: int = 0
    labelled_share: float = 0.0  # M2: N_l / N, the labelled images' share of the training set.
    alpha: float = 0.1  # M2: weight of q(y|x)'s cross-entropy per image (the paper's α / N).
    features: bool = False  # Rows are M1's [mean ‖ std], z1 drawn per step (--features).

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


def batch_inputs(
    x: tf.Tensor, seed: tf.Tensor, objective: Objective
) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch's rows -> (encoder input, reconstruction target): the images noised and
    binarised as the objective says, or a fresh z1 from M1's posterior, both at once."""
    if objective.features:
        z1 = draws.sample_features(x, seed)
        return z1, z1
    return draws.prepare_batch(x, seed, objective.add_noise, objective.binarized)


def descend(
    model: cvae.CVAE,
    optimizer: keras.optimizers.Optimizer,
    loss_and_terms: Callable[[], tuple[tf.Tensor, dict[str, tf.Tensor]]],
) -> dict[str, tf.Tensor]:
    """One gradient step on `loss_and_terms()`'s loss, recorded by a tape; returns its terms.

    The loss goes through `optimizer.scale_loss`: a no-op, except under a
    LossScaleOptimizer (mixed precision), whose gradients it then unscales.
    """
    with tf.GradientTape() as tape:
        loss, terms = loss_and_terms()
        scaled_loss = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return terms


def _apply_step(
    model: cvae.CVAE,
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
    seed_batch, seed_model = tf.unstack(draws.split_seed(seed, 2))
    x_input, target = batch_inputs(x, seed_batch, objective)
    y = draws.one_hot(labels)
    beta = objective.beta(optimizer.iterations)

    def loss_and_terms():
        terms = training_terms(model, x_input, target, y, seed_model, objective.train_samples, beta)
        return tf.reduce_sum(weight * terms["objective"]) / global_batch, terms

    terms = descend(model, optimizer, loss_and_terms)
    return {name: tf.reduce_sum(weight * terms[name]) for name in TERMS}


def _apply_m2_step(
    model: cvae.CVAE,
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
    x = draws.scale_in_graph(tf.gather(images, rows))
    seed_batch, seed_model = tf.unstack(draws.split_seed(seed, 2))
    x_input, target = batch_inputs(x, seed_batch, objective)
    m2_batch = cvae.M2Batch(
        x_input[:n_u], target[:n_u], x_input[n_u:], target[n_u:], tf.gather(labels, index_l)
    )
    beta = objective.beta(optimizer.iterations)

    def loss_and_terms():
        unlabelled, labelled = cvae.m2_terms(model, m2_batch, seed_model, beta, training=True)
        share, alpha = objective.labelled_share, objective.alpha
        terms = cvae.m2_loss(unlabelled, labelled, weight_u, share, alpha)
        return terms["objective"], terms

    terms = descend(model, optimizer, loss_and_terms)
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
    model: cvae.CVAE,
    optimizer: keras.optimizers.Optimizer,
    images: tf.Tensor,
    labels: tf.Tensor,
    objective: Objective,
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
) -> ChunkFn:
    """Training in compiled chunks of steps, the data resident on the device(s).

    Returns `train_chunk(batches, seeds, start, stop, sums)`, which runs steps
    start..stop-1 (step i on the rows `batches[i]` of `images`, −1 = padding,
    drawing from `seeds[i]`), adds each step's per-term sums to `sums` (float64,
    one per TERMS) and returns them with the steps run; it stops right after a
    step whose terms are not finite. Carried through, the sums do not depend on
    where an epoch is cut into chunks. `images` (N, D): uint8 pixels, scaled
    after the gather, or float32 in [0, 1].

    With `jit_compile` and one replica, a chunk is one XLA program drawing by
    threefry with 16-bit uniforms (`draws.random_algorithm`); else Philox, 32
    bits. Several replicas each train on their rows of the global batch. For
    M2 a row of `batches` holds B_u unlabelled then B_l labelled indices.
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
        rows = utils.ceil_div(int(batch.shape[0]), replicas)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        padded = tf.pad(batch, [[0, rows * replicas - batch.shape[0]]], constant_values=-1)
        index = padded[replica * rows :][:rows]
        weight = tf.cast(index >= 0, tf.float32)
        index = tf.maximum(index, 0)
        x = draws.scale_in_graph(tf.gather(images, index))
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
        # XLA: threefry, which it fuses, and two 16-bit uniforms per 32-bit draw: half
        # the random bits, the dearest element-wise work (benchmarks/README.md).
        algorithm = ("threefry", 16) if compiled else ("auto_select", 32)  # Philox
        with draws.random_algorithm(*algorithm):
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


class LabelledSplit(NamedTuple):
    """M2's training images (--n_labeled): indices into the training tensors."""

    labelled: tf.Tensor  # (N_l,) int32, sorted: the images whose labels are kept
    unlabelled: tf.Tensor  # (N_u,) int32, sorted: the others; an epoch is a pass over them
    batch: int  # B_l, labelled rows per step


def epoch_batches(
    n_images: int, batch_size: int, seed: tf.Tensor, split: LabelledSplit | None = None
) -> tf.Tensor:
    """One row of image indices per step of an epoch, (steps, batch_size [+ B_l]), int32.

    A shuffle of the images from `seed`; the short last batch is padded with −1
    (rows that weigh nothing), so that every step has the same static shape and
    the compiled chunk is traced once. With `split` (M2), the shuffled images
    are the unlabelled ones (`n_images` of them), and each row continues with
    B_l labelled indices: reshuffled cycles of the labelled set, each cycle a
    permutation drawn from fold_in(seed, 1), so every labelled image is seen
    equally often.
    """
    n_steps = utils.ceil_div(n_images, batch_size)
    order = tf.random.experimental.stateless_shuffle(tf.range(n_images), seed=seed)
    if split is not None:
        order = tf.gather(split.unlabelled, order)
    batches = tf.reshape(
        tf.pad(order, [[0, n_steps * batch_size - n_images]], constant_values=-1),
        (n_steps, batch_size),
    )
    if split is None:
        return batches
    n_labelled, needed = int(split.labelled.shape[0]), n_steps * split.batch
    cycles = utils.ceil_div(needed, n_labelled)
    keys = tf.random.stateless_uniform(
        [cycles, n_labelled], seed=tf.random.experimental.stateless_fold_in(seed, 1)
    )
    drawn = tf.reshape(tf.gather(split.labelled, tf.argsort(keys, axis=1)), [-1])[:needed]
    return tf.concat([batches, tf.reshape(drawn, (n_steps, split.batch))], axis=1)
