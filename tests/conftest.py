"""Shared fixtures: the real data loaded once, and one tiny end-to-end run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest

import data_utils
import main

# A few hundred images and two epochs: enough to exercise every code path of
# the real script in seconds on a CPU.
# The final evaluation on 200 test images with K=5 keeps it to seconds as well.
TINY_FLAGS = [
    *("--n_train", "300", "--epochs", "2", "--batch_size", "64", "--seed", "3"),
    *("--n_eval", "200", "--iw_samples", "5"),
]


@pytest.fixture(scope="session")
def splits() -> data_utils.Splits:
    return data_utils.load_dataset("mnist")


def single_run_dir(results_dir: Path) -> Path:
    """The one run folder that a run created under `results_dir`."""
    runs = [p for p in results_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Run the real main() once with noise on and canvases every epoch; tests read (never
    modify) its folder."""
    results = tmp_path_factory.mktemp("results")
    code = main.main(
        [*TINY_FLAGS, "--add_noise", "True", "--plot_every", "1", "--results_dir", str(results)]
    )
    assert code == 0
    return single_run_dir(results)
