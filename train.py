"""Training and evaluation of one run: `run(config)` and `evaluate_only(config)`.

A run's life: its state (model, optimizer, random generator, checkpoints) is
built, its folder opened (or resumed), its epochs trained in compiled chunks
of steps with a progress bar and Ctrl-C between chunks, each epoch recorded
(metrics.csv, curves, canvases and their animations, a checkpoint, then its
TensorBoard events in tb/), and the final model scored on the test split into
metrics.json. `config` is a `main.Config`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import tensorflow as tf

import checkpoints
import cvae
import data_utils
import draws
import evaluate
import export
import features
import plot
import run_folder
import steps
import stopping
import summaries
import utils

if TYPE_CHECKING:
    from config import Config

# Compiled training steps between two looks from Python (progress bar, Ctrl-C,
# NaN check): about a second of training for the default run on a CPU.
STEPS_PER_CHUNK = 50

CANVAS_SEED = 3_000_003  # With --seed: the canvases' test images, noise and prior samples.


# --- The run's state ---


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The tf.distribute strategy that `--strategy` names (the default one for 'none')."""
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if config.strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise utils.UserError(
                "--strategy multi_worker needs the TF_CONFIG environment variable that "
                "lists the machines and this one's index (see the README's GPU section)."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def objective(config: Config) -> steps.Objective:
    """What the training steps optimise: noise, binarisation, K, KL warm-up and weight,
    and with --n_labeled M2's labelled rows per step, their share and α."""
    n_train = config.n_train or data_utils.N_TRAIN
    return steps.Objective(
        add_noise=config.add_noise,
        binarized=config.binarized,
        train_samples=config.train_samples,
        kl_warmup_steps=config.kl_warmup * config.steps_per_epoch,
        kl_weight=config.kl_weight,
        labelled_batch=config.labelled_batch,
        labelled_share=(config.n_labeled or 0) / n_train,
        alpha=config.alpha,
        features=config.features is not None,
    )


def use_xla(config: Config, replicas: int) -> bool:
    """Whether the training chunks are compiled with XLA: always with `--xla on`, with
    `auto` when the run has one replica, never with `off`. XLA cannot compile the loop of
    a strategy's several replicas: `on` refuses such a run (a UserError) rather than
    train it uncompiled. On the CPU too: faster epochs for a few seconds of compiling
    (benchmarks/README.md)."""
    if config.xla == "on" and replicas > 1:
        raise utils.UserError(
            f"--xla on: XLA cannot compile the training loop of {replicas} replicas "
            f"(--strategy {config.strategy}); pass --xla auto (compiles one replica's "
            "loop only) or --xla off"
        )
    return config.xla != "off" and replicas == 1


def load_splits(config: Config) -> data_utils.Splits:
    """The train/validation/test splits of the run's dataset; a data problem is a UserError."""
    try:
        return data_utils.load_dataset(config.dataset, config.data_dir)
    except data_utils.DataError as err:
        raise utils.UserError(str(err)) from err


class TrainingTensors(NamedTuple):
    train_images: tf.Tensor  # (n_train, D) uint8 on a CPU, float32 in [0, 1] on a GPU
    train_labels: tf.Tensor  # (n_train,)
    valid_images: tf.Tensor  # (N_VALID, D) float32 in [0, 1]
    valid_labels: tf.Tensor  # (N_VALID,)


def training_tensors(splits: data_utils.Splits, config: Config) -> TrainingTensors:
    """The training split (its first `--n_train` images) and the validation split as tensors.

    The training images stay uint8 on a CPU (4× smaller; each batch is scaled in
    the graph, to the same floats); with a GPU they are scaled once, since a
    uint8 gather without a GPU kernel would run on the host at every step.
    """
    n_train = config.n_train or len(splits.train_images)
    train_x = splits.train_images[:n_train]
    if tf.config.list_physical_devices("GPU"):
        train_x = data_utils.as_floats(train_x)
    return TrainingTensors(
        tf.constant(train_x),
        tf.constant(splits.train_labels[:n_train]),
        tf.constant(data_utils.as_floats(splits.valid_images)),
        tf.constant(splits.valid_labels),
    )


def labelled_split(train_labels: np.ndarray, config: Config) -> steps.LabelledSplit | None:
    """The run's labelled and unlabelled training images (None without --n_labeled), the
    same at every resume (drawn from --seed alone); prints the count per class."""
    if not config.n_labeled:
        return None
    try:
        labelled = data_utils.labelled_subset(train_labels, config.n_labeled, config.seed)
    except ValueError as err:
        raise utils.UserError(str(err)) from err
    unlabelled = np.setdiff1d(np.arange(len(train_labels), dtype=np.int32), labelled)
    counts = np.bincount(train_labels[labelled], minlength=data_utils.N_CLASSES)
    print(
        f"M2: {len(labelled)} labelled training images (per class {counts.tolist()}), "
        f"{len(unlabelled)} unlabelled; {config.labelled_batch} labelled per step"
    )
    return steps.LabelledSplit(
        tf.constant(labelled), tf.constant(unlabelled), config.labelled_batch
    )


# --- One epoch ---


def train_one_epoch(
    train_chunk: steps.ChunkFn,
    n_images: int,
    generator: tf.random.Generator,
    batch_size: int,
    epoch: int = 1,
    progress: tf.Module | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    steps_per_chunk: int | None = None,
    split: steps.LabelledSplit | None = None,
) -> dict[str, float] | None:
    """One shuffled pass over the training images (a progress bar on a terminal); returns
    the means.

    At step 0 the epoch draws two seeds from `generator` (checkpointed, so a
    resume repeats them): one shuffles, one gives a seed per step, so the
    numbers do not depend on `steps_per_chunk` (default STEPS_PER_CHUNK), which
    only sets how often Python looks in. After each chunk: the progress bar,
    NonFiniteLoss if a step was not finite, and `stop_requested()`; a yes
    before the last chunk returns None, `progress` holding where it stopped
    (pass it back to continue; None starts afresh). With `split` (M2),
    `n_images` counts the unlabelled images (`steps.epoch_batches`).
    """
    progress = progress or checkpoints.make_epoch_progress()
    steps_per_chunk = steps_per_chunk or STEPS_PER_CHUNK
    n_steps = utils.ceil_div(n_images, batch_size)
    if int(progress.step) == 0:
        shuffle_seed, step_seed = tf.unstack(generator.make_seeds(2), axis=1)
        progress.shuffle_seed.assign(shuffle_seed)
        progress.step_seed.assign(step_seed)
        progress.sums.assign(tf.zeros_like(progress.sums))
    batches = steps.epoch_batches(n_images, batch_size, progress.shuffle_seed.read_value(), split)
    seeds = tf.random.experimental.stateless_split(progress.step_seed, n_steps)  # (n_steps, 2)
    # On a terminal a bar; in a file nothing within the epoch: its line says it all.
    progress_bar = utils.Progress(n_steps, stateful_metrics=steps.TERMS)
    for start in range(int(progress.step), n_steps, steps_per_chunk):
        stop = min(start + steps_per_chunk, n_steps)
        # The running sums go through the chunk, so that they are added in
        # the same order however the epoch is cut into chunks or resumed.
        sums, done = train_chunk(
            batches, seeds, tf.constant(start), tf.constant(stop), progress.sums.read_value()
        )
        bad = stopping.non_finite_terms(dict(zip(steps.TERMS, sums.numpy().tolist(), strict=True)))
        if bad is not None:
            raise utils.NonFiniteLoss(
                f"non-finite training terms at epoch {epoch}, step {start + int(done)} of "
                f"{n_steps}: {bad}"
            )
        progress.sums.assign(sums)
        progress.step.assign(stop)
        seen = min(stop * batch_size, n_images)
        progress_bar.update(stop, list(zip(steps.TERMS, (sums / seen).numpy(), strict=True)))
        if stop < n_steps and stop_requested():
            return None
    means = (progress.sums / n_images).numpy()
    return {name: float(value) for name, value in zip(steps.TERMS, means, strict=True)}


# --- A training run ---


@dataclass
class Run:
    """A training run in progress: what `open_run` set up, and its history so far."""

    config: Config
    run_dir: Path
    state: checkpoints.State
    managers: checkpoints.CheckpointManagers
    splits: data_utils.Splits
    tensors: TrainingTensors
    train_chunk: steps.ChunkFn
    eval_step: Callable[..., dict]
    canvas_inputs: plot.CanvasInputs
    events: summaries.EventLog  # Its TensorBoard events, in tb/.
    labelled: steps.LabelledSplit | None = None  # M2's labelled and unlabelled images.
    history: list[dict] = field(default_factory=list)  # The rows of metrics.csv.
    # False for a multi_worker worker other than worker 0: run_dir is then its
    # temporary folder (see run_folder.open_run_folder), and a resume starts from worker 0's.
    chief: bool = True
    lock: run_folder.RunLock | None = None  # This process's hold on run_dir.
    source: features.FeatureSource | None = None  # M1, with --features.
    divergence_bound: float = math.inf  # Train or validation bounds past it stop the run.
    strategy: tf.distribute.Strategy | None = None

    def close(self) -> None:
        """Flush the events and let another process write the folder."""
        self.events.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def resume_hint(self) -> str:
        folder = self.run_dir if self.chief else "<worker 0's run folder>"
        return f"python main.py --resume {folder}"


def run(config: Config, strategy: tf.distribute.Strategy | None = None) -> int:
    """Train (or resume) the run described by `config`; returns the exit code.

    `strategy` replaces the one `--strategy` names (a process can hold only one
    MirroredStrategy: tests that compare several runs share it).
    """
    current = open_run(config, strategy)
    try:
        with run_folder.outputs_written_to(
            current.run_dir, lambda: run_folder.resume_after_disk_full(current.run_dir)
        ):
            with stopping.stop_on_signals() as request:
                stop_requested = (
                    stopping.AgreedStop(request, current.strategy)
                    if current.config.strategy == "multi_worker"
                    else request
                )
                for number in range(int(current.state.epoch) + 1, config.epochs + 1):
                    exit_code = run_epoch(current, number, stop_requested)
                    if exit_code is not None:
                        return exit_code
            return final_evaluation(current)
    finally:
        current.close()


def print_device(details: str = "") -> None:
    """The run's first line: what it trains on. On a machine without a GPU, say that
    TensorFlow's messages about CUDA on stderr (its search for a GPU) are harmless."""
    print(f"Device: {utils.device_description()}{details}")
    if not tf.config.list_physical_devices("GPU"):
        print(utils.CPU_ONLY_NOTE)


def precision_note(config: Config) -> str | None:
    """One line for --mixed_precision on a machine without a GPU, where float16 is slower
    than float32; None otherwise."""
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        return (
            "Note: --mixed_precision without a GPU: float16 on a CPU is slower than float32 "
            "(it is for GPUs); the run goes on."
        )
    return None


def open_run(config: Config, strategy: tf.distribute.Strategy | None = None) -> Run:
    """Everything a run needs before its first step: checks, lock, data, state, folder,
    resume. The run holds its folder's lock until `Run.close()`."""
    run_folder.check_output_folder(config)
    checkpoints.check_model_fits_in_memory(config)
    utils.set_seed(config.seed)
    strategy = strategy or make_strategy(config)
    chief = strategy.extended.should_checkpoint
    with contextlib.ExitStack() as on_error:
        lock = None
        if config.resume and chief:  # Locked before anything is read from it.
            lock = run_folder.lock_run_folder(Path(config.resume), "--resume")
            on_error.callback(lock.release)
        print_device(
            f"; {strategy.num_replicas_in_sync} replica(s), "
            f"{'mixed_float16' if config.mixed_precision else 'float32'}, "
            f"XLA {'on' if use_xla(config, strategy.num_replicas_in_sync) else 'off'}"
        )
        note = precision_note(config)
        if note is not None:
            print(note)
        pixels = load_splits(config)
        source = open_features(config, pixels)
        splits = source.splits(pixels) if source else pixels  # What the model reads.
        tensors = training_tensors(splits, config)
        split = labelled_split(splits.train_labels[: int(tensors.train_labels.shape[0])], config)
        canvas_inputs = make_canvas_inputs(pixels.test_images, pixels.test_labels, config)
        if not config.conditional:
            print(
                "A plain VAE (--conditional False): the canvases by label (manifold_labelK, "
                "analogy) are not drawn; manifold and generation show z alone."
            )
        n_features = len(source.active) if source else None
        state = checkpoints.build_state(config, strategy, n_features)
        extra = {"features_source": source.record()} if source else None
        run_dir = run_folder.open_run_folder(config, strategy, extra)
        if lock is None:  # A new folder, or a worker's private copy.
            lock = run_folder.lock_run_folder(run_dir, "--resume" if config.resume else "run")
            on_error.callback(lock.release)
        managers = checkpoints.checkpoint_managers(state, run_dir)
        history: list[dict] = []
        events = summaries.EventLog(run_dir)  # Reads the events a resumed run wrote.
        on_error.callback(events.close)
        if config.resume:
            with run_folder.outputs_written_to(
                run_dir, lambda: run_folder.resume_after_disk_full(run_dir)
            ):  # config.json
                history = _resume(run_dir, config, state, managers)
                _complete_records(run_dir, events, history, int(state.epoch))
        events.write_hparams(config)  # Once per run: a resume has them already.
        print(f"Run folder: {run_dir}")
        train_chunk = steps.make_train_chunk(
            state.model, state.optimizer, tensors.train_images, tensors.train_labels,
            objective(config), strategy,
            jit_compile=use_xla(config, strategy.num_replicas_in_sync),
        )  # fmt: skip
        eval_step = evaluate.make_eval_step(state.model, config.add_noise, config.binarized)
        current = Run(
            config, run_dir, state, managers, splits, tensors, train_chunk, eval_step,
            canvas_inputs, events, split, history, chief=chief, lock=lock, source=source,
            divergence_bound=stopping.divergence_bound(
                features.know_nothing_nats(splits.train_images)
            )
            if source
            else stopping.divergence_bound(), strategy=strategy,
        )  # fmt: skip
        on_error.pop_all()  # Opened: the run now owns its lock and events.
        return current


def open_features(config: Config, pixels: data_utils.Splits) -> features.FeatureSource | None:
    """M1's features for a --features run (None otherwise): a resumed or evaluated run
    reopens what its config.json recorded, a new one what --features names."""
    if config.features is None:
        return None
    folder = config.resume or config.eval_only
    recorded = None
    if folder:
        saved = json.loads((Path(folder) / utils.CONFIG_FILE).read_text())
        recorded = saved.get("features_source")
    n_train = config.n_train or len(pixels.train_images)
    return features.open_source(config, pixels.train_images[:n_train], recorded)


def _resume(
    run_dir: Path,
    config: Config,
    state: checkpoints.State,
    managers: checkpoints.CheckpointManagers,
) -> list:
    """Restore the run's newest checkpoint; returns the metrics rows up to it."""
    restored = checkpoints.restore_latest(run_dir, state, managers)
    epochs_done, steps_done = int(state.epoch), int(state.progress.step)
    run_folder.record_resumed_config(run_dir, config, epochs_done, steps_done)
    where = f"after epoch {epochs_done}"
    if steps_done:
        where += f", step {steps_done} of epoch {epochs_done + 1}"
    print(f"Resuming {restored} {where} of {config.epochs}")
    # Rows after the checkpoint belong to an epoch that will be trained again.
    rows = utils.read_csv(run_dir / utils.METRICS_CSV)
    return [row for row in rows if int(row["epoch"]) <= epochs_done]


def _complete_records(
    run_dir: Path, events: summaries.EventLog, rows: list[dict], epochs_done: int
) -> None:
    """On resume: rebuild the newest pictures and the animations from the PNGs, and write
    the TensorBoard values of the committed epochs (`rows`, up to `epochs_done`) that the
    events lack, as after a kill between an epoch's checkpoint and the end of its events."""
    plot.write_latest_and_animations(run_dir)
    filled = events.backfill(rows, epochs_done)
    if filled:
        print(f"TensorBoard: wrote the values of epoch(s) {filled} that {events.folder} lacked")


def run_epoch(
    current: Run, number: int, stop_requested: stopping.StopRequest | stopping.AgreedStop
) -> int | None:
    """Train epoch `number` (1-based) and record it; returns an exit code if the run must stop.

    A Ctrl-C or SIGTERM mid-epoch saves the mid-epoch checkpoint and returns 128 + the
    signal; one during the epoch's last chunk lets the epoch end and be recorded first.
    """
    config, state = current.config, current.state
    start = time.perf_counter()
    split = current.labelled
    n_images = int((split.unlabelled if split else current.tensors.train_images).shape[0])
    try:
        train = train_one_epoch(
            current.train_chunk, n_images, state.generator, config.batch_size, number,
            state.progress, stop_requested, split=split,
        )  # fmt: skip
        if train is None:
            path = checkpoints.save_checkpoint(
                current.managers.interrupted, state.model, int(state.optimizer.iterations.numpy())
            )  # .numpy(): under multi_worker the step count is a MirroredVariable.
            print(  # From a new line: the progress bar's line is unfinished.
                f"\n{stop_requested.name}: saved the state after step "
                f"{int(state.progress.step)} of epoch {number} in {path}. Continue with: "
                f"{current.resume_hint}",
                file=sys.stderr,
            )
            return stop_requested.exit_code
        valid = evaluate.heldout_elbo(
            current.eval_step, current.tensors.valid_images, current.tensors.valid_labels,
            evaluate.VALID_SEED,
        )  # fmt: skip
        bad = stopping.non_finite_terms(valid)
        if bad is not None:
            raise utils.NonFiniteLoss(f"non-finite validation terms after epoch {number}: {bad}")
        stopping.check_not_diverged(number, train["loss"], valid["loss"], current.divergence_bound)
        seconds = time.perf_counter() - start
        learning_rate = last_learning_rate(state)
        record_epoch(current, number, train, valid, learning_rate, seconds)
        print(epoch_line(config, number, train, valid, learning_rate, seconds))
        stop = stop_requested()  # A collective under multi_worker: inside the try.
    except utils.NonFiniteLoss as err:
        raise utils.NonFiniteLoss(
            f"training diverged: {err}; nothing was saved after the last good "
            f"step. {stopping.divergence_advice(current.managers.epoch_end, current.resume_hint)}"
        ) from None
    except stopping.LOST_WORKER_ERRORS as err:
        if config.strategy != "multi_worker":
            raise
        latest = current.managers.epoch_end.latest_checkpoint
        message = stopping.lost_worker_message(
            number, err, latest, current.chief, current.resume_hint
        )
        raise utils.UserError(message) from None
    if stop:
        print(
            f"{stop_requested.name}: saved the state after epoch {number} in "
            f"{current.managers.epoch_end.latest_checkpoint}. Continue with: "
            f"{current.resume_hint}",
            file=sys.stderr,
        )
        return stop_requested.exit_code
    return None


def epoch_line(
    config: Config, number: int, train: dict, valid: dict, learning_rate: float, seconds: float
) -> str:
    """An epoch's log line: the train bound (−ELBO, −L_K, or M2's J^α/N), its terms, the
    validation −ELBO (and M2's q(y|x) error), the learning rate and the seconds."""
    bound = "-elbo" if config.train_samples == 1 else f"-L_{config.train_samples}"
    if config.n_labeled:
        bound = "J^a/N"
    q_error = f"  valid q(y|x) error {valid['q_error']:.2f}%" if "q_error" in valid else ""
    return (
        f"epoch {number:3d}/{config.epochs}  train {bound} {train['loss']:.3f} "
        f"(recon {train['recon']:.3f}, kl {train['kl']:.3f})  "
        f"valid -elbo {valid['loss']:.3f}{q_error}  lr {learning_rate:.3g}  {seconds:.1f}s"
    )


def last_learning_rate(state: checkpoints.State) -> float:
    """The learning rate of the optimizer's last step (its schedule at step count − 1)."""
    # Under loss scaling, the inner optimizer counts the steps it applied.
    optimizer = getattr(state.optimizer, "inner_optimizer", state.optimizer)
    return float(state.learning_rate(optimizer.iterations - 1))


def record_epoch(
    current: Run, number: int, train: dict, valid: dict, learning_rate: float, seconds: float
) -> None:
    """Epoch `number`'s row in metrics.csv, the curves, its canvases (in epochs/, the newest
    also at the top) and the animations, its checkpoint, then its TensorBoard events."""
    current.history.append(
        {
            "epoch": number,
            **{f"train_{k}": round(v, 6) for k, v in train.items()},
            **{f"valid_{k}": round(v, 6) for k, v in valid.items()},
            "learning_rate": learning_rate,
            "seconds": round(seconds, 3),
        }
    )
    # The checkpoint last: it commits the epoch. A crash or a full disk before
    # it re-trains the epoch on resume (its stale row is dropped there, and its
    # pictures are drawn again, the same), so no epoch lacks its records.
    run_dir, state, config = current.run_dir, current.state, current.config
    utils.write_csv(run_dir / utils.METRICS_CSV, current.history)
    plot.plot_curves(run_dir / utils.CURVES_PNG, current.history, config.train_samples)
    if number % config.plot_every == 0 or number == config.epochs:
        plot.write_canvases(
            canvas_model(state.model, current.source),
            current.canvas_inputs,
            run_dir,
            number,
            config,
        )
        plot.write_latest_and_animations(run_dir)
    state.epoch.assign(number)
    state.progress.step.assign(0)
    checkpoints.save_checkpoint(current.managers.epoch_end, state.model, number)
    # After the commit, so that the events never hold an epoch that will be trained
    # again; a kill before they are flushed is made good by the resume (_complete_records).
    current.events.write_epoch(current.history[-1], plot.canvas_files(run_dir).get(number, {}))


# --- The canvases' model and inputs (plot.py draws them without TensorFlow) ---


def canvas_model(
    model: cvae.CVAE, source: features.FeatureSource | None = None
) -> plot.CanvasModel:
    """The model's posterior means and mean images as NumPy functions, for plot.py, and
    for an M2 model q(y|x)'s labels. A model of M1's features (`source`) is drawn in
    pixels through M1: its encoder's means in, its decoder's mean images out."""

    def to_model(x: np.ndarray) -> tf.Tensor:
        return tf.constant(source.means((x * 255.0).round().astype(np.uint8)) if source else x)

    def encode(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return cvae.posterior_mean(model, to_model(x), tf.constant(labels)).numpy()

    def decode(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        means = cvae.mean_image(model, tf.constant(z), tf.constant(labels)).numpy()
        return source.decode(tf.constant(means)).numpy() if source else means

    def predict(x: np.ndarray) -> np.ndarray:
        return tf.argmax(model.classifier_logits(to_model(x)), axis=-1).numpy()

    return plot.CanvasModel(encode, decode, predict if model.has_classifier else None)


def make_canvas_inputs(
    test_images: np.ndarray, test_labels: np.ndarray, config: Config
) -> plot.CanvasInputs:
    """The canvases' fixed inputs, drawn from the run's seed; the encoder inputs are
    noised and binarised by the same function as in training."""

    def corrupt(x: np.ndarray, stream: int) -> np.ndarray:
        seed = tf.constant([config.seed, CANVAS_SEED + stream], dtype=tf.int64)
        x_input, _ = draws.prepare_batch(tf.constant(x), seed, config.add_noise, config.binarized)
        return x_input.numpy()

    n_samples = plot.N_STYLES if config.conditional else 100  # A plain VAE's 10x10 grid.
    return plot.make_canvas_inputs(
        test_images, test_labels, config.n_z, (config.seed, CANVAS_SEED), corrupt, n_samples
    )


# --- The test evaluation ---


def final_evaluation(current: Run) -> int:
    """The end of a training run: evaluate its last epoch into metrics.json; returns the
    exit code.

    A Ctrl-C here comes after every checkpoint was saved: it says so, and how to
    evaluate again.
    """
    run_dir, state = current.run_dir, current.state
    checkpoint = current.managers.epoch_end.latest_checkpoint
    try:
        evaluate.write_test_metrics(
            run_dir, state.model, current.splits, current.config, int(state.epoch), checkpoint
        )
        export.write_export(
            run_dir, state.model, current.source, checkpoint, current.config.dataset
        )
        summaries.record_final(current.events, run_dir, int(state.epoch))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted during the final evaluation; the training finished and its "
            f"checkpoints are saved. Evaluate with: python main.py --eval_only {run_dir}",
            file=sys.stderr,
        )
        return utils.EXIT_INTERRUPTED
    print(f"outputs in {run_dir}" if current.chief else "outputs in worker 0's run folder")
    return 0


def evaluate_only(config: Config) -> int:
    """`--eval_only RUN_DIR`: evaluate the run's last checkpoint into its metrics.json,
    and draw that epoch's canvases if the folder lacks them."""
    run_dir = Path(config.eval_only)
    utils.set_seed(config.seed)
    print_device()
    latest = tf.train.latest_checkpoint(run_dir / utils.CHECKPOINTS_DIR)
    if latest is None:
        folder = run_dir / utils.CHECKPOINTS_DIR
        raise utils.UserError(f"--eval_only {run_dir}: no checkpoint in {folder}.")
    run_folder.check_eval_only_folder(run_dir)
    lock = run_folder.lock_run_folder(run_dir, "--eval_only")
    try:
        return _evaluate_locked(config, run_dir, latest)
    finally:
        lock.release()


def _evaluate_locked(config: Config, run_dir: Path, latest: str) -> int:
    """--eval_only's work, once the folder is this process's alone."""
    checkpoints.check_model_fits_in_memory(config)
    pixels = load_splits(config)
    source = open_features(config, pixels)
    splits = source.splits(pixels) if source else pixels
    state = checkpoints.build_state(config, n_features=len(source.active) if source else None)
    checkpoints.restore_checkpoint(state.checkpoint, latest, f"--eval_only {run_dir}")
    epochs = int(state.epoch)
    print(f"Evaluating {latest} (epoch {epochs})")
    again = f"its checkpoints are intact: free space, then: python main.py --eval_only {run_dir}"
    with run_folder.outputs_written_to(run_dir, again):
        evaluate.write_test_metrics(run_dir, state.model, splits, config, epochs, latest)
        print(f"wrote {run_dir / 'metrics.json'}")
        drawn = plot.draw_missing_canvases(
            run_dir,
            canvas_model(state.model, source),
            lambda: make_canvas_inputs(pixels.test_images, pixels.test_labels, config),
            config,
            epochs,
        )
        # The TensorBoard values the events lack (say, of a run stopped in its final
        # evaluation), read from the files as a resume writes them.
        events = summaries.EventLog(run_dir)
        try:
            rows = utils.read_csv(run_dir / utils.METRICS_CSV)
            events.write_hparams(config)
            events.backfill(rows, epochs)
            summaries.record_final(events, run_dir, epochs)
        finally:
            events.close()
    if drawn:
        print(f"drew the canvases of epoch {epochs} in {run_dir}")
    return 0
