"""One writer per run folder: a second training, --resume or --eval_only is refused."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_FLAGS, one_error_line, single_run_dir

import main
import run_folder
import utils

PROJECT = Path(__file__).resolve().parents[1]
# A tiny run takes seconds to open; a minute without its "Run folder:" line is a hang.
START_TIMEOUT = 60


def test_the_lock_is_exclusive_and_released(tmp_path):
    first = run_folder.lock_run_folder(tmp_path, "--resume")
    with pytest.raises(utils.UserError, match=rf"PID {os.getpid()} on {socket.gethostname()}"):
        run_folder.lock_run_folder(tmp_path, "--resume")
    first.release()
    run_folder.lock_run_folder(tmp_path, "--resume").release()  # Free again.


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_trains_and_not_after_a_kill_9(tmp_path, capsys):
    # The first writer: a real training run in another process, long enough to be seen.
    flags = [*TINY_FLAGS, "--epochs", "1000", "--plot_every", "1000", "--iw_samples", "0"]
    argv = [sys.executable, str(PROJECT / "main.py"), *flags, "--results_dir", str(tmp_path)]
    log = tmp_path.parent / "first.out"
    with log.open("w") as out:
        first = subprocess.Popen(argv, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "epoch   1/" not in log.read_text():
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run did not start in time"
            time.sleep(0.1)
        run_dir = single_run_dir(tmp_path)
        for flag in ("--resume", "--eval_only"):
            assert main.main([flag, str(run_dir)]) == 1
            error = one_error_line(capsys.readouterr())
            assert re.search(rf"{flag} {re.escape(str(run_dir))}: the folder is in use", error)
            assert f"PID {first.pid} on {socket.gethostname()}" in error, error
        # kill -9 leaves no stale lock: the kernel drops a dead process's flock.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        run_folder.lock_run_folder(run_dir, "--resume").release()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
