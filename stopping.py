"""Why a run stops before its last epoch, and the one line it says then.

A Ctrl-C or a scheduler's SIGTERM (asked for, and saved at the end of a chunk,
agreed by every worker of a cluster), a NaN or a blow-up of the bound (the last
good checkpoint kept), a worker lost by a multi_worker cluster.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import tensorflow as tf

import utils
from data_utils import N_PIXELS

# A model that knows nothing, logits 0 at every pixel, scores D·log 2 nats (543 on
# MNIST) whatever the images; a fresh model scores within twice that. Ten times it is
# no run's value but a blow-up's, caught at its first epoch instead of running on.
DIVERGENCE_FACTOR = 10


def divergence_bound(know_nothing_nats: float = N_PIXELS * math.log(2.0)) -> float:
    """The −ELBO (or −L_K, or M2's J^α/N) per image above which a run has diverged: ten
    times a know-nothing model's (by default over pixels; features.know_nothing_nats
    over M1's features)."""
    return DIVERGENCE_FACTOR * max(1.0, know_nothing_nats)


def check_not_diverged(epoch: int, train_loss: float, valid_loss: float, bound: float) -> None:
    """Raise NonFiniteLoss if the epoch's train or validation bound is past `bound`."""
    for split, value in (("train", train_loss), ("validation", valid_loss)):
        if value > bound:
            raise utils.NonFiniteLoss(
                f"the {split} bound reached {value:.4g} nats at epoch {epoch}, past "
                f"{bound:.0f} (ten times that of a model that has learnt nothing)"
            )


def non_finite_terms(terms: Mapping[str, float]) -> str | None:
    """ "name=value, ..." for every NaN or Inf term, or None if all are finite.

    All bad terms are listed, so that a message shows whether the
    reconstruction, the KL or both broke.
    """
    bad = [f"{name}={value}" for name, value in terms.items() if not math.isfinite(value)]
    return ", ".join(bad) or None


def divergence_advice(manager: tf.train.CheckpointManager, resume_hint: str) -> str:
    """What to do after a NaN: the checkpoints saved so far are good."""
    if manager.latest_checkpoint is None:
        return "No epoch had ended: start a new run with a smaller --learning_rate."
    return (
        f"The checkpoints up to {manager.latest_checkpoint} are untouched: start a new run "
        f"with a smaller --learning_rate, or `{resume_hint}` to retry from the last one "
        "(with the same flags it repeats the same steps)."
    )


class StopRequest:
    """Whether a Ctrl-C (SIGINT) or a scheduler's SIGTERM asked the run to stop; callable."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process it ended (130, 143)."""
        return 128 + (self.signal or signal.SIGINT)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signal in (None, signal.SIGINT) else "SIGTERM"


class AgreedStop:
    """A StopRequest that every worker of a multi_worker cluster answers alike.

    Each look all-reduces the workers' flags (one tiny collective per chunk), so that
    a signal that reached any worker stops them all at the same chunk, where they
    save the mid-epoch checkpoint together, as TensorFlow's collective save needs.
    Every worker looks at the same points of the loop, so the collectives pair up.
    """

    def __init__(self, request: StopRequest, strategy: tf.distribute.Strategy) -> None:
        self.request = request

        @tf.function  # Eager collectives are slow, and TensorFlow warns at each.
        def count(flag: tf.Tensor) -> tf.Tensor:
            per_replica = strategy.run(tf.identity, args=(flag,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self.count = count

    def __call__(self) -> bool:
        votes = self.count(tf.constant(1.0 if self.request() else 0.0))
        if float(votes) > 0 and not self.request():
            self.request.signal = signal.SIGTERM  # Another worker's: a scheduler stops all.
        return float(votes) > 0

    @property
    def exit_code(self) -> int:
        return self.request.exit_code

    @property
    def name(self) -> str:
        return self.request.name


# The signals that stop a run cleanly: Ctrl-C, and what SLURM, Kubernetes and most
# schedulers send before they kill a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While active, a first SIGINT or SIGTERM only sets the returned StopRequest.

    The training loop checks it between chunks of compiled steps, so that it
    can stop at the end of the current chunk and save; a second signal quits
    at once.
    """
    request = StopRequest()

    def handler(signum, frame) -> None:
        if request():
            raise KeyboardInterrupt
        request.signal = signum
        # os.write, not print: a handler may interrupt a print of the main thread.
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):  # stderr replaced (tests, notebooks)
            fd = 2
        again = "press Ctrl-C" if signum == signal.SIGINT else "send it"
        os.write(
            fd,
            f"\n{request.name}: stopping at the end of the current chunk of steps to save a "
            f"checkpoint ({again} again to quit without saving).\n".encode(),
        )

    if threading.current_thread() is not threading.main_thread():
        yield request  # Only the main thread may install signal handlers.
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# How a collective of --strategy multi_worker fails when another worker is gone:
# UNAVAILABLE when its connection breaks (a killed worker), or when TensorFlow's
# coordination service has missed a worker's heartbeats for 10 s (a hung one, a
# cut network) and aborts the collectives; DEADLINE_EXCEEDED under a collective timeout.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


def abort_cause(err: tf.errors.OpError) -> str:
    """TensorFlow's cause of a collective's abort in one line: its words after "aborted
    by:", and the next line when they end in a colon (the tasks lost)."""
    lines = [line.strip() for line in (err.message or "").splitlines()]
    for i, line in enumerate(lines):
        if "aborted by:" in line:
            cause = line.split("aborted by:", 1)[1].strip()
            if cause.endswith(":") and i + 1 < len(lines):
                cause = f"{cause} {lines[i + 1]}"
            return cause
    return type(err).__name__


def lost_worker_message(
    number: int, err: tf.errors.OpError, latest: str | None, chief: bool, resume_hint: str
) -> str:
    """One line for a worker that lost the cluster in epoch `number`: TensorFlow's cause
    (not its many-line message), and how to go on from the `latest` checkpoint."""
    cause = abort_cause(err)
    if latest is None:
        then = "no epoch had ended: start the run again on every worker"
    else:
        name = Path(latest).name if chief else f"{Path(latest).name} of worker 0"
        then = f"{name} is saved: restart every worker with: {resume_hint}"
    return (
        f"lost contact with another worker in epoch {number} ({cause}): a worker stopped or "
        f"cannot be reached, and the others cannot go on without it; {then}"
    )
