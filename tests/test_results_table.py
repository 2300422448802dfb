"""benchmarks/results_table.py: the README's tables come from the runs' files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import results_table  # benchmarks/ is on the path (pytest.ini's pythonpath).

from config import Config


def fake_run(folder: Path, add_noise: bool, scores: dict[str, float]) -> Path:
    """A run folder with a real config.json and a metrics.json of the given scores."""
    folder.mkdir()
    config = Config(add_noise=add_noise, n_z=5, epochs=7)
    (folder / "config.json").write_text(json.dumps(config.to_json()))
    by_input = {
        name: {
            "test_loss": loss,
            "test_nll_x_given_y": loss - 1,
            "test_nll_x": loss - 0.5,
            "test_classifier_error": 12.5,
        }
        for name, loss in scores.items()
    }
    headline = min(scores, key=scores.get)
    metrics = {
        "epochs": 7, "n_eval": 100, "iw_samples": 3, "train_seconds": 90.0,
        **by_input[headline], "test_encoder_input": headline,
        "by_encoder_input": by_input if add_noise else None,
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_rows_come_from_the_runs_files(tmp_path, capsys):
    plain = fake_run(tmp_path / "a", False, {"clean": 100.0})
    noisy = fake_run(tmp_path / "b", True, {"clean": 120.0, "noised": 110.0})
    assert results_table.main([str(plain), str(noisy), str(tmp_path / "missing")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # Header, rule, one row per run.
    assert "| `--n_z 5 --epochs 7` | 7 | 1.5 min | 100 | 3 | clean | 100.00 | 99.00" in lines[2]
    assert (
        "--add_noise True" in lines[3]
        and "| noised | 110.00 | 109.00 | 109.50 | 12.50 |" in lines[3]
    )

    assert results_table.main(["--by_encoder_input", str(noisy)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[5] for row in rows] == ["clean", "noised"]
    assert "| 120.00 | 119.00 | 119.50 |" in rows[0]


def test_no_finished_run_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        results_table.main([str(tmp_path)])
    assert exit_info.value.code == 2


def test_denoising_table_of_a_run(tmp_path, capsys):
    run = fake_run(tmp_path / "a", True, {"clean": 120.0, "noised": 110.0})
    metrics = json.loads((run / "metrics.json").read_text())
    for i, name in enumerate(("noised", "median", "cvae")):
        metrics[f"denoise_psnr_{name}"], metrics[f"denoise_bce_{name}"] = 9.0 + i, 1.5 - i / 2
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert results_table.main(["--denoising", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        "| noised input | 9.00 | 1.500 |",
        "| 3×3 median filter | 10.00 | 1.000 |",
        "| CVAE restoration (true label) | 11.00 | 0.500 |",
    ]
    plain = fake_run(tmp_path / "b", False, {"clean": 100.0})
    with pytest.raises(SystemExit):
        results_table.main(["--denoising", str(plain)])

    # Several runs: a row each, the three PSNRs and the CVAE's BCE.
    other = fake_run(tmp_path / "c", True, {"clean": 100.0, "noised": 90.0})
    (other / "metrics.json").write_text(json.dumps({**metrics, "denoise_psnr_cvae": 18.25}))
    capsys.readouterr()
    assert results_table.main(["--denoising", str(run), str(other)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[4:] for row in rows] == [
        ["9.000", "10.000", "11.000", "0.500 |"],
        ["9.000", "10.000", "18.250", "0.500 |"],
    ]
    with pytest.raises(SystemExit):
        results_table.main(["--denoising", str(run), str(plain)])


def test_the_command_line_shows_every_learning_flag_and_the_literature_rows(tmp_path, capsys):
    run = tmp_path / "iw"
    run.mkdir()
    config = Config(
        binarize="dynamic", n_z=50, keep_prob=1.0, learning_rate=1e-3, lr_decay=0.985,
        train_samples=5, kl_warmup=10, n_hidden=(300, 200, 200, 300), iw_samples=1000,
    )  # fmt: skip
    (run / "config.json").write_text(json.dumps(config.to_json()))
    scores = {"test_loss": 90.0, "test_nll_x_given_y": 82.5, "test_nll_x": 84.5}
    metrics = {"epochs": 100, "n_eval": 10000, "iw_samples": 1000, "train_seconds": 600.0}
    (run / "metrics.json").write_text(
        json.dumps({**metrics, **scores, "test_classifier_error": 1.2})
    )
    assert results_table.main(["--literature", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(
        "| `--binarize dynamic --n_z 50 --n_hidden 300 200 200 300 --keep_prob 1.0 "
        "--learning_rate 0.001 --lr_decay 0.985 --train_samples 5 --kl_warmup 10` | 100 | "
        "10.0 min | 10000 | 1000 | clean | 90.00 | 82.50 | 84.50 | 1.20 |"
    ), lines[2]
    published = [line.split(" | ")[8] for line in lines[3:]]
    assert published == ["86.76", "84.78", "82.90"]


def test_an_m2_run_adds_the_q_error_column(tmp_path, capsys):
    plain = fake_run(tmp_path / "a", False, {"clean": 100.0})
    m2 = fake_run(tmp_path / "b", False, {"clean": 105.0})
    metrics = json.loads((m2 / "metrics.json").read_text())
    (m2 / "metrics.json").write_text(json.dumps({**metrics, "test_q_error": 10.3}))
    assert results_table.main([str(plain), str(m2)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| classifier error (%) | q(y\\|x) error (%) |"), lines[0]
    assert lines[2].endswith("| 12.50 | – |") and lines[3].endswith("| 12.50 | 10.30 |")


def test_results_table_adds_the_q_error_column_when_a_run_has_it(tmp_path):
    def fake(name: str, config: Config, extra: dict) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config.to_json()))
        metrics = {
            "epochs": 3, "n_eval": 100, "iw_samples": 2, "train_seconds": 60.0,
            "test_loss": 100.0, "test_nll_x_given_y": 99.0, "test_nll_x": 98.0,
            "test_classifier_error": 20.0, **extra,
        }  # fmt: skip
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return folder

    plain = fake("plain", Config(), {})
    m2 = fake("m2", Config(n_labeled=100), {"test_q_error": 11.5})
    assert "q(y" not in results_table.table([plain])
    lines = results_table.table([plain, m2], literature=True).splitlines()
    assert lines[0].endswith("| q(y\\|x) error (%) |")
    assert lines[2].endswith("| 20.00 | – |") and "--n_labeled 100" in lines[3]
    assert lines[3].endswith("| 20.00 | 11.50 |")
    cells = [line.replace("\\|", "").count("|") for line in lines]  # "\|" is in a cell.
    assert len(set(cells)) == 1, cells


def test_semi_supervised_rows_stand_beside_kingma_et_al(tmp_path, capsys):
    runs = []
    for name, features, labels, error in (("m2", None, 600, 4.5), ("m1m2", "/x/m1run", 100, 3.2)):
        folder = tmp_path / name
        folder.mkdir()
        config = Config(n_labeled=labels, features=features).to_json()
        (folder / "config.json").write_text(json.dumps(config))
        metrics = {"epochs": 9, "n_eval": 10000, "train_seconds": 60.0, "test_q_error": error}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        runs.append(str(folder))
    assert results_table.main(["--semi_supervised", *runs]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    # Sorted by labels; the M1 run by its folder's name; the paper's figure of that model.
    assert rows[0] == (
        "| 100 | M1+M2 | `--n_labeled 100 --features m1run` | 9 | 1.0 min | 10000 | 3.20 "
        "| 3.33 (± 0.14) |"
    )
    assert rows[1].startswith("| 600 | M2 | `--n_labeled 600` |") and "| 4.94 (± 0.13) |" in rows[1]
