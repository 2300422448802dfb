"""The run folder: creating it, checking it can be written, and a full disk.

Every write of a run goes under its folder; a write refused for want of
space becomes one line that says what is kept and how to go on.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import tensorflow as tf

import utils

if TYPE_CHECKING:
    from config import Config


# The errors of a write refused for want of space, and what to call them.
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_cause(err: BaseException) -> str | None:
    """Why a write failed, if it was for want of space (DISK_FULL's words), else None.

    Python's writes say so by errno. TensorFlow's (the checkpoints) raise an
    OpError, usually ResourceExhaustedError, whose message holds the system's
    words: they are matched, since an OpError of the same class may also be
    an out-of-memory error of the model.
    """
    if isinstance(err, OSError):
        return DISK_FULL.get(err.errno)
    if isinstance(err, tf.errors.OpError):
        for code, cause in DISK_FULL.items():
            if os.strerror(code) in (err.message or ""):
                return cause
    return None


@contextlib.contextmanager
def outputs_written_to(folder: Path, then: str | Callable[[], str]) -> Iterator[None]:
    """Report a write under `folder` that fails for want of space as one utils.UserError.

    The message names the folder and the cause, then says `then` (what is kept,
    and how to continue once space is freed; a callable is asked at the
    failure). Every other error passes unchanged.
    """
    try:
        yield
    except (OSError, tf.errors.OpError) as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise utils.UserError(
            disk_full_message(folder, cause, then() if callable(then) else then)
        ) from err


def disk_full_message(folder: Path, cause: str, then: str) -> str:
    return f"cannot write to {folder}: {cause}; {then}"


def resume_after_disk_full(run_dir: Path) -> str:
    """What a training run that hit a full disk keeps, and how it goes on: --resume from
    its last checkpoint on disk, or, before the first one, a new run."""
    folder = run_dir / utils.CHECKPOINTS_DIR
    if not any(tf.train.latest_checkpoint(f) for f in (folder, folder / utils.INTERRUPTED_DIR)):
        return "no epoch had been saved yet: free space, then start the run again"
    return (
        "the run stopped with its last checkpoint and metrics.csv intact: free space, "
        f"then continue with: python main.py --resume {run_dir}"
    )


def check_output_folder(config: Config) -> None:
    """Refuse, before anything is created, a run whose folder cannot be written."""
    target = Path(config.resume or config.results_dir)
    try:
        utils.check_can_create_in(target)
    except ValueError as err:
        cause = disk_full_cause(err.__cause__) if err.__cause__ is not None else None
        if cause is not None:  # Its test folder did not fit: the disk is full, not the folder bad.
            raise utils.UserError(
                disk_full_message(target, cause, "free space, then run the command again")
            ) from err
        flag = "--resume" if config.resume else "--results_dir"
        raise utils.UserError(f"{flag} {target}: {err}") from err


def code_version(folder: Path = utils.PROJECT_DIR) -> dict | None:
    """The commit of the code in `folder` and whether its tree has changes (`git status`
    lists any), for config.json; None where git is missing or `folder` is no checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=30,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # Takes no lock: a read only.
        ).stdout  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD").strip()
        changes = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):  # No git, no checkout, no commit yet.
        return None
    return {"commit": commit, "uncommitted_changes": changes}


def new_run_dir(config: Config, extra: dict | None = None) -> Path:
    """Create the run's folder and its config.json: every flag, the library versions and,
    from a git checkout, the code's commit and whether it had uncommitted changes."""
    try:
        run_dir = utils.make_run_dir(config.results_dir, config.run_tags())
    except OSError as err:
        raise utils.UserError(f"--results_dir {config.results_dir}: {err}") from err
    with outputs_written_to(Path(config.results_dir), "free space, then start the run again"):
        try:
            values = {**config.to_json(), **(extra or {}), "versions": utils.library_versions()}
            code = code_version()
            if code is not None:
                values["code"] = code
            utils.write_json(run_dir / utils.CONFIG_FILE, values)
        except BaseException:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # The new folder, empty: a failed write leaves nothing in it.
            raise
    return run_dir


