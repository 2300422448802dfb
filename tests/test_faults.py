"""Faults that must end in one line, never a traceback: a full disk, a model too big to fit.

A full disk is tried two ways: for real, on a 3 MB tmpfs (skipped where the
sandbox forbids `mount`), and deterministically, by making one chosen write
of the real script fail as a full disk makes it fail. Either way the run must
stop with exit code 1 and one `error:` line that names its folder, says why
and how to go on, and `--resume` must then finish the run, each epoch once.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import XLA_OFF, epochs_in_csv, one_error_line, single_run_dir, tree

import checkpoints
import cvae
import data_utils
import main
import run_folder
import train
import utils
from config import Config

EPOCHS = 3
STEPS = 10  # 300 images / batch 30
RUN_FLAGS = [
    *("--n_train", "300", "--batch_size", "30", "--epochs", str(EPOCHS), "--seed", "5"),
    *("--n_eval", "50", "--iw_samples", "2"),
    # Without XLA: compiling would add about 2 s to each of this module's many runs,
    # and what they test happens between chunks, in Python, the same either way. The
    # default (XLA) path is resumed exactly in test_end_to_end.
    *XLA_OFF,
]


def run_main(*argv: str) -> int:
    return main.main([*RUN_FLAGS, *argv])


def assert_disk_full_line(line: str, folder: Path, resume: bool = True) -> None:
    assert f"cannot write to {folder}: no space left on the device" in line, line
    if resume:
        assert line.endswith(f"free space, then continue with: python main.py --resume {folder}")


def disk_full(path: object = None, code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code), None if path is None else str(path))


def fail_write(monkeypatch, pattern: str, occurrence: int = 1, code: int = errno.ENOSPC) -> None:
    """Make the `occurrence`-th write of a file named like `pattern` (through
    utils.atomic_write_bytes, which every file of a run but the checkpoints goes
    through) fail as on a full disk, before it touched anything."""
    real = utils.atomic_write_bytes
    seen = 0

    def write(path, data) -> None:
        nonlocal seen
        if fnmatch.fnmatch(Path(path).name, pattern):
            seen += 1
            if seen == occurrence:
                raise disk_full(path, code)
        real(path, data)

    monkeypatch.setattr(utils, "atomic_write_bytes", write)


def fail_checkpoint(monkeypatch, folder: str, occurrence: int, half_written: bool) -> None:
    """Make the `occurrence`-th save into checkpoints/`folder` fail with TensorFlow's error
    for a full disk; with `half_written`, after leaving what a save cut short leaves:
    its shard folder, and a truncated ckpt-N.index and data file."""
    import tensorflow as tf

    real = tf.train.CheckpointManager.save
    seen = 0

    def save(manager, checkpoint_number=None, **kwargs):
        nonlocal seen
        if Path(manager.directory).name == folder:
            seen += 1
            if seen == occurrence:
                prefix = Path(manager.directory) / f"ckpt-{checkpoint_number}"
                shard = Path(f"{prefix}_temp") / "part-00000-of-00001.data-00000-of-00001.tmp"
                if half_written:
                    shard.parent.mkdir()
                    shard.write_bytes(b"\0" * 1000)
                    Path(f"{prefix}.index").write_bytes(b"\x01half")
                    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"\0" * 100)
                raise tf.errors.ResourceExhaustedError(
                    None, None, f"{shard}; No space left on device [Op:SaveV2]"
                )
        return real(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)


def resume_finishes(run_dir: Path, capsys) -> None:
    """After the fault is gone, `--resume` ends the run, each epoch once in metrics.csv."""
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 0, capsys.readouterr().err
    assert epochs_in_csv(run_dir) == list(range(1, EPOCHS + 1))
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "epochs" / f"latent_epoch{EPOCHS:03d}.png").is_file()
    assert not list(run_dir.glob("**/*_temp")), "a half-written checkpoint was left"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run, for the faults of --resume and --eval_only (copied, never modified)."""
    results = tmp_path_factory.mktemp("finished")
    assert run_main("--results_dir", str(results)) == 0
    return single_run_dir(results)


# 1. A full disk, for real ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, and a function that grows it (frees space); skipped if mount fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs here: {mounted.stderr.strip() or 'mount failed'}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_results_dir_that_fills_up_stops_in_one_line_and_resumes(small_disk, capsys):
    import tensorflow as tf

    # 100 hidden units: checkpoints of 2.2 MB, so that the first fits and the
    # second fills the disk while TensorFlow writes it.
    disk, grow = small_disk
    assert run_main("--n_hidden", "100", "--results_dir", str(disk)) == 1
    run_dir = single_run_dir(disk)
    assert_disk_full_line(one_error_line(capsys.readouterr()), run_dir)
    assert epochs_in_csv(run_dir) == [1, 2]
    assert Path(tf.train.latest_checkpoint(run_dir / "checkpoints")).name == "ckpt-1"
    assert not list(run_dir.glob("**/*_temp")), "the failed save's shard was left"
    grow()
    resume_finishes(run_dir, capsys)


