"""Shared fixtures: the real data loaded once, one tiny end-to-end run, spies on plot.py and
on the training chunks. The helpers that several files share are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_FLAGS, single_run_dir

import data_utils
import main
import plot
import steps

# Fixtures that train through main.py: a test that asks for one is an end-to-end test,
# and must be marked slow so that the quick loop (-m "not slow") never trains.
TRAINING_FIXTURES = {
    *("tiny_run", "three_epoch_run", "reference", "finished", "resumed"),
    *("m1", "m2_runs"),  # test_m1m2.py's
    "runs",  # test_sample.py's
}


def pytest_collection_modifyitems(config, items) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use a fixture that trains, so mark them @pytest.mark.slow: "
            + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def splits() -> data_utils.Splits:
    return data_utils.load_dataset("mnist")


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures that plot.py saves, in order, kept to be read back after saving."""
    figures = []
    real_save = plot._save_figure

    def save_and_keep(path, figure):
        real_save(path, figure)
        figures.append(figure)

    monkeypatch.setattr(plot, "_save_figure", save_and_keep)
    return figures


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


@pytest.fixture
def after_each_chunk(monkeypatch):
    """Call `hook(steps run so far)` after every real compiled chunk of training steps."""

    def install(hook) -> None:
        real_factory = steps.make_train_chunk

        def factory(*args, **kwargs):
            chunk = real_factory(*args, **kwargs)
            n_steps = 0

            def wrapped(*chunk_args):
                nonlocal n_steps
                sums, done = chunk(*chunk_args)
                n_steps += int(done)
                hook(n_steps)
                return sums, done

            return wrapped

        monkeypatch.setattr(steps, "make_train_chunk", factory)

    return install
