"""--strategy multi_worker as a real cluster of two workers on this machine.

MultiWorkerMirroredStrategy needs no second machine: two processes of the real
script, each with a TF_CONFIG naming ports of 127.0.0.1 and its own task index,
form a cluster of two workers (one CPU device each) that all-reduce over gRPC as
two machines would. The ports are chosen free at run time; every wait is bounded,
and a worker still running when a test ends, passes or fails, is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY_FLAGS, single_run_dir

import main
import stopping
import utils

PROJECT = Path(__file__).resolve().parents[1]
# Two workers of a tiny run: start-up, tracing, two epochs and the evaluation take
# about 20 s on two cores shared with other jobs; six times that is a hang, not a slow
# machine. With STOP_TIMEOUT, within pytest.ini's per-test limit.
RUN_TIMEOUT = 120
# After a worker dies, the other stops at its next collective, at once since the
# connection breaks, or at worst when TensorFlow's coordination service has missed
# the dead worker's heartbeats for 10 s; 90 s leaves room for a loaded machine.
STOP_TIMEOUT = 90
# The columns of metrics.csv that depend on the arithmetic of the training steps.
COMPARED = ("train_loss", "train_recon", "train_kl", "valid_loss", "valid_recon", "valid_kl")


def free_ports(n: int) -> list[int]:
    """`n` distinct ports of 127.0.0.1 that were free a moment ago (the OS's choice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))  # Held together, so that the ports differ.
        return [s.getsockname()[1] for s in sockets]


@contextlib.contextmanager
def cluster(tmp_path: Path, flags: list[str]) -> Iterator[list[subprocess.Popen]]:
    """Two workers of `main.py --strategy multi_worker <flags>`, killed on the way out.

    Worker i logs to worker{i}.out/.err and has its own TMPDIR, tmp{i}/, so that a
    test can see what it left there.
    """
    ports = free_ports(2)
    workers = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    argv = [sys.executable, str(PROJECT / "main.py"), "--strategy", "multi_worker", *flags]
    processes = []
    try:
        for index in range(2):
            task = {"type": "worker", "index": index}
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps({"cluster": workers, "task": task}),
                "TMPDIR": str(tmp_path / f"tmp{index}"),
                "PYTHONUNBUFFERED": "1",  # The log shows each epoch as it ends.
            }
            (tmp_path / f"tmp{index}").mkdir()
            out, err = (tmp_path / f"worker{index}.out"), (tmp_path / f"worker{index}.err")
            with out.open("w") as stdout, err.open("w") as stderr:
                processes.append(
                    subprocess.Popen(argv, cwd=PROJECT, env=env, stdout=stdout, stderr=stderr)
                )
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def log(tmp_path: Path, index: int, stream: str = "err") -> str:
    return (tmp_path / f"worker{index}.{stream}").read_text()