def open_run_folder(
    config: Config, strategy: tf.distribute.Strategy, extra: dict | None = None
) -> Path:
    """The folder the run writes: --resume's, or a new one under --results_dir.

    Under --strategy multi_worker only worker 0 (the chief) writes it. Every
    worker still saves what the chief saves, as TensorFlow asks (a save may
    aggregate variables across workers), and does the same work, so that the
    workers stay in step; the others write into a private temporary folder,
    removed when the process ends: a new run there, or a copy of --resume's
    folder, which they read but never write.
    """
    if strategy.extended.should_checkpoint:
        return Path(config.resume) if config.resume else new_run_dir(config, extra)
    scratch = Path(tempfile.mkdtemp(prefix="cvae_worker_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    print(
        f"Worker {strategy.cluster_resolver.task_id}: worker 0 writes the run folder; "
        f"this worker's copy goes to {scratch}, removed at the end."
    )
    if not config.resume:
        return new_run_dir(dataclasses.replace(config, results_dir=str(scratch)), extra)
    copy = scratch / Path(config.resume).name
    shutil.copytree(config.resume, copy)
    return copy


def record_resumed_config(run_dir: Path, config: Config, done: int, step: int) -> None:
    """Check that a resumed run has `config.epochs` to aim at, and record in config.json
    the flags this resume changed.

    `done` epochs have ended, and `step` steps of the next one are done (0
    unless a Ctrl-C checkpoint was restored). Writing the new --epochs (and any
    other flag a resume may change: --data_dir, the canvas and evaluation
    settings, --strategy, --xla) into config.json makes a later plain
    `--resume` or `--eval_only` use them too, e.g. after a Ctrl-C during the
    extension.
    """
    path = run_dir / utils.CONFIG_FILE
    saved = json.loads(path.read_text())
    needed = done + 1 if step else done  # A started epoch must be finished.
    if config.epochs < needed:
        where = (
            f"stopped in epoch {done + 1} (after step {step})"
            if step
            else f"has done {done} epochs"
        )
        if config.epochs != saved.get("epochs"):  # --epochs was given.
            advice = f"pass --epochs {needed} or more"
            if saved.get("epochs", 0) >= needed:
                advice += ", or drop it"
            raise utils.UserError(
                f"--epochs {config.epochs} is too few: {run_dir} {where}; {advice}."
            )
        raise utils.UserError(
            f"{path} asks for {config.epochs} epochs, but {run_dir} {where}; "
            f"pass --epochs {needed} or more."
        )
    # The resumed config is the saved one with this command's overrides; `resume`
    # itself is not a setting of the run.
    updated = {**saved, **config.to_json(), "resume": saved.get("resume")}
    if json.loads(json.dumps(updated)) != saved:  # Compared as JSON: tuples are lists there.
        utils.write_json(path, updated)


def check_eval_only_folder(run_dir: Path) -> None:
    """Refuse, before the evaluation, a run folder that --eval_only could not complete."""
    if not (run_dir / utils.METRICS_CSV).is_file():
        raise utils.UserError(
            f"--eval_only {run_dir}: no metrics.csv there (the training curves and times); "
            "is it a complete run folder?"
        )
    try:
        utils.check_can_create_in(run_dir)
    except ValueError as err:
        raise utils.UserError(
            f"--eval_only {run_dir}: metrics.json cannot be written: {err}"
        ) from err


# --- One writer per run folder ---


class RunLock:
    """An exclusive lock on a run folder, held by this process while it writes there.

    flock on a file inside the folder: the kernel drops it when the process
    ends, however it ends (kill -9 included), so a lock is never left stale.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing the file releases its flock.
            self._fd = None


def lock_run_folder(run_dir: Path, flag: str) -> RunLock:
    """Take `run_dir`'s lock, or refuse in one line naming the process that holds it.

    The lock file keeps the holder's PID, host and start time for that message;
    it stays in the folder, since removing it would race with the next writer.
    """
    path = run_dir / utils.LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise utils.UserError(
            f"{flag} {run_dir}: the folder is in use by {holder}; one process writes a run "
            "at a time: wait for it to end (or stop it), then run this command again"
        ) from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
    return RunLock(fd)