@pytest.mark.slow
def test_a_first_checkpoint_that_cannot_fit_says_to_start_again(small_disk, capsys):
    # 500 hidden units: the first checkpoint (13 MB) never fits, so there is nothing to resume.
    disk, _ = small_disk
    assert run_main("--results_dir", str(disk)) == 1
    run_dir = single_run_dir(disk)
    line = one_error_line(capsys.readouterr())
    assert f"cannot write to {run_dir}: no space left on the device" in line, line
    assert line.endswith("no epoch had been saved yet: free space, then start the run again")
    assert not list(run_dir.glob("**/*_temp")), "the failed save's shard was left"


# 2. A full disk at a chosen write ---------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_at_each_write_stops_in_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    # One run that meets a full disk again and again, each time at another of its
    # files, and is resumed after each: the faults of one process count its writes.
    faults = [
        ("metrics.csv", 2),  # Epoch 2's row.
        ("curves.png", 1),  # Epoch 2's curves, in the resumed process.
        ("manifold_label4_epoch003.png", 1),  # A canvas amid the others, at the last epoch.
        ("metrics.json", 1),  # The final evaluation, after the last checkpoint.
    ]
    run_dir = None
    for pattern, occurrence in faults:
        fail_write(monkeypatch, pattern, occurrence)
        if run_dir is None:
            assert run_main("--results_dir", str(tmp_path)) == 1
            run_dir = single_run_dir(tmp_path)
        else:
            assert main.main(["--resume", str(run_dir)]) == 1
        assert_disk_full_line(one_error_line(capsys.readouterr()), run_dir)
        monkeypatch.undo()
    assert epochs_in_csv(run_dir) == [1, 2, 3]  # Epoch 3 was saved before metrics.json.
    resume_finishes(run_dir, capsys)


@pytest.mark.slow
def test_a_failed_epoch_checkpoint_keeps_the_last_one_and_resumes(tmp_path, monkeypatch, capsys):
    import tensorflow as tf

    # TensorFlow's own error, after a half-written ckpt-2 (shard folder, index, data).
    fail_checkpoint(monkeypatch, utils.CHECKPOINTS_DIR, occurrence=2, half_written=True)
    assert run_main("--results_dir", str(tmp_path)) == 1
    run_dir = single_run_dir(tmp_path)
    assert_disk_full_line(one_error_line(capsys.readouterr()), run_dir)
    checkpoint_dir = run_dir / utils.CHECKPOINTS_DIR
    assert Path(tf.train.latest_checkpoint(checkpoint_dir)).name == "ckpt-1"
    assert not (checkpoint_dir / "ckpt-2_temp").exists()  # Its space is given back.
    assert (checkpoint_dir / "ckpt-2.index").exists()  # The half-written files stay: ignored.
    assert epochs_in_csv(run_dir) == [1, 2]  # Epoch 2's row: dropped by the resume.
    monkeypatch.undo()
    resume_finishes(run_dir, capsys)


@pytest.mark.slow
def test_a_failed_ctrl_c_checkpoint_keeps_the_epoch_ones_and_resumes(
    tmp_path, monkeypatch, capsys, after_each_chunk
):
    # A real SIGINT after step 3 of epoch 2; the Ctrl-C checkpoint's save then fails.
    monkeypatch.setattr(train, "STEPS_PER_CHUNK", 3)
    after_each_chunk(
        lambda steps: signal.raise_signal(signal.SIGINT) if steps == STEPS + 3 else None
    )
    fail_checkpoint(monkeypatch, "interrupted", occurrence=1, half_written=False)
    assert run_main("--results_dir", str(tmp_path)) == 1
    run_dir = single_run_dir(tmp_path)
    assert_disk_full_line(one_error_line(capsys.readouterr()), run_dir)
    assert epochs_in_csv(run_dir) == [1]
    monkeypatch.undo()
    resume_finishes(run_dir, capsys)


def test_a_full_disk_at_config_json_leaves_no_folder(tmp_path, monkeypatch, capsys):
    fail_write(monkeypatch, "config.json")
    assert run_main("--results_dir", str(tmp_path)) == 1
    line = one_error_line(capsys.readouterr())
    assert line == (
        f"error: cannot write to {tmp_path}: no space left on the device; "
        "free space, then start the run again"
    )
    assert list(tmp_path.iterdir()) == []  # The new, empty run folder was removed.