def wait_for_first_epoch(tmp_path: Path, workers: Sequence[subprocess.Popen]) -> None:
    """Until worker 1 has logged the end of epoch 1 (the workers end each epoch together),
    failing if a worker stops or RUN_TIMEOUT passes."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while "epoch   1/" not in log(tmp_path, 1, "out"):
        assert all(worker.poll() is None for worker in workers), log(tmp_path, 0)[-3000:]
        assert time.monotonic() < deadline, "no epoch ended in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_workers_train_as_one_device(tmp_path):
    results = tmp_path / "results"
    # No importance weighting: it is the same one-device code in either run. TINY_FLAGS
    # say --xla off: the one-device run would otherwise compile with XLA and draw with
    # threefry, the workers (never compiled) with Philox.
    assert main.parse_args(TINY_FLAGS).xla == "off"
    flags = [*TINY_FLAGS, "--iw_samples", "0"]
    start = time.monotonic()
    # The same --results_dir for both workers, as on one machine by default.
    with cluster(tmp_path, [*flags, "--results_dir", str(results)]) as workers:
        # The one-device run of the same seed and flags, in this process meanwhile.
        assert main.main([*flags, "--results_dir", str(tmp_path / "one")]) == 0
        for index, worker in enumerate(workers):
            remaining = max(1.0, RUN_TIMEOUT - (time.monotonic() - start))
            assert worker.wait(timeout=remaining) == 0, log(tmp_path, index)[-3000:]
    assert "2 replica(s)" in log(tmp_path, 0, "out")

    # Worker 0 wrote the run folder, worker 1 nothing there, and its own copy is gone.
    run_dir, one_dir = single_run_dir(results), single_run_dir(tmp_path / "one")
    assert list((tmp_path / "tmp1").iterdir()) == []
    names = {path.name for path in one_dir.iterdir()}
    assert {path.name for path in run_dir.iterdir()} == names
    saved = {path.name for path in (run_dir / "checkpoints").iterdir()}
    assert saved == {path.name for path in (one_dir / "checkpoints").iterdir()}

    rows = utils.read_csv(run_dir / "metrics.csv")
    one_rows = utils.read_csv(one_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in one_rows] == ["1", "2"]
    # Each worker sums its 32 rows of a batch and the all-reduce adds the two sums,
    # where one device sums the 64 rows at once: the same float32 terms, added in
    # another order and by matmul kernels chosen for other shapes. As in
    # test_distribute, the longest of those sums (the first layer's, over 784 pixels
    # and 10 labels) have 794 terms, each off by up to 794 * 6e-8 = 5e-5 of its
    # magnitude: rtol 1e-4. The 10 Adam steps keep the weights as close as their
    # rounding (seen: means 2e-8 apart). A row lost or counted twice moves these means
    # by about 1/300; gradients summed rather than averaged over the workers, far more.
    for row, one in zip(rows, one_rows, strict=True):
        for key in COMPARED:
            np.testing.assert_allclose(float(row[key]), float(one[key]), rtol=1e-4, err_msg=key)
        assert row["learning_rate"] == one["learning_rate"]  # The same step count.
    test = json.loads((run_dir / "metrics.json").read_text())
    one_test = json.loads((one_dir / "metrics.json").read_text())
    np.testing.assert_allclose(test["test_loss"], one_test["test_loss"], rtol=1e-4)


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_with_one_error_line(tmp_path):
    results = tmp_path / "results"
    # Epochs enough to be killed in, and no canvas or IW evaluation before the end.
    flags = [
        *("--n_train", "300", "--batch_size", "64", "--epochs", "1000"),
        *("--plot_every", "1000", "--iw_samples", "0", "--results_dir", str(results)),
    ]
    with cluster(tmp_path, flags) as (worker0, worker1):
        wait_for_first_epoch(tmp_path, (worker0, worker1))
        worker1.kill()
        killed = time.monotonic()
        try:
            code = worker0.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker 0 still runs {STOP_TIMEOUT} s after worker 1 was killed")
        assert code == 1, log(tmp_path, 0)[-3000:]
        print(f"worker 0 stopped {time.monotonic() - killed:.1f} s after worker 1 was killed")

    err = log(tmp_path, 0)
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    run_dir = single_run_dir(results)
    assert errors[0].startswith("error: lost contact with another worker in epoch "), errors[0]
    assert errors[0].endswith(
        f"is saved: restart every worker with: python main.py --resume {run_dir}"
    )


@pytest.mark.slow
def test_a_sigterm_to_one_worker_stops_both_at_the_same_step_and_saves(tmp_path):
    """A scheduler's SIGTERM may reach one worker first: the workers agree at each chunk,
    so both stop at the same one and save the mid-epoch checkpoint together."""
    results = tmp_path / "results"
    flags = [
        *("--n_train", "20000", "--epochs", "3", "--n_eval", "100", "--iw_samples", "0"),
        *("--xla", "off", "--results_dir", str(results)),
    ]
    with cluster(tmp_path, flags) as (worker0, worker1):
        wait_for_first_epoch(tmp_path, (worker0, worker1))
        worker1.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=STOP_TIMEOUT) for worker in (worker0, worker1)]
    assert codes == [143, 143], log(tmp_path, 0)[-3000:]
    saved = [
        re.search(r"SIGTERM: saved the state after (step \d+ of epoch \d+)", log(tmp_path, i))
        for i in (0, 1)
    ]
    assert all(saved), [log(tmp_path, i)[-2000:] for i in (0, 1)]
    assert saved[0][1] == saved[1][1]  # The same chunk on both workers.
    assert tf.train.latest_checkpoint(single_run_dir(results) / "checkpoints" / "interrupted")


def test_multi_worker_without_tf_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = main.main(["--strategy", "multi_worker", "--results_dir", str(tmp_path)])
    assert code == 1
    assert "TF_CONFIG" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_cause_of_an_abort_is_one_line():
    """TensorFlow's two ways of saying a worker is lost, as seen here: a broken
    connection (a killed worker), and missed heartbeats (a worker stopped by SIGSTOP),
    whose list of lost tasks is on the next line."""

    def error(*lines: str) -> tf.errors.UnavailableError:
        head = ["Graph execution error:", "", "Detected at node while/CollectiveReduceV2"]
        return tf.errors.UnavailableError(None, None, "\n".join([*head, *lines]))

    reset = error("Collective ops is aborted by: recvmsg:Connection reset by peer", "more")
    assert stopping.abort_cause(reset) == "recvmsg:Connection reset by peer"
    silent = error(
        "Collective ops is aborted by: Error reported from /job:worker/task:1: The "
        "following tasks are unhealthy (stopped sending heartbeats):",
        "/job:worker/replica:0/task:1",
        "The tasks have crashed.",
    )
    assert stopping.abort_cause(silent).endswith(
        "(stopped sending heartbeats): /job:worker/replica:0/task:1"
    )
    assert stopping.abort_cause(tf.errors.DeadlineExceededError(None, None, "a\nb")) == (
        "DeadlineExceededError"
    )
