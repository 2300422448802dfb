"""How close an epoch of training comes to this machine's matrix-multiply limit.

    python benchmarks/bench_train.py            # the figure in the README
    python benchmarks/bench_train.py --quick    # a smoke test in seconds (CI)

Trains the real model, set up by `train.open_run` as a run is, through the
real epoch loop (`train.train_one_epoch`) on the 55,000 training images with
the flags below: one warm-up epoch (tracing and compilation), then timed
epochs. In the same
process it measures float32 matmul throughput and divides:

    ratio = epoch seconds / (model FLOPs per epoch / matmul FLOP/s)

1.0 would be an epoch that runs at the speed of one big matmul. More
figures: an epoch of the model's matmuls alone (the floor TensorFlow's kernels
set at these shapes) and the epoch's ratio to it; and, from the README's run,
`python main.py --add_noise True` cut to --memory_epochs in a child process,
its peak resident memory, its seconds per epoch (from its metrics.csv) and
its start-up (process start to its first training step).
Start-up and the end-of-training work (the canvases and the test evaluation,
through the run's own functions, into a temporary folder) are timed too.
Timings vary with the machine's load; the ratio partly cancels that, since
both halves are measured under it.

Last, the cost of semi-supervised M2 (`--n_labeled`, default 100 here): its
epochs and the plain model's, with the same flags, timed in turn in this
process, and their ratio (an M2 epoch is a pass over the unlabelled images).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROCESS_START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The configuration the README's speed figures are stated for.
BENCH_FLAGS = [
    "--n_hidden", "500", "--n_z", "20", "--batch_size", "128",
    "--keep_prob", "0.6", "--add_noise", "True",
]  # fmt: skip


def make_matmul_timer(size: int) -> Callable[[int], list[float]]:
    """A function that times `repeats` float32 (size × size) @ (size × size) tf.matmul."""
    import tensorflow as tf

    a = tf.random.stateless_normal((size, size), seed=(1, 2))
    b = tf.random.stateless_normal((size, size), seed=(3, 4))
    # Reduce to a scalar in the same function: the timing then includes the
    # product and not a copy of it to NumPy.
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    matmul(a, b).numpy()  # Trace and warm the thread pool.

    def time_matmuls(repeats: int) -> list[float]:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).numpy()
            seconds.append(time.perf_counter() - start)
        return seconds

    return time_matmuls


def model_flops_per_image(model) -> list[tuple[str, int, int, int]]:
    """(layer, fan-in, fan-out, FLOPs per image) for one training step's matmuls.

    Read off the model's dense layers, in the order of a forward pass. Per
    layer: forward 2·in·out, weight gradient 2·in·out, input gradient
    2·in·out, except the first encoder layer, whose input (the image and its
    label) needs no gradient. Elementwise work (noise, dropout, activations,
    the loss, Adam) is not counted: it is what the ratio's excess measures.
    """
    rows = []
    for index, (name, layer) in enumerate(model.dense_layers.items()):
        n_in, n_out = (int(size) for size in layer.kernel.shape)
        rows.append((name, n_in, n_out, (4 if index == 0 else 6) * n_in * n_out))
    return rows


def make_matmul_only_epoch(model, batch: int, n_steps: int) -> Callable[[], object]:
    """An epoch of the model's matmuls and nothing else, as one compiled loop.

    Per step, at the benchmark's batch size, exactly the products counted by
    `model_flops_per_image`, chained as in training: the forward products
    layer after layer, then the weight and input gradients back from the
    last layer (no input gradient for enc1). No activation, dropout, noise,
    loss or optimizer: the floor that TensorFlow's matmul kernels set for
    the training loop at these shapes.
    """
    import tensorflow as tf

    shapes = [(n_in, n_out) for _, n_in, n_out, _ in model_flops_per_image(model)]
    # He-scaled weights keep the chained values in a normal range.
    weights = [
        tf.random.stateless_normal(shape, seed=(i, 0)) * (2.0 / shape[0]) ** 0.5
        for i, shape in enumerate(shapes)
    ]
    # Two input batches used in turn: no product is the same at every step,
    # so none can be hoisted out of the loop.
    images = tf.random.stateless_uniform((2, batch, shapes[0][0]), seed=(0, 1))

    def fit(h: tf.Tensor, width: int) -> tf.Tensor:
        """Cut or zero-pad columns where the real model splits or concatenates."""
        have = h.shape[1]
        return h[:, :width] if have >= width else tf.pad(h, [[0, 0], [0, width - have]])

    @tf.function
    def epoch() -> tf.Tensor:
        total = tf.constant(0.0)
        for step in tf.range(n_steps):
            inputs, h = [], images[step % 2]
            for w in weights:
                h = fit(h, w.shape[0])
                inputs.append(h)
                h = h @ w
            grad = h / float(batch)
            for i in reversed(range(len(weights))):
                weight_grad = tf.matmul(inputs[i], grad, transpose_a=True)
                total += weight_grad[0, 0]  # Keeps the product alive, at no cost.
                if i > 0:
                    grad = fit(tf.matmul(grad, weights[i], transpose_b=True), shapes[i - 1][1])
        return total

    epoch()  # Trace.
    return lambda: epoch().numpy()


# Runs main.py in this child interpreter and writes a JSON report: its peak
# resident memory and when its first training step started and its first chunk
# of steps returned, in seconds from the process's start (the clock tick of
# /proc/self/stat, so the interpreter's own start and `import tensorflow`
# count). VmHWM counts this process only; ru_maxrss would also count the
# benchmark's own memory, which a forked child holds until it executes Python.
# The first step is seen by wrapping `steps.make_train_chunk` (which train.py
# calls as `steps.make_train_chunk`) so that the chunk function it returns
# notes the time of its first call; main.py and train.py are run unchanged.
CHILD_RUN = """
import json, os, runpy, sys, time