def test_a_disk_too_full_for_the_folder_check_says_so(tmp_path, monkeypatch, capsys):
    # On most file systems a full disk refuses even a new folder: the check before the run.
    def mkdtemp(*args, **kwargs):
        raise disk_full(tmp_path / ".write-test-x")

    monkeypatch.setattr(utils.tempfile, "mkdtemp", mkdtemp)
    assert run_main("--results_dir", str(tmp_path)) == 1
    assert one_error_line(capsys.readouterr()) == (
        f"error: cannot write to {tmp_path}: no space left on the device; "
        "free space, then run the command again"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_when_a_resume_records_its_epochs(finished, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    before = tree(run_dir, lock=False)
    fail_write(monkeypatch, "config.json")
    assert main.main(["--resume", str(run_dir), "--epochs", str(EPOCHS + 1)]) == 1
    assert_disk_full_line(one_error_line(capsys.readouterr()), run_dir)
    assert tree(run_dir, lock=False) == before
    monkeypatch.undo()
    assert main.main(["--resume", str(run_dir), "--epochs", str(EPOCHS + 1)]) == 0
    assert epochs_in_csv(run_dir) == list(range(1, EPOCHS + 2))


@pytest.mark.slow
def test_a_full_disk_during_eval_only_keeps_metrics_json(finished, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    before = tree(run_dir, lock=False)
    # The copy of the previous metrics.json fails: neither it nor an empty name is left.
    fail_write(monkeypatch, "metrics.*.json")
    assert main.main(["--eval_only", str(run_dir)]) == 1
    line = one_error_line(capsys.readouterr())
    assert line == (
        f"error: cannot write to {run_dir}: no space left on the device; its checkpoints are "
        f"intact: free space, then: python main.py --eval_only {run_dir}"
    )
    assert tree(run_dir, lock=False) == before
    monkeypatch.undo()
    assert main.main(["--eval_only", str(run_dir)]) == 0
    assert len(list(run_dir.glob("metrics.*.json"))) == 1


def test_other_errors_are_not_called_a_full_disk(tmp_path):
    import tensorflow as tf

    with pytest.raises(PermissionError), run_folder.outputs_written_to(tmp_path, "never said"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    with (
        pytest.raises(tf.errors.ResourceExhaustedError),
        run_folder.outputs_written_to(tmp_path, "never said"),
    ):
        raise out_of_memory
    assert run_folder.disk_full_cause(disk_full()) == "no space left on the device"


def test_a_quota_is_named_as_such(tmp_path):
    with (
        pytest.raises(utils.UserError) as raised,
        run_folder.outputs_written_to(tmp_path, lambda: "free space"),
    ):
        raise disk_full(tmp_path / "metrics.csv", errno.EDQUOT)
    assert str(raised.value) == f"cannot write to {tmp_path}: disk quota exceeded; free space"


# 3. A model too big for the memory --------------------------------------------------


def test_parameter_count_is_that_of_the_model():
    for n_z, hidden in [(3, (7, 5, 6, 4)), (2, (500, 500, 500, 500))]:
        model = cvae.CVAE(n_z, hidden)
        actual = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        assert cvae.parameter_count(n_z, hidden) == actual


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--n_z", "100000000"], "--n_z 100000000 with --n_hidden 500 needs "),
        (["--n_hidden", "1000000"], "--n_z 2 with --n_hidden 1000000 needs "),
    ],
)
def test_a_model_too_big_for_the_memory_is_refused_at_once(
    flags, says, tmp_path, monkeypatch, capsys
):
    # Refused before anything was built: neither the data read nor a model made.
    built = []

    def refuse(what: str):
        def build(*args, **kwargs):
            built.append(what)
            raise AssertionError(f"{what} before the memory check")

        return build

    monkeypatch.setattr(data_utils, "load_dataset", refuse("data_utils.load_dataset"))
    monkeypatch.setattr(cvae.CVAE, "__init__", refuse("cvae.CVAE"))
    assert run_main(*flags, "--results_dir", str(tmp_path)) == 1
    assert built == []
    line = one_error_line(capsys.readouterr())
    assert says in line and "for the weights, gradients and Adam's slots" in line, line
    assert line.endswith("available: choose a smaller --n_z or --n_hidden."), line
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_four_float32_copies(monkeypatch):
    config = Config(n_z=2, n_hidden=(500,))
    needed = cvae.parameter_count(2, (500,) * 4) * 4 * 4
    monkeypatch.setattr(checkpoints, "available_memory", lambda: needed)
    checkpoints.check_model_fits_in_memory(config)  # Just fits.
    monkeypatch.setattr(checkpoints, "available_memory", lambda: needed - 1)
    with pytest.raises(utils.UserError, match="needs 21 MB for"):
        checkpoints.check_model_fits_in_memory(config)
    monkeypatch.setattr(checkpoints, "available_memory", lambda: None)  # Unknown: not refused.
    checkpoints.check_model_fits_in_memory(config)
