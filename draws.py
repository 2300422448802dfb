"""Every random draw inside the graph, and the pixel conversions around them.

Seeds are split statelessly (`split_seed`), so that a step's draws depend on
its seed alone: a run repeats, resumes and spreads over replicas exactly.
Dropout masks, the reparameterisation's ε, the original's salt-and-pepper
noise and dynamic binarisation all draw through `batch_draw`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import tensorflow as tf

from data_utils import INV_255, N_CLASSES


class Draws(NamedTuple):
    """How the graphs being traced draw their random numbers (`random_algorithm`)."""

    alg: str = "auto_select"  # Of tf.random's stateless ops: Philox (see below), or threefry.
    uniform_bits: int = 32  # Of each uniform number: 32 (float32's own), or 16 (k / 2^16).


# Philox by default: TensorFlow's CPU kernels have no other. Asked for as "auto_select",
# not "philox": the same numbers (tested), from one kernel instead of ~40 small ops that
# derive the key and counter. Inside an XLA-compiled chunk, threefry: XLA lowers it to
# element-wise code that it fuses with the ops around it (benchmarks/README.md).
_DRAWS: contextvars.ContextVar[Draws] = contextvars.ContextVar("draws", default=Draws())  # noqa: B039 (immutable)


@contextlib.contextmanager
def random_algorithm(alg: str, uniform_bits: int = 32):
    """Within this block, graphs being traced draw with `alg` ("auto_select", which is
    Philox, or "threefry"), and uniform numbers from `uniform_bits` random bits each
    (32 or 16).

    Read when a graph is traced, not when it runs, and by the tracing thread only:
    enter it inside the traced function.
    """
    if uniform_bits not in (16, 32):
        raise ValueError(f"uniform_bits must be 16 or 32, got {uniform_bits}")
    token = _DRAWS.set(Draws(alg, uniform_bits))
    try:
        yield
    finally:
        _DRAWS.reset(token)


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
    """`num` new seeds (num, 2) from one, with the current `random_algorithm`."""

    return tf.random.experimental.stateless_split(seed, num, alg=_DRAWS.get().alg)


def stateless_uniform16(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType, alg: str):
    """Uniform numbers k / 2^16 (k = 0 .. 2^16 − 1), two from each 32-bit draw.

    Half the random bits of `tf.random.stateless_uniform`; a probability p is then
    drawn as ⌈2^16·p⌉ / 2^16, within 2^-16 of p (keep_prob 0.6: 0.599991).
    """

    shape = tf.convert_to_tensor(shape, tf.int32)
    width = shape[-1]
    halves = tf.concat([shape[:-1], [(width + 1) // 2]], 0)
    bits = tf.random.stateless_uniform(
        halves, seed=seed, minval=None, maxval=None, dtype=tf.uint32, alg=alg
    )
    low = tf.bitwise.bitwise_and(bits, tf.constant(0xFFFF, tf.uint32))
    high = tf.bitwise.right_shift(bits, tf.constant(16, tf.uint32))
    k = tf.concat([low, high], -1)[..., :width]
    return tf.cast(k, dtype) * tf.cast(2.0**-16, dtype)


def batch_draw(sample, shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """A stateless draw for a batch (rows first), the same on one device or several.

    Under a tf.distribute strategy each replica holds rows [r·b, (r+1)·b) of the
    global batch; it draws the global batch's numbers and keeps its rows, so two
    replicas see exactly the noise one device would. That costs R× the random
    numbers, which is small next to the matmuls; with one replica it is a plain draw.
    The algorithm is the current `random_algorithm`.

    Args:
      sample: `tf.random.stateless_uniform` or `tf.random.stateless_normal`.
      shape: this replica's shape, (b, ...).
      seed: shape (2,).
    """

    alg = _DRAWS.get().alg
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    if replicas == 1:
        return sample(shape, seed=seed, dtype=dtype, alg=alg)
    rows = shape[0]
    draw = sample(tf.concat([[rows * replicas], shape[1:]], 0), seed=seed, dtype=dtype, alg=alg)
    return draw[context.replica_id_in_sync_group * rows :][:rows]


def batch_uniform(
    shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType | str = "float32"
) -> tf.Tensor:
    """Uniform [0, 1) numbers for a batch; see `batch_draw` (and `random_algorithm` for
    their bits)."""

    if _DRAWS.get().uniform_bits == 16:
        return batch_draw(stateless_uniform16, shape, seed, tf.as_dtype(dtype))
    return batch_draw(tf.random.stateless_uniform, shape, seed, dtype)


def scale_in_graph(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1], in the graph; float32 input (already in
    [0, 1]) is returned as it is."""

    if pixels.dtype == tf.float32:
        return pixels
    if pixels.dtype != tf.uint8:
        raise TypeError(f"images must be uint8 pixels or float32 in [0, 1], got {pixels.dtype}")
    return tf.cast(pixels, tf.float32) * INV_255


