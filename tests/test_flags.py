"""Flags: parsing, validation and the help text."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import main

FLOAT_FLAGS = [f.name for f in dataclasses.fields(main.Config) if f.type == "float"]


def test_defaults_match_the_documented_ones():
    config = main.parse_args([])
    assert (config.add_noise, config.n_z, config.epochs, config.batch_size) == (False, 2, 100, 128)
    assert (config.keep_prob, config.learning_rate, config.lr_decay) == (0.6, 1e-4, 0.98)
    assert config.hidden_sizes == (500, 500, 500, 500)
    assert config.dataset == "mnist" and config.n_train is None and config.resume is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--add_noise", "False"], False),
        (["--add_noise", "false"], False),
        (["--add_noise", "no"], False),
        (["--add_noise", "0"], False),
        (["--add_noise", "True"], True),
        (["--add_noise", "YES"], True),
        (["--add_noise", "1"], True),
        (["--add_noise"], True),
        ([], False),
    ],
)
def test_add_noise_parses_like_a_boolean(argv, expected):
    assert main.parse_args(argv).add_noise is expected


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_misspelt_boolean_fails_naming_the_allowed_values(capsys):
    err = _refused(["--add_noise", "Flase"], capsys)
    assert "Flase" in err and "True/False" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--n_z", "0"], "--n_z"),
        (["--keep_prob", "0"], "--keep_prob"),
        (["--keep_prob", "1.5"], "--keep_prob"),
        (["--epochs", "0"], "--epochs"),
        (["--batch_size", "0"], "--batch_size"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--learning_rate", "-1e-3"], "--learning_rate"),
        (["--lr_decay", "1.5"], "--lr_decay"),
        # nan and inf pass a plain `> 0` test: every float flag must refuse them.
        *[([f"--{name}", bad], f"--{name}") for name in FLOAT_FLAGS for bad in ("nan", "inf")],
        (["--n_train", "55001"], "--n_train"),
        (["--n_train", "0"], "--n_train"),
        (["--n_hidden", "500", "500"], "--n_hidden"),
        (["--n_hidden", "0"], "--n_hidden"),
        (["--dataset", "cifar"], "--dataset"),
        (["--n_z", "two"], "--n_z"),
    ],
)
def test_out_of_range_values_are_refused(argv, flag, capsys):
    assert flag in _refused(argv, capsys)


def test_hidden_sizes_one_or_four():
    assert main.parse_args(["--n_hidden", "64"]).hidden_sizes == (64, 64, 64, 64)
    four = main.parse_args(["--n_hidden", "1", "2", "3", "4"])
    assert four.hidden_sizes == (1, 2, 3, 4)


def test_config_is_frozen_and_round_trips_through_json():
    config = main.parse_args(["--n_z", "5", "--n_hidden", "8", "9", "10", "11", "--seed", "3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_z = 3  # type: ignore[misc]
    assert main.Config.from_json(config.to_json()) == config


def test_help_lists_every_flag_with_its_default():
    script = Path(main.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    for field in dataclasses.fields(main.Config):
        assert f"--{field.name}" in text
    assert "(default: 100)" in text and "(default: 0.6)" in text


def test_readme_documents_every_flag():
    readme = (Path(main.__file__).parent / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(main.Config) if f"| `--{f.name}` |" not in readme]
    assert not missing, f"flags missing from the README's table: {missing}"


def _saved_run(folder, **values) -> str:
    """A folder holding just the config.json of a run with `values`: enough for parse_args."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(main.Config(**values).to_json()))
    return str(folder)


def test_resume_and_eval_only_flags_are_validated_against_the_run_config(tmp_path):
    run = _saved_run(tmp_path / "run", n_z=8, data_dir="/old/data")
    # Dimensions 4 and 5 exist in the run's n_z=8, though not in the default n_z=2.
    resumed = main.parse_args(["--resume", run, "--manifold_dims", "4", "5"])
    assert (resumed.n_z, resumed.manifold_dims) == (8, (4, 5))
    # The data may move: --data_dir is allowed on resume (and on --eval_only).
    moved = main.parse_args(["--resume", run, "--data_dir", "/new/data", "--epochs", "120"])
    assert (moved.data_dir, moved.epochs, moved.resume) == ("/new/data", 120, run)
    assert main.parse_args(["--resume", run]).data_dir == "/old/data"
    evaluated = main.parse_args(["--eval_only", run, "--data_dir", "/new/data"])
    assert (evaluated.n_z, evaluated.data_dir, evaluated.eval_only) == (8, "/new/data", run)


def test_resume_flags_that_do_not_fit_the_run_are_refused(tmp_path, capsys):
    run = _saved_run(tmp_path / "run", n_z=8)
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--resume", run, "--manifold_dims", "4", "8"])
    assert exit_info.value.code == 2
    assert "dimensions in 0..7 (--n_z 8), got [4, 8]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "code",
    [
        "import main",
        "import plot",
        "import main; main.parse_args(['--n_z', '5', '--add_noise', 'yes'])",
    ],
)
def test_flags_and_pictures_load_no_tensorflow(code):
    """`--help`, every flag error and plot.py must not pay TensorFlow's seconds of import."""
    check = f"{code}; import sys; print(sorted({{'tensorflow', 'keras'}} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=Path(main.__file__).parent, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "[]", result.stdout


def test_a_flag_error_exits_before_tensorflow_is_imported():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(Path(main.__file__)), "--n_z", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--n_z must be >= 1" in result.stderr
    assert "tensorflow" not in result.stderr.replace("--n_z must be >= 1", "")