def now():  # Seconds since boot, the clock of /proc/self/stat's start time.
    return time.clock_gettime(time.CLOCK_BOOTTIME)

try:
    with open("/proc/self/stat") as stat:  # Field 22, after the parenthesised name.
        started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
except (OSError, IndexError, ValueError):
    started = now()
report_path, sys.argv = sys.argv[1], sys.argv[2:]
report = {}

import utils  # First, as in main.py: it quiets TensorFlow's start-up chatter.
import steps

make_train_chunk = steps.make_train_chunk

def make_timed_train_chunk(*args, **kwargs):
    train_chunk = make_train_chunk(*args, **kwargs)

    def timed_train_chunk(batches, seeds, start, stop, sums):
        first = "first_step_s" not in report
        if first:
            report["first_step_s"] = now() - started
        result = train_chunk(batches, seeds, start, stop, sums)
        if first:
            report["first_chunk_s"] = now() - started
            report["first_chunk_steps"] = int(stop) - int(start)
        return result

    return timed_train_chunk

steps.make_train_chunk = make_timed_train_chunk
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as status:  # Linux only, as VmHWM.
        peak = [line.split()[1] for line in status if line.startswith("VmHWM:")]
    if peak:
        report["peak_kb"] = int(peak[0])
        with open(report_path, "w") as out:
            json.dump(report, out)
"""


@dataclass
class DefaultRun:
    """What the child run of the README's command measured."""

    peak_mb: float  # Peak resident memory (VmHWM).
    seconds: float  # Wall time of the whole child process.
    epoch_seconds: list[float]  # metrics.csv's `seconds`, one per epoch.
    first_step_s: float | None  # Process start to its first training step.
    first_chunk_s: float | None  # Process start to the return of its first chunk.
    first_chunk_steps: int | None


def default_run(epochs: int, extra_flags: Sequence[str] = ()) -> DefaultRun:
    """Peak memory, epoch seconds and start-up of the README's run, cut to `epochs`.

    `python main.py --add_noise True` in a child process (see CHILD_RUN), with
    its run folder in a temporary directory; the peak covers start-up,
    training, the canvases and the end-of-training evaluation.
    """
    import json
    import subprocess

    import utils

    project = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-c", CHILD_RUN, str(report), str(project / "main.py"),
            "--add_noise", "True", "--epochs", str(epochs), "--results_dir", folder,
            *extra_flags,
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=project, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not report.exists():
            # Killed (out of memory, say) before it could report, or failed: say how.
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise SystemExit(
                f"the default run for the memory figure exited with code {proc.returncode}"
                f"{' before reporting its peak' if not report.exists() else ''}; its stderr "
                f"ends with:\n{tail}\n(--memory_epochs 0 skips this figure)"
            )
        figures = json.loads(report.read_text())
        rows = [row for path in Path(folder).glob("*/metrics.csv") for row in utils.read_csv(path)]
    return DefaultRun(
        peak_mb=figures["peak_kb"] / 1024,
        seconds=seconds,
        epoch_seconds=[float(row["seconds"]) for row in rows],
        first_step_s=figures.get("first_step_s"),
        first_chunk_s=figures.get("first_chunk_s"),
        first_chunk_steps=figures.get("first_chunk_steps"),
    )


