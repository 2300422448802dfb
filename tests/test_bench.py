"""The training benchmark's smoke mode runs and prints every figure (no timing asserted)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # Every test here runs a benchmark in a new process.

# Each figure the README quotes, with the number it must carry.
FIGURES = [
    r"device: \S+",
    r"precision: (float32|mixed_float16), XLA (on|off)",
    r"import TensorFlow and the project: [\d.]+ s",
    r"open the run: data, model, optimizer, steps \(train.open_run\): [\d.]+ s",
    r"warm-up epoch \(includes tracing/compilation\): [\d.]+ s",
    r"validation evaluation \(also once per epoch\): [\d.]+ s",
    r"canvases \(plot.write_canvases\): [\d.]+ s",
    r"test evaluation \(evaluate.compute_test_metrics, 500 images, K=\d+\): [\d.]+ s",
    r"enc1 +4·794·500 = 1,588,000",
    r"dec_out +6·500·784 = 2,352,000",
    r"total 7,150,000 × 6400 images = 45\.8 GFLOP/epoch",
    r"matmul 1024³ float32 \(median of \d+, around the timed epochs\): [\d.]+ GFLOP/s",
    r"matmul-bound epoch: [\d.]+ s",
    r"the model's matmuls alone, same shapes, one compiled loop \(median of 2\): "
    r"[\d.]+ s per epoch, ratio [\d.]+",
    r"peak resident memory of a default run \(python main.py --add_noise True --epochs 2 "
    r"--n_train 6400 --n_eval 500, \d+ s, in a child process\): \d+ MB",
    r"epoch seconds \(median of 2\): [\d.]+ s",
    r"images per second: [\d,]+",
    r"peak resident memory: \d+ MB",
    r"ratio \(epoch seconds / matmul-bound epoch\): [\d.]+",
    r"  of which before the first chunk was called: [\d.]+ s",
    r"M2 matmul FLOPs per image \(.*\): [\d,]+ against the plain model's 7,150,000; per epoch "
    r"[\d.]+× the plain epoch's",
    r"M2 \(--n_labeled 100, 32 labelled \+ 128 unlabelled images per step\) against the plain "
    r"model, same flags, .*: M2 [\d.]+ s per epoch \(6300 unlabelled images\), plain [\d.]+ s "
    r"\(6400 images\): ratio [\d.]+",
    r"epoch seconds / matmul-bound epoch \(its FLOPs at [\d.]+ GFLOP/s\): M2 [\d.]+ "
    r"\([\d.]+ s\), plain [\d.]+ \([\d.]+ s\)",
]

# The figures the speed issue asks for, each with the number it prints.
NEW_FIGURES = {
    "floor ratio": r"ratio to the floor \(epoch seconds / the model's matmuls alone\): (\S+)\n",
    "default run": r"default run \(python main.py --add_noise True --n_train 6400 --n_eval 500\): "
    r"(\S+) s per epoch \(epoch 2 of 2\)\n",
    "start-up": r"start-up of the default run \(process start to the end of its first chunk of "
    r"\d+ steps, tracing included\): (\S+) s\n",
}


def printed(pattern: str, text: str) -> float:
    """The number that `pattern`'s group captures in `text`: present, positive and finite."""
    found = re.search(pattern, text)
    assert found, f"not printed: {pattern}\n{text}"
    value = float(found.group(1))
    assert math.isfinite(value) and value > 0, found.group(0)
    return value


def assert_is_ratio(ratio: float, epoch_s: float, floor_s: float) -> None:
    """`ratio` is epoch_s / floor_s, all three printed to two decimals, to that rounding."""
    half = 0.005
    low = (epoch_s - half) / (floor_s + half) - half
    high = (epoch_s + half) / (floor_s - half) + half if floor_s > half else math.inf
    assert low <= ratio <= high, f"{ratio} is not {epoch_s} / {floor_s}"


def check_floor_ratio(stdout: str) -> None:
    """The floor ratio is the printed epoch seconds over the printed floor, to their rounding."""
    ratio = printed(NEW_FIGURES["floor ratio"], stdout)
    epoch_s = printed(r"epoch seconds \(median of \d+\): (\S+) s\n", stdout)
    floor_s = printed(r"one compiled loop \(median of \d+\): (\S+) s per epoch", stdout)
    assert_is_ratio(ratio, epoch_s, floor_s)


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/`script` with `args`, run to its end with exit code 0."""
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / script), *args],
        cwd=PROJECT, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quick_benchmark_prints_every_figure():
    # --xla off for its own epochs (compiling the plain and the M2 model took ~20 s here);
    # its default run still compiles, and the ablation's smoke test times a compiled epoch.
    proc = run_benchmark("bench_train.py", "--quick", "--xla", "off")
    missing = [pattern for pattern in FIGURES if not re.search(pattern, proc.stdout)]
    assert not missing, f"not printed: {missing}\n{proc.stdout}"
    # The ratio to the matmul-bound epoch is the printed epoch seconds over that bound.
    ratio = printed(r"ratio \(epoch seconds / matmul-bound epoch\): ([\d.]+)", proc.stdout)
    epoch_s = printed(r"epoch seconds \(median of \d+\): (\S+) s\n", proc.stdout)
    bound_s = printed(r"matmul-bound epoch: ([\d.]+) s", proc.stdout)
    assert_is_ratio(ratio, epoch_s, bound_s)
    for pattern in NEW_FIGURES.values():
        printed(pattern, proc.stdout)
    check_floor_ratio(proc.stdout)


EVAL_FIGURES = [
    r"measured on 20 test images: without IW [\d.]+s, with K=3 [\d.]+s -> [\d.]+ us per "
    r"decoder pass",
    r"decoder pass: 2·15·500 \+ 2·500·500 \+ 2·500·784 = 1,299,000 FLOP of matmuls; at the "
    r"1024³ matmul's \d+ GFLOP/s \(median of 5\) that is [\d.]+ us: the measured pass takes "
    r"[\d.]+× that bound",
    r"K= 1000: +[\d.]+ min",
    r"K= 5000 on the first 1,000 \(Burda et al.'s K\): [\d.]+ min",
]


def test_evaluation_benchmark_prints_its_cost_beside_the_matmul_bound():
    proc = run_benchmark("bench_eval.py", "--n_z", "5", "--n_eval", "20", "--iw_samples", "3")
    missing = [pattern for pattern in EVAL_FIGURES if not re.search(pattern, proc.stdout)]
    assert not missing, f"not printed: {missing}\n{proc.stdout}"


def test_ablation_benchmark_prints_each_variant_against_the_floor():
    proc = run_benchmark("bench_ablation.py", "--quick")
    floor_s = printed(r"matmuls alone, one compiled loop \(median of 1\): (\S+) s\n", proc.stdout)
    variants = re.findall(r"\n([^\n:]+): (\S+) s per epoch, (\S+)× the floor", proc.stdout)
    names = [name for name, _, _ in variants]
    # --quick: the compiled configuration and the uncompiled one.
    assert len(names) == 2 and names[0].startswith("as benchmarked"), names
    assert "--xla off" in names[1], names
    for name, epoch, ratio in variants:
        assert float(epoch) > 0, name
        assert_is_ratio(float(ratio), float(epoch), floor_s)
