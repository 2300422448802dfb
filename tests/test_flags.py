"""Flags: parsing, validation and the help text."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import main
import utils
from config import Config, build_parser

FLOAT_FLAGS = [f.name for f in dataclasses.fields(Config) if f.type == "float"]


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
    "argv",
    [
        ["--n_z", "0"],
        ["--n_z", "two"],
        ["--n_hidden", "0"],
        ["--n_hidden", "500", "500"],
        ["--n_hidden", "10", "10", "10"],
        ["--keep_prob", "0"],
        ["--keep_prob", "1.5"],
        ["--epochs", "0"],
        ["--batch_size", "0"],
        ["--batch_size", "55001"],
        ["--learning_rate", "0"],
        ["--learning_rate", "-1e-3"],
        ["--lr_decay", "0"],
        ["--lr_decay", "1.01"],
        ["--train_samples", "0"],
        ["--kl_warmup", "-1"],
        ["--kl_weight", "-0.5"],
        ["--seed", "-1"],
        ["--seed", str(2**32)],
        ["--n_train", "0"],
        ["--n_train", "55001"],
        ["--dataset", "cifar10"],
        ["--binarize", "static"],
        ["--add_noise", "maybe"],
        ["--mixed_precision", "maybe"],
        ["--strategy", "horovod"],
        ["--xla", "always"],
        # nan and inf pass a plain `> 0` test: every float flag must refuse them.
        *[[f"--{name}", bad] for name in FLOAT_FLAGS for bad in ("nan", "inf")],
    ],
)
def test_out_of_range_values_are_refused_before_anything_is_made(
    argv, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, "--results_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_hidden_sizes_one_or_four():
    assert main.parse_args(["--n_hidden", "64"]).hidden_sizes == (64, 64, 64, 64)
    four = main.parse_args(["--n_hidden", "1", "2", "3", "4"])
    assert four.hidden_sizes == (1, 2, 3, 4)


def test_config_is_frozen_and_round_trips_through_json():
    config = main.parse_args(["--n_z", "5", "--n_hidden", "8", "9", "10", "11", "--seed", "3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_z = 3  # type: ignore[misc]
    assert Config.from_json(config.to_json()) == config


@pytest.mark.slow
def test_help_lists_every_flag_with_its_default():
    script = Path(main.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    for field in dataclasses.fields(Config):
        assert f"--{field.name}" in text
    assert "(default: 100)" in text and "(default: 0.6)" in text


def test_readme_documents_every_flag():
    # The first cell of each row of the README's "## Flags" table names one flag or a
    # few (`--n_z`, `--n_hidden`), each perhaps with its values (`--train_samples K`).
    readme = (Path(main.__file__).parent / "README.md").read_text()
    table = readme.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {name for cell in first_cells for name in re.findall(r"`--(\w+)", cell)}
    missing = [f.name for f in dataclasses.fields(Config) if f.name not in named]
    assert not missing, f"flags missing from the README's table: {missing}"


def _saved_run(folder, **values) -> str:
    """A folder holding just the config.json of a run with `values`: enough for parse_args."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(Config(**values).to_json()))
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


def test_resume_refuses_flags_that_contradict_the_run(tmp_path, capsys):
    run = _saved_run(tmp_path / "run", n_z=2, add_noise=True, seed=5)
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--resume", run, "--n_z", "3", "--seed", "5", "--add_noise", "no"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--n_z 3 (the run has 2)" in err and "--add_noise False (the run has True)" in err
    assert "--seed" not in err.split("contradict it:")[1]  # Agreeing flags are fine.


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1, 2]")
    for folder, says in [(tmp_path, "is it a run folder?"), (tmp_path / "broken", "cannot read")]:
        with pytest.raises(SystemExit) as exit_info:
            main.parse_args(["--resume", str(folder)])
        assert exit_info.value.code == 2
        assert says in capsys.readouterr().err


def test_eval_only_takes_the_runs_evaluation_settings_unless_given(tmp_path, capsys):
    run = _saved_run(tmp_path / "run", add_noise=True, iw_samples=5, n_eval=200)
    config = main.parse_args(["--eval_only", run])
    assert (config.add_noise, config.iw_samples, config.n_eval) == (True, 5, 200)
    assert config.eval_only == run and config.resume is None
    given = main.parse_args(["--eval_only", run, "--iw_samples", "7"])
    assert (given.iw_samples, given.n_eval) == (7, 200)
    given = main.parse_args(["--eval_only", run, "--n_eval", "9"])
    assert (given.iw_samples, given.n_eval) == (5, 9)
    resumed = main.parse_args(["--resume", run, "--iw_samples", "7", "--n_eval", "9"])
    assert (resumed.iw_samples, resumed.n_eval) == (7, 9)
    bad = [
        (["--eval_only", run, "--n_z", "5"], "drop --n_z"),
        (["--eval_only", str(tmp_path)], "no config.json"),
        (["--eval_only", run, "--resume", run], "exclude each other"),
        (["--iw_samples", "-1"], "--iw_samples must be >= 0"),
        (["--n_eval", "10001"], "--n_eval must be between 1 and 10000"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            main.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_flag_error_exits_before_tensorflow_is_imported():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(Path(main.__file__)), "--n_z", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--n_z must be >= 1" in result.stderr
    assert "tensorflow" not in result.stderr.replace("--n_z must be >= 1", "")


# --- Flags behave as their help says ---


def help_entries() -> dict[str, str]:
    """`main.py --help`'s entry of each flag, on one line: {"--n_z": "--n_z N_Z dimension..."}."""
    text = build_parser(main.DESCRIPTION).format_help()
    options = text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", options)[1:]
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


def test_help_states_each_default_once():
    entries = help_entries()
    assert set(entries) >= {f"--{f.name}" for f in dataclasses.fields(Config)}
    twice = [entry for entry in entries.values() if entry.count("default:") > 1]
    assert not twice
    assert not [entry for entry in entries.values() if "(default: None)" in entry]
    # As the flag is typed, and a flag without a default value says what its absence does.
    assert entries["--n_hidden"].endswith("(default: 500)")
    assert entries["--manifold_dims"].endswith("(default: 0 1)")
    assert entries["--n_train"].endswith("(default: all)")
    assert entries["--n_eval"].endswith("(default: all 10,000)")


@pytest.mark.parametrize(
    ("xla", "replicas", "compiled"),
    [("on", 1, True), ("auto", 1, True), ("auto", 2, False), ("off", 1, False), ("off", 2, False)],
)
def test_xla_compiles_as_its_help_says(xla, replicas, compiled):
    import train

    assert train.use_xla(Config(xla=xla), replicas) is compiled


def test_xla_on_refuses_in_one_line_a_run_it_cannot_compile():
    import train

    with pytest.raises(utils.UserError) as refused:
        train.use_xla(Config(xla="on", strategy="mirrored"), replicas=2)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--xla on:") and "2 replicas" in message and "--xla auto" in message


def test_mixed_precision_without_a_gpu_says_in_one_line_that_it_is_slower(monkeypatch):
    import tensorflow as tf

    import train

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda device_type=None: [])
    note = train.precision_note(Config(mixed_precision=True))
    assert "\n" not in note and "--mixed_precision" in note and "slower" in note
    assert train.precision_note(Config()) is None
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda device_type=None: ["GPU:0"])
    assert train.precision_note(Config(mixed_precision=True)) is None