def steady_epoch_seconds(epoch_seconds: Sequence[float]) -> tuple[float, str]:
    """Seconds per epoch without the first epoch's tracing, and which epochs they are.

    The median of the epochs after the first when there are two or more;
    else the only epoch's, tracing included.
    """
    n = len(epoch_seconds)
    if n == 0:
        raise ValueError("the default run recorded no epoch in its metrics.csv")
    if n == 1:
        return epoch_seconds[0], "epoch 1 of 1, includes tracing"
    if n == 2:
        return epoch_seconds[1], "epoch 2 of 2"
    return statistics.median(epoch_seconds[1:]), f"median of epochs 2-{n} of {n}"


def print_default_run(epochs: int, extra_flags: Sequence[str]) -> None:
    """Run the README's command cut to `epochs` in a child process; print its figures."""
    run = default_run(epochs, extra_flags)
    shown = " ".join(["--add_noise True", f"--epochs {epochs}", *extra_flags])
    print(
        f"peak resident memory of a default run (python main.py {shown}, "
        f"{run.seconds:.0f} s, in a child process): {run.peak_mb:.0f} MB"
    )
    epoch_s, which = steady_epoch_seconds(run.epoch_seconds)
    shown = " ".join(["--add_noise True", *extra_flags])
    print(f"default run (python main.py {shown}): {epoch_s:.2f} s per epoch ({which})")
    if run.first_step_s is None:
        raise SystemExit("the default run finished without calling its training chunk")
    # The figure counts tracing: the first step ends inside the first chunk, so
    # its end is the bound (it includes the chunk's other steps, about 10 ms each).
    print(
        "start-up of the default run (process start to the end of its first chunk of "
        f"{run.first_chunk_steps} steps, tracing included): {run.first_chunk_s:.1f} s"
    )
    print(f"  of which before the first chunk was called: {run.first_step_s:.1f} s")


def timed(work: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_bench_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred steps: a smoke test, not a figure"
    )
    parser.add_argument("--timed_epochs", type=int, default=3, help="epochs timed after warm-up")
    parser.add_argument(
        "--xla", choices=("auto", "on", "off"), default="auto", help="main.py's --xla"
    )
    parser.add_argument(
        "--m2_labeled",
        type=int,
        default=100,
        help="time M2 with this --n_labeled against the plain model (0 skips it)",
    )
    parser.add_argument(
        "--m1",
        default=None,
        help="a finished --conditional False run: time M2 on its features (--features) "
        "against M2 on pixels, both with --m2_labeled labels and M2_FLAGS",
    )
    parser.add_argument(
        "--memory_epochs",
        type=int,
        default=2,
        help="epochs of the default run whose peak memory, epoch seconds and start-up are "
        "measured (0 skips them)",
    )
    return parser.parse_args(argv)


@dataclass
class EpochTimes:
    """Seconds of the warm-up epoch, the timed epochs, and the matmuls timed between them."""

    warmup: float = 0.0
    epochs: list[float] = field(default_factory=list)
    matmuls: list[float] = field(default_factory=list)  # One big matmul each.
    matmul_only_epochs: list[float] = field(default_factory=list)


