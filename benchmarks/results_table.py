"""Print a Markdown table of finished runs, from their config.json and metrics.json.

    python benchmarks/results_table.py results/*                       # one row per run
    python benchmarks/results_table.py --by_encoder_input results/*    # denoising runs: a row
                                                                       # per encoder input
    python benchmarks/results_table.py --denoising RUN_DIR             # its PSNR and BCE
    python benchmarks/results_table.py --denoising RUN_DIR RUN_DIR ... # a row per run
    python benchmarks/results_table.py --literature RUN_DIR ...        # beside Burda et al.
    python benchmarks/results_table.py --semi_supervised RUN_DIR ...   # M2, M1+M2 beside
                                                                       # Kingma et al.

RESULTS.md's tables of runs are made with it, never typed by hand. A run with M2's
test_q_error (--n_labeled) adds a q(y|x) error column to its table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config  # For its defaults; imports no TensorFlow.

# (column title, metrics.json key, format)
METRIC_COLUMNS = (
    ("test −ELBO", "test_loss", "{:.2f}"),
    ("−log p(x\\|y)", "test_nll_x_given_y", "{:.2f}"),
    ("−log p(x)", "test_nll_x", "{:.2f}"),
    ("classifier error (%)", "test_classifier_error", "{:.2f}"),
)
# Shown only when a run of the table has it (M2, --n_labeled).
Q_ERROR_COLUMN = ("q(y\\|x) error (%)", "test_q_error", "{:.2f}")


# Flags that change where a run goes, what it draws or how it is evaluated, not what
# it learns: left out of the table's command line.
NOT_SHOWN = {
    "results_dir", "resume", "eval_only", "data_dir", "plot_every", "z_range",
    "manifold_dims", "iw_samples", "n_eval", "strategy", "xla",
}  # fmt: skip

# Published test −log p(x) on dynamically binarised MNIST, all 10,000 test images at
# K = 5,000: Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders",
# Table 1 (3,280 passes over the data). (title, −log p(x))
BURDA_2015 = (
    ("Burda et al. 2015, Table 1: VAE, one stochastic layer (k = 1)", 86.76),
    ("Burda et al. 2015, Table 1: IWAE, one stochastic layer, k = 50", 84.78),
    ("Burda et al. 2015, Table 1: IWAE, two stochastic layers, k = 50", 82.90),
)


# Published test error (%) of q(y|x) on MNIST, by labels: Kingma, Rezende, Mohamed &
# Welling 2014, "Semi-supervised learning with deep generative models", Table 1.
KINGMA_2014 = {
    "M2": {100: "11.97 (± 1.71)", 600: "4.94 (± 0.13)", 1000: "3.60 (± 0.56)"},
    "M1+M2": {100: "3.33 (± 0.14)", 600: "2.59 (± 0.05)", 1000: "2.40 (± 0.02)"},
}


def flags_of(config: dict) -> str:
    """The flags that set what the run learned, as a command line gives them (defaults left out)."""
    defaults = Config().to_json()
    flags = []
    for name, value in config.items():
        if name in NOT_SHOWN or name not in defaults or _same(value, defaults[name]):
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        if name == "features":  # An M1 run: its folder's name, not this machine's path.
            shown = Path(value).name
        flags.append(f"--{name} {shown}")
    return " ".join(flags) or "(the defaults)"


def _same(value, default) -> bool:
    if isinstance(value, list | tuple):
        return list(value) == list(default)
    return value == default


def cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def rows_of(
    run_dir: Path, by_encoder_input: bool, columns: Sequence[tuple] = METRIC_COLUMNS
) -> list[list[str]]:
    """The table rows of one run: one, or one per encoder input of a denoising run; a
    metric the run lacks (test_q_error of a run without --n_labeled) is a dash."""
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    common = [
        f"`{flags_of(config)}`",
        str(metrics["epochs"]),
        f"{metrics['train_seconds'] / 60:.1f} min",
        str(metrics["n_eval"]),
        str(metrics["iw_samples"]),
    ]
    inputs = metrics.get("by_encoder_input") if by_encoder_input else None
    if not inputs:
        chosen = metrics.get("test_encoder_input", "clean")
        return [[*common, chosen, *(cell(metrics.get(k), f) for _, k, f in columns)]]
    return [
        [*common, name, *(cell(scored.get(k), f) for _, k, f in columns)]
        for name, scored in inputs.items()
    ]


def literature_rows(extra_columns: int = 0) -> list[list[str]]:
    """Burda et al.'s published rows, in the table's columns."""
    return [
        [title, "3280", "–", "10000", "5000", "x", "–", "–", f"{nll:.2f}", "–"]
        + ["–"] * extra_columns
        for title, nll in BURDA_2015
    ]


def has_q_error(run_dir: Path) -> bool:
    """Whether the run's metrics.json holds M2's test_q_error (--n_labeled)."""
    return "test_q_error" in json.loads((run_dir / "metrics.json").read_text())


def table(
    run_dirs: Sequence[Path], by_encoder_input: bool = False, literature: bool = False
) -> str:
    columns = METRIC_COLUMNS
    if any(has_q_error(run_dir) for run_dir in run_dirs):
        columns = (*METRIC_COLUMNS, Q_ERROR_COLUMN)
    header = ["run (flags)", "epochs", "training", "n_eval", "K", "encoder input"]
    header += [title for title, _, _ in columns]
    rows = [row for run_dir in run_dirs for row in rows_of(run_dir, by_encoder_input, columns)]
    if literature:
        rows += literature_rows(len(columns) - len(METRIC_COLUMNS))
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


DENOISERS = (
    ("noised input", "noised"),
    ("3×3 median filter", "median"),
    ("CVAE restoration (true label)", "cvae"),
)


def denoising_table(run_dir: Path) -> str:
    """PSNR and BCE against the clean test images of a denoising run's three candidates."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("denoise_psnr_cvae") is None:
        raise ValueError(f"{run_dir} is not a denoising run (no denoise_* metrics)")
    lines = ["| | PSNR (dB) | BCE (nats/pixel) |", "| --- | --- | --- |"]
    for title, name in DENOISERS:
        psnr, bce = metrics[f"denoise_psnr_{name}"], metrics[f"denoise_bce_{name}"]
        lines.append(f"| {title} | {psnr:.2f} | {bce:.3f} |")
    return "\n".join(lines)


