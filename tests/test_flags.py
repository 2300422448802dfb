"""Flags: parsing, validation and the help text."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import main


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