def time_epochs(current, n_epochs: int, matmul_size: int, repeats: int = 3) -> EpochTimes:
    """A warm-up epoch of the run `current` (a train.Run), then `n_epochs` timed ones.

    The matmuls are timed between the epochs, so that both halves of the ratio
    see the same background load.
    """
    import train
    import utils

    config, model = current.config, current.state.model
    n_train = int(current.tensors.train_images.shape[0])

    def epoch() -> dict:
        return train.train_one_epoch(
            current.train_chunk, n_train, current.state.generator, config.batch_size
        )

    time_matmuls = make_matmul_timer(matmul_size)
    matmul_only_epoch = make_matmul_only_epoch(
        model, config.batch_size, utils.ceil_div(n_train, config.batch_size)
    )
    times = EpochTimes()
    print(f"warm-up epoch ({n_train} images) ...", flush=True)
    times.warmup, _ = timed(epoch)
    for i in range(n_epochs):
        times.matmuls += time_matmuls(repeats)
        times.matmul_only_epochs.append(timed(matmul_only_epoch)[0])
        seconds, terms = timed(epoch)
        times.epochs.append(seconds)
        print(f"timed epoch {i + 1}: {seconds:.2f} s, train -elbo {terms['loss']:.3f}", flush=True)
    times.matmuls += time_matmuls(repeats)
    return times


def m2_flops_per_image(model, labelled_per_unlabelled: float) -> tuple[int, int]:
    """(M2's, the plain model's) matmul FLOPs per image of an epoch, forward + backward.

    M2's epoch passes over the unlabelled images; per image: x·W_x once (forward
    and weight gradient), the rest of the encoder and the decoder for each of the
    ten labels, the classifier q(y|x), and for the labelled rows that come with
    it (`labelled_per_unlabelled` = B_l / B_u) the classifier and the plain ELBO.
    `model` is an M2 model (`CVAE(..., classifier=True)`).
    """
    import data_utils

    def size(name: str) -> int:
        n_in, n_out = (int(s) for s in model.dense_layers[name].kernel.shape)
        return n_in * n_out

    per_label = sum(6 * size(name) for name in ("enc2", "enc_out", "dec1", "dec2", "dec_out"))
    plain = 4 * size("enc1") + per_label
    shared = 4 * data_utils.N_PIXELS * int(model.enc_hidden1.kernel.shape[1])
    classifier = 4 * size("cls1") + 6 * size("cls2") + 6 * size("cls_out")
    ratio = labelled_per_unlabelled
    m2 = shared + data_utils.N_CLASSES * per_label + (1 + ratio) * classifier + ratio * plain
    return round(m2), plain


def time_m2_against_plain(
    current, flags: Sequence[str], n_labeled: int, rounds: int, matmul_flops: float
) -> None:
    """Print the seconds per epoch of M2 (`--n_labeled`) and of the plain run `current`
    (a train.Run with the same `flags`), timed in turn after a warm-up, and their ratio.

    Each epoch is also set against its matmul FLOPs at `matmul_flops` (FLOP/s of
    the large matmul): how far each is from the bound its FLOPs set.
    """
    import train
    from config import parse_flags

    def epoch_of(run) -> Callable[[], object]:
        split, tensors = run.labelled, run.tensors
        n = int((split.unlabelled if split else tensors.train_images).shape[0])
        return lambda: train.train_one_epoch(
            run.train_chunk, n, run.state.generator, run.config.batch_size, split=split
        )

    with tempfile.TemporaryDirectory() as work_dir:
        config = parse_flags([*flags, "--n_labeled", str(n_labeled), "--results_dir", work_dir])
        m2 = train.open_run(config)
        epochs = {"plain": epoch_of(current), "M2": epoch_of(m2)}
        print(f"M2 warm-up epoch (--n_labeled {n_labeled}) ...", flush=True)
        timed(epochs["M2"])
        seconds: dict[str, list[float]] = {"plain": [], "M2": []}
        for _ in range(rounds):
            for name, epoch in epochs.items():
                seconds[name].append(timed(epoch)[0])
    plain_s, m2_s = (statistics.median(seconds[name]) for name in ("plain", "M2"))
    n_plain = int(current.tensors.train_images.shape[0])
    n_unlabelled = int(m2.labelled.unlabelled.shape[0])
    labelled_share = m2.labelled.batch / config.batch_size
    m2_flops, plain_flops = m2_flops_per_image(m2.state.model, labelled_share)
    print(
        f"M2 matmul FLOPs per image (ten labels, x·W_x shared, q(y|x), the labelled rows): "
        f"{m2_flops:,} against the plain model's {plain_flops:,}; per epoch "
        f"{m2_flops * n_unlabelled / (plain_flops * n_plain):.2f}× the plain epoch's"
    )
    print(
        f"M2 (--n_labeled {n_labeled}, {m2.labelled.batch} labelled + {config.batch_size} "
        f"unlabelled images per step) against the plain model, same flags, epochs timed in "
        f"turn (median of {rounds}): M2 {m2_s:.2f} s per epoch ({n_unlabelled} unlabelled "
        f"images), plain {plain_s:.2f} s ({n_plain} images): ratio {m2_s / plain_s:.2f}"
    )
    m2_bound = m2_flops * n_unlabelled / matmul_flops
    plain_bound = plain_flops * n_plain / matmul_flops
    print(
        f"epoch seconds / matmul-bound epoch (its FLOPs at {matmul_flops / 1e9:.1f} GFLOP/s): "
        f"M2 {m2_s / m2_bound:.2f} ({m2_bound:.2f} s), plain {plain_s / plain_bound:.2f} "
        f"({plain_bound:.2f} s)"
    )