def denoising_runs_table(run_dirs: Sequence[Path]) -> str:
    """A row per denoising run: its flags, training and the PSNR of the three candidates."""
    header = ["run (flags)", "epochs", "training", "n_eval"]
    header += [f"PSNR (dB): {title}" for title, _ in DENOISERS] + ["BCE (nats/pixel): CVAE"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics.get("denoise_psnr_cvae") is None:
            raise ValueError(f"{run_dir} is not a denoising run (no denoise_* metrics)")
        row = [
            f"`{flags_of(config)}`", str(metrics["epochs"]),
            f"{metrics['train_seconds'] / 60:.1f} min", str(metrics["n_eval"]),
        ]  # fmt: skip
        # Three decimals: a target such as 18.0 dB must not be met by rounding.
        row += [f"{metrics[f'denoise_psnr_{name}']:.3f}" for _, name in DENOISERS]
        row.append(f"{metrics['denoise_bce_cvae']:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def semi_supervised_table(run_dirs: Sequence[Path]) -> str:
    """A row per M2 or M1+M2 run (--n_labeled): its model, labels, flags and test error of
    q(y|x), beside Kingma et al.'s for the same model and labels."""
    header = ["labels", "model", "run (flags)", "epochs", "training", "n_eval"]
    header += ["q(y\\|x) error (%)", "Kingma et al. 2014, Table 1 (%)"]
    rows = []
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if "test_q_error" not in metrics:
            raise ValueError(f"{run_dir} is not a semi-supervised run (no test_q_error)")
        model = "M1+M2" if config.get("features") else "M2"
        labels = config["n_labeled"]
        rows.append([
            str(labels), model, f"`{flags_of(config)}`", str(metrics["epochs"]),
            f"{metrics['train_seconds'] / 60:.1f} min", str(metrics["n_eval"]),
            f"{metrics['test_q_error']:.2f}", KINGMA_2014[model].get(labels, "–"),
        ])  # fmt: skip
    rows.sort(key=lambda row: (int(row[0]), row[1]))
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument(
        "--by_encoder_input",
        action="store_true",
        help="a row per encoder input (clean, noised) of each denoising run",
    )
    parser.add_argument(
        "--denoising",
        action="store_true",
        help="the denoising table of one run instead, or a row per run of several",
    )
    parser.add_argument(
        "--semi_supervised",
        action="store_true",
        help="a row per M2 or M1+M2 run beside Kingma et al. 2014's Table 1",
    )
    parser.add_argument(
        "--literature",
        action="store_true",
        help="add Burda et al. 2015's published -log p(x) on binarised MNIST below the runs",
    )
    args = parser.parse_args(argv)
    finished = [run for run in args.runs if (run / "metrics.json").is_file()]
    for run in sorted(set(args.runs) - set(finished)):
        print(f"skipped {run}: no metrics.json (not a finished run folder)", file=sys.stderr)
    if not finished:
        parser.error("no finished run folder among the arguments")
    if args.denoising:
        try:
            one = len(finished) == 1
            print(denoising_table(finished[0]) if one else denoising_runs_table(finished))
        except ValueError as err:
            parser.error(str(err))
        return 0
    if args.semi_supervised:
        try:
            print(semi_supervised_table(finished))
        except ValueError as err:
            parser.error(str(err))
        return 0
    print(table(finished, args.by_encoder_input, args.literature))
    return 0


if __name__ == "__main__":
    sys.exit(main())
