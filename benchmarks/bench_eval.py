"""Time the test evaluation and predict it for the full test set and several K.

    python benchmarks/bench_eval.py [--n_z 50] [--n_eval 500] [--iw_samples 50] [--add_noise True]

The cost does not depend on the weights, so a freshly built model of the
run's size stands in for a trained one. The importance-weighted part costs
n_eval × 10 labels × K decoder passes; the rest (−ELBO, denoising) is fixed.
Prints the measured times, the cost per decoder pass beside the bound that
the decoder's matmul FLOPs set at the machine's large-matmul speed, and the
predicted wall time of `compute_test_metrics` on all 10,000 test images for a
range of K, and of Burda et al.'s K = 5,000 on the first 1,000.

`evaluate.compute_test_metrics` builds its compiled functions anew at every call, so each
traces them again. Here the factories are cached: a first call traces, the
timed calls reuse the same functions, and the tracing is reported apart (a
real evaluation pays it once).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import functools
import io

import utils  # First: it quiets TensorFlow's start-up chatter.

# isort: split
import checkpoints
import data_utils
import evaluate
import train
from config import Config, parse_flags

# isort: split
from bench_train import make_matmul_timer  # This folder's sibling script.

MATMUL_SIZE = 1024  # As bench_train's: large enough for the kernels' full speed.


def reuse_compiled_functions() -> None:
    """Make compute_test_metrics's calls share their tf.functions (same model and settings)."""
    for name in ("make_eval_step", "make_iw_step"):
        setattr(evaluate, name, functools.cache(getattr(evaluate, name)))


def timed_evaluation(model, splits, config: Config) -> float:
    """Seconds for one compute_test_metrics (its printed table swallowed)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate.compute_test_metrics(model, splits, config)
    return time.perf_counter() - start


def bench(argv: list[str]) -> None:
    config = parse_flags(argv)
    n = config.n_eval or data_utils.N_TEST
    splits = train.load_splits(config)
    model = checkpoints.build_state(config).model
    reuse_compiled_functions()
    first = timed_evaluation(model, splits, config)  # Traces every function it needs.
    fixed = timed_evaluation(model, splits, dataclasses.replace(config, iw_samples=0))
    total = timed_evaluation(model, splits, config)
    tracing = first - total
    passes = n * data_utils.N_CLASSES * config.iw_samples
    per_pass = (total - fixed) / passes
    print(f"n_z={config.n_z} n_hidden={config.hidden_sizes} add_noise={config.add_noise}")
    print(f"{utils.device_description()}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"measured on {n} test images: without IW {fixed:.1f}s, with K={config.iw_samples} "
        f"{total:.1f}s -> {1e6 * per_pass:.1f} us per decoder pass "
        f"(tracing, paid once per evaluation: {tracing:.1f}s more on the first call)"
    )
    print_matmul_bound(model, per_pass)

    def predicted_minutes(n_images: int, k: int) -> float:
        iw = per_pass * n_images * data_utils.N_CLASSES * k
        return (tracing + fixed * n_images / n + iw) / 60

    print("predicted test evaluation on all 10,000 test images (10 labels each), with tracing:")
    for k in (0, 1, 10, 25, 50, 100, 200, 500, 1000, 5000):
        print(f"  K={k:5d}: {predicted_minutes(data_utils.N_TEST, k):8.1f} min")
    print(
        f"  K= 5000 on the first 1,000 (Burda et al.'s K): {predicted_minutes(1000, 5000):.1f} min"
    )


def print_matmul_bound(model, per_pass: float) -> None:
    """The decoder's forward matmul FLOPs per pass, and the time they take at full speed."""
    shapes = [tuple(model.dense_layers[name].kernel.shape) for name in ("dec1", "dec2", "dec_out")]
    flops = sum(2 * n_in * n_out for n_in, n_out in shapes)
    products = " + ".join(f"2·{n_in}·{n_out}" for n_in, n_out in shapes)
    seconds = sorted(make_matmul_timer(MATMUL_SIZE)(5))[2]
    gflops = 2 * MATMUL_SIZE**3 / seconds / 1e9
    bound = flops / (gflops * 1e9)
    print(
        f"decoder pass: {products} = {flops:,} FLOP of matmuls; at the {MATMUL_SIZE}³ matmul's "
        f"{gflops:.0f} GFLOP/s (median of 5) that is {1e6 * bound:.1f} us: "
        f"the measured pass takes {per_pass / bound:.2f}× that bound"
    )


if __name__ == "__main__":
    bench(sys.argv[1:] or ["--n_z", "50", "--n_eval", "500", "--iw_samples", "50"])