def time_end_of_training(current) -> dict[str, float]:
    """Seconds of a run's end-of-training work, through its own functions, into its folder."""
    import evaluate
    import plot
    import train

    config, model, tensors = current.config, current.state.model, current.tensors
    n_eval = config.n_eval or len(current.splits.test_images)
    work = {
        "validation evaluation (also once per epoch)": lambda: evaluate.heldout_elbo(
            current.eval_step, tensors.valid_images, tensors.valid_labels, evaluate.VALID_SEED
        ),
        "canvases (plot.write_canvases)": lambda: plot.write_canvases(
            train.canvas_model(model), current.canvas_inputs, current.run_dir, 1, config
        ),
        f"test evaluation (evaluate.compute_test_metrics, {n_eval} images, "
        f"K={config.iw_samples})": (
            lambda: evaluate.compute_test_metrics(model, current.splits, config)
        ),
    }
    return {name: timed(task)[0] for name, task in work.items()}


def print_flops(model, n_train: int, times: EpochTimes, matmul_size: int) -> tuple[float, float]:
    """Print the FLOP count and the matmul figures; returns the matmul-bound epoch's seconds
    and the large matmul's FLOP/s."""
    matmul_flops = 2.0 * matmul_size**3 / statistics.median(times.matmuls)
    layers = model_flops_per_image(model)
    flops_per_image = sum(flops for *_, flops in layers)
    epoch_flops = flops_per_image * n_train
    ideal_s = epoch_flops / matmul_flops
    print("model FLOPs per image (forward + backward matmuls):")
    for name, n_in, n_out, flops in layers:
        factor = flops // (n_in * n_out)
        print(f"  {name:8s} {factor}·{n_in}·{n_out} = {flops:,}")
    print(f"  total {flops_per_image:,} × {n_train} images = {epoch_flops / 1e9:.1f} GFLOP/epoch")
    print(
        f"matmul {matmul_size}³ float32 (median of {len(times.matmuls)}, around the "
        f"timed epochs): {matmul_flops / 1e9:.1f} GFLOP/s"
    )
    print(f"matmul-bound epoch: {ideal_s:.2f} s")
    matmul_only_s = statistics.median(times.matmul_only_epochs)
    print(
        f"the model's matmuls alone, same shapes, one compiled loop (median of "
        f"{len(times.matmul_only_epochs)}): {matmul_only_s:.2f} s per epoch, ratio "
        f"{matmul_only_s / ideal_s:.2f}"
    )
    return ideal_s, matmul_flops


# M2's flags for the M1+M2 comparison: those of RESULTS.md's M1+M2 recipe that apply to
# both inputs (the pixel run binarises, as pixel M2's recipe; features are M1's).
M2_FLAGS = ["--n_z", "50", "--keep_prob", "1.0", "--batch_size", "256", "--seed", "0"]


