"""Time the test evaluation and predict it for the full test set and several K.

    python benchmarks/bench_eval.py [--n_z 50] [--n_eval 500] [--iw_samples 50] [--add_noise True]

The cost does not depend on the weights, so a freshly built model of the
run's size stands in for a trained one. The importance-weighted part costs
n_eval × 10 labels × K decoder passes; the rest (−ELBO, denoising) is fixed.
Prints the measured times, the cost per decoder pass, and the predicted
wall time of `evaluate_run` on all 10,000 test images for a range of K.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import io

import data_utils
import main


def timed_evaluation(model, splits, config: main.Config) -> float:
    """Seconds for one evaluate_run (its printed table swallowed)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        main.evaluate_run(model, splits, config)
    return time.perf_counter() - start


def bench(argv: list[str]) -> None:
    config = main.parse_args(argv)
    n = config.n_eval or data_utils.N_TEST
    splits = main.load_splits(config)
    model = main.build_state(config)[0]
    # First calls trace the compiled functions: not part of the steady cost.
    timed_evaluation(model, splits, dataclasses.replace(config, n_eval=min(n, 100)))
    fixed = timed_evaluation(model, splits, dataclasses.replace(config, iw_samples=0))
    total = timed_evaluation(model, splits, config)
    passes = n * data_utils.N_CLASSES * config.iw_samples
    per_pass = (total - fixed) / passes
    fixed_full = fixed * data_utils.N_TEST / n
    print(f"n_z={config.n_z} n_hidden={config.hidden_sizes} add_noise={config.add_noise}")
    print(f"{os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}")
    print(
        f"measured on {n} test images: without IW {fixed:.1f}s, with K={config.iw_samples} "
        f"{total:.1f}s -> {1e6 * per_pass:.1f} us per decoder pass"
    )
    print("predicted evaluate_run on all 10,000 test images (10 labels each):")
    for k in (0, 1, 10, 25, 50, 100, 200, 500, 1000, 5000):
        seconds = fixed_full + per_pass * data_utils.N_TEST * data_utils.N_CLASSES * k
        print(f"  K={k:5d}: {seconds / 60:8.1f} min")


if __name__ == "__main__":
    bench(sys.argv[1:] or ["--n_z", "50", "--n_eval", "500", "--iw_samples", "50"])