def to_pixels(x: tf.Tensor) -> tf.Tensor:
    """float32 images whose values are k/255 (scaled pixels, noised or binarised: the
    noise and the binarisation set pixels to 0 or 1) -> uint8 k, in the graph.

    Exact: `scale_in_graph` of the result gives back x to the bit, in a quarter of
    the memory.
    """

    return tf.cast(tf.round(x * 255.0), tf.uint8)


def one_hot(labels: tf.Tensor) -> tf.Tensor:
    """Integer labels (batch,) -> float32 one-hot (batch, 10)."""

    return tf.one_hot(labels, N_CLASSES, dtype=tf.float32)


def salt_and_pepper(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The original's training noise, drawn in the graph from a stateless seed.

    Each pixel becomes 0 with probability 0.1, 1 with probability 0.1, else is
    kept; then every pixel is zeroed with probability 0.5. The two draws are
    independent, so one uniform u per pixel gives exactly that distribution:
    0 if u < 0.55 (= 0.5 + 0.5·0.1), 1 if 0.55 <= u < 0.6 (0.5·0.1), else
    kept. One random number per pixel instead of two, and arithmetic instead
    of selects: random numbers are the dearest elementwise work of a CPU step.

    Args:
      x: images in [0, 1], any shape.
      seed: int32/int64 tensor of shape (2,), e.g. from `Generator.make_seeds`.
    """

    u = batch_uniform(tf.shape(x), seed, x.dtype)
    kept = tf.cast(u >= 0.6, x.dtype)
    return x * kept + (tf.cast(u >= 0.55, x.dtype) - kept)


def bernoulli_pixels(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each pixel becomes 1 with probability equal to its grey level (Burda et al.)."""

    u = batch_uniform(tf.shape(x), seed, x.dtype)
    return tf.cast(u < x, x.dtype)


def dropout(h: tf.Tensor, keep_prob: float, seed: tf.Tensor) -> tf.Tensor:
    """Inverted dropout: keep each unit with probability keep_prob, scaled by 1/keep_prob.

    The same values as `tf.nn.experimental.stateless_dropout` (a dropped
    negative unit is −0.0 here, +0.0 there), with the mask
    drawn by `batch_uniform` so that several replicas drop exactly
    the units one device would. A product with the scaled mask, not a select:
    its gradient is one more product, and selects are slow on a CPU.
    """
    keep = batch_uniform(tf.shape(h), seed, h.dtype) >= 1.0 - keep_prob
    return h * (tf.cast(keep, h.dtype) * tf.cast(1.0 / keep_prob, h.dtype))


def prepare_batch(
    x: tf.Tensor, seed: tf.Tensor, add_noise: bool, binarized: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Clean images -> (encoder input, reconstruction target) for one batch."""
    seed_bin, seed_noise = tf.unstack(split_seed(seed, 2))
    target = bernoulli_pixels(x, seed_bin) if binarized else x
    x_input = salt_and_pepper(target, seed_noise) if add_noise else target
    return x_input, target


def sample_features(rows: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """z1 = mean + std·ε from rows [mean ‖ std] (B, 2d) of M1's posterior: (B, d).

    M2 on M1's features draws them afresh at every step (Kingma et al. 2014, M1+M2).
    """
    mean, std = tf.split(rows, 2, axis=-1)
    return mean + std * batch_draw(tf.random.stateless_normal, tf.shape(mean), seed, mean.dtype)
