"""Where an epoch's time goes beyond its matmuls: the benchmark run with parts turned off.

    python benchmarks/bench_ablation.py            # the figures in benchmarks/README.md
    python benchmarks/bench_ablation.py --quick    # a smoke test, its figures meaningless (CI):
                                                   # two variants (the first and the last)

Opens one run per variant of bench_train's configuration (each its own model,
set up by `train.open_run` as a run is), warms each up, then times their
epochs in turn, round after round, so that every variant sees the same
background load; prints each variant's median epoch against the model's
matmuls alone (bench_train's floor), timed in the same rounds. The variants
turn off, by their flags, what a step does besides the matmuls: dropout
(`--keep_prob 1.0`), the noise (`--add_noise False`), both, and XLA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train

VARIANTS = {
    "as benchmarked (XLA, threefry draws)": [],
    "no dropout (--keep_prob 1.0)": ["--keep_prob", "1.0"],
    "no noise (--add_noise False)": ["--add_noise", "False"],
    "neither dropout nor noise": ["--keep_prob", "1.0", "--add_noise", "False"],
    "without XLA (--xla off, Philox draws)": ["--xla", "off"],
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="640 images, 1 round, 2 variants: a smoke test"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each variant")
    args = parser.parse_args(argv)
    import utils  # First: it quiets TensorFlow's start-up chatter.

    # isort: split
    import train
    from config import parse_flags

    n_train = 640 if args.quick else 55_000
    rounds = 1 if args.quick else args.rounds
    flags = [*bench_train.BENCH_FLAGS, "--seed", "0", "--n_train", str(n_train)]
    names = [*VARIANTS]
    if args.quick:  # One compiled variant and the uncompiled one: each compile takes seconds.
        names = [names[0], names[-1]]
    with tempfile.TemporaryDirectory() as work_dir:
        runs = {}
        for name in names:
            extra = ["--results_dir", f"{work_dir}/{len(runs)}"]
            config = parse_flags([*flags, *VARIANTS[name], *extra])
            runs[name] = train.open_run(config)
        epochs = {
            name: lambda run=run: train.train_one_epoch(
                run.train_chunk, n_train, run.state.generator, run.config.batch_size
            )
            for name, run in runs.items()
        }
        first = next(iter(runs.values()))
        floor = bench_train.make_matmul_only_epoch(
            first.state.model,
            first.config.batch_size,
            utils.ceil_div(n_train, first.config.batch_size),
        )
        for epoch in epochs.values():  # Warm-up: tracing and compilation.
            epoch()
        seconds: dict[str, list[float]] = {name: [] for name in [*epochs, "floor"]}
        for _ in range(rounds):
            seconds["floor"].append(bench_train.timed(floor)[0])
            for name, epoch in epochs.items():
                seconds[name].append(bench_train.timed(epoch)[0])

    print()
    print(f"configuration: {' '.join(bench_train.BENCH_FLAGS)} ({n_train} images)")
    print(f"device: {utils.device_description()}")
    floor_s = statistics.median(seconds.pop("floor"))
    print(f"the model's matmuls alone, one compiled loop (median of {rounds}): {floor_s:.2f} s")
    for name, times in seconds.items():
        epoch_s = statistics.median(times)
        print(f"{name}: {epoch_s:.2f} s per epoch, {epoch_s / floor_s:.2f}× the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
