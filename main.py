"""Train a conditional VAE on MNIST: `python main.py --add_noise True`.

A TensorFlow 2 re-implementation of a TensorFlow 1.4 CVAE. Each run gets its
own folder under results/ with its config, per-epoch metrics, checkpoints and
canvases; `--resume RUN_DIR` continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import utils
from config import EVAL_ONLY_OVERRIDABLE, RESUME_OVERRIDABLE, TUPLE_FIELDS, Config, build_parser

DESCRIPTION = __doc__.splitlines()[0]
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as shells report a SIGTERM.


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Flags -> validated Config; bad values exit with an argparse error (code 2).

    With --resume or --eval_only the flags are first merged with the run's
    saved config, and only then validated: a flag's valid values may depend on
    the run (--manifold_dims on its --n_z).
    """
    parser = build_parser(DESCRIPTION)
    args = vars(parser.parse_args(argv))
    explicit = set(vars(build_parser(DESCRIPTION, suppress_defaults=True).parse_args(argv)))
    for name in TUPLE_FIELDS:
        args[name] = tuple(args[name])
    # Both at once: left to Config, which refuses the pair.
    if args["eval_only"] is not None and args["resume"] is None:
        args = _eval_only_values(args, explicit, parser)
    elif args["resume"] is not None and args["eval_only"] is None:
        args = _resumed_values(args, explicit, parser)
    try:
        return Config(**args)
    except ValueError as err:
        parser.error(str(err))


def _saved_config(run_dir: str, flag: str, parser: argparse.ArgumentParser) -> Config:
    """The Config saved in `run_dir`/config.json; a parser error names `flag` if unreadable."""
    path = Path(run_dir) / utils.CONFIG_FILE
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("it does not hold a JSON object")
        return Config.from_json(values)
    except FileNotFoundError:
        parser.error(f"{flag} {run_dir}: no config.json there; is it a run folder?")
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"{flag} {run_dir}: cannot read {path}: {err}")


def _eval_only_values(args: dict, explicit: set, parser: argparse.ArgumentParser) -> dict:
    """The run's saved config (its own --iw_samples and --n_eval too), with the flags given."""
    others = sorted(explicit - set(EVAL_ONLY_OVERRIDABLE))
    if others:
        parser.error(
            "--eval_only evaluates the run with its own config; drop "
            + ", ".join(f"--{name}" for name in others)
            + " (only --iw_samples, --n_eval and --data_dir may change)."
        )
    saved = _saved_config(args["eval_only"], "--eval_only", parser).to_json()
    given = {name: args[name] for name in EVAL_ONLY_OVERRIDABLE if name in explicit}
    return {**saved, **given, "resume": None, "eval_only": args["eval_only"]}


def _resumed_values(args: dict, explicit: set, parser: argparse.ArgumentParser) -> dict:
    """The saved config of the run to resume, with the flags of RESUME_OVERRIDABLE given."""
    saved = _saved_config(args["resume"], "--resume", parser).to_json()
    clashes = [
        f"--{name} {_shown(args[name])} (the run has {_shown(saved[name])})"
        for name in sorted(explicit)
        if name not in RESUME_OVERRIDABLE and args[name] != saved[name]
    ]
    if clashes:
        parser.error(
            "--resume uses the run's own config; these flags contradict it: "
            + ", ".join(clashes)
            + ". Drop them, or start a new run."
        )
    overrides = {name: args[name] for name in explicit if name in RESUME_OVERRIDABLE}
    return {**saved, **overrides, "resume": args["resume"]}


def _shown(value: object) -> object:
    """A flag's value as the user typed it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


class Terminated(KeyboardInterrupt):
    """A SIGTERM outside the training loop, which handles its own (train.stop_on_signals)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the process exit code."""
    config = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return _train_or_evaluate(config)
    except KeyboardInterrupt as err:
        if config.eval_only is not None:
            message = f"Interrupted: {config.eval_only}/metrics.json was not (re)written."
        else:
            message = (
                "Interrupted before a checkpoint could be saved; `python main.py --resume "
                "RUN_FOLDER` continues from the run's last checkpoint, if it has one."
            )
        print(f"\n{message}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else utils.EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train_or_evaluate(config: Config) -> int:
    """The run that `config` asks for; a UserError becomes one line and exit code 1."""
    import train  # Only now: the flags are good, and TensorFlow is needed.

    try:
        if config.eval_only is not None:
            return train.evaluate_only(config)
        return train.run(config)
    except utils.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _line_buffered_stdout() -> None:
    """Send each line to a log file as it is printed: Python buffers a file's output in
    blocks, which would hold back epoch lines for minutes and misorder them with stderr's."""
    if not utils.interactive() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


if __name__ == "__main__":
    _line_buffered_stdout()
    sys.exit(main())