def time_features_against_pixels(
    m1_run: str, n_labeled: int, quick_flags: list[str], rounds: int
) -> None:
    """Print the seconds per epoch of M2 on M1's features (`--features m1_run`) and of M2
    on pixels with the same flags, timed in turn after a warm-up, and their ratio."""
    import train
    from config import parse_flags

    variants = {
        "M2 on pixels": ["--binarize", "dynamic"],
        "M1+M2 (M2 on M1's features)": ["--features", m1_run],
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work_dir:
        epochs = {}
        for i, (name, extra) in enumerate(variants.items()):
            flags = [*M2_FLAGS, *quick_flags, "--n_labeled", str(n_labeled), *extra]
            run = train.open_run(parse_flags([*flags, "--results_dir", f"{work_dir}/{i}"]))
            n = int(run.labelled.unlabelled.shape[0])
            epochs[name] = lambda run=run, n=n: train.train_one_epoch(
                run.train_chunk, n, run.state.generator, run.config.batch_size,
                split=run.labelled,
            )  # fmt: skip
            print(f"{name}: warm-up epoch ...", flush=True)
            timed(epochs[name])
        for _ in range(rounds):
            for name, epoch in epochs.items():
                seconds[name].append(timed(epoch)[0])
    pixels_s, features_s = (statistics.median(seconds[name]) for name in variants)
    print(
        f"M1+M2 against M2 on pixels ({' '.join(M2_FLAGS)} --n_labeled {n_labeled}; epochs "
        f"timed in turn, median of {rounds}): features {features_s:.2f} s per epoch, pixels "
        f"{pixels_s:.2f} s: ratio {features_s / pixels_s:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_bench_args(argv)
    import_start = time.perf_counter()
    import utils  # First: it quiets TensorFlow's start-up chatter.

    # isort: split
    import train  # Imports TensorFlow.
    from config import parse_flags

    seconds_import = time.perf_counter() - import_start
    # --quick: fewer images, and the test evaluation on 500 of them.
    quick_flags = ["--n_train", "6400", "--n_eval", "500"] if args.quick else []
    flags = [*BENCH_FLAGS, *quick_flags, "--seed", "0", "--xla", args.xla]
    with tempfile.TemporaryDirectory() as work_dir:  # The run folder: the benchmark keeps none.
        config = parse_flags([*flags, "--results_dir", work_dir])
        # The run's own set-up: data, state, folder, compiled steps, canvas inputs.
        seconds_open, current = timed(lambda: train.open_run(config))
        matmul_size = 1024 if args.quick else 2048
        times = time_epochs(current, 2 if args.quick else args.timed_epochs, matmul_size)
        end_seconds = time_end_of_training(current)
    model, n_train = current.state.model, int(current.tensors.train_images.shape[0])

    print()
    print(f"configuration: {' '.join(BENCH_FLAGS)} ({n_train} images)")
    print(f"device: {utils.device_description()}")
    xla = "on" if train.use_xla(config, replicas=1) else "off"  # No --strategy here.
    print(f"precision: {model.enc_out.dtype_policy.name}, XLA {xla}")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")
    print("start-up:")
    print(f"  import TensorFlow and the project: {seconds_import:.2f} s")
    print(f"  open the run: data, model, optimizer, steps (train.open_run): {seconds_open:.2f} s")
    print(f"  warm-up epoch (includes tracing/compilation): {times.warmup:.2f} s")
    print("end of training:")
    for name, seconds in end_seconds.items():
        print(f"  {name}: {seconds:.2f} s")
    ideal_s, matmul_flops = print_flops(model, n_train, times, matmul_size)
    epoch_s = statistics.median(times.epochs)
    print(f"epoch seconds (median of {len(times.epochs)}): {epoch_s:.2f} s")
    print(f"images per second: {n_train / epoch_s:,.0f}")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")
    print(f"total wall time: {time.perf_counter() - PROCESS_START:.1f} s")
    if args.memory_epochs:
        print_default_run(args.memory_epochs, quick_flags)
    to_floor = epoch_s / statistics.median(times.matmul_only_epochs)
    print(f"ratio to the floor (epoch seconds / the model's matmuls alone): {to_floor:.2f}")
    print(f"ratio (epoch seconds / matmul-bound epoch): {epoch_s / ideal_s:.2f}")
    if args.m2_labeled:
        rounds = 1 if args.quick else 3
        time_m2_against_plain(current, flags, args.m2_labeled, rounds, matmul_flops)
    if args.m1 and args.m2_labeled:
        time_features_against_pixels(args.m1, args.m2_labeled, quick_flags, 1 if args.quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
