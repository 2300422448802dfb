"""Small helpers: atomic writes and run folders."""

from __future__ import annotations

import os
import stat

import utils


def test_atomic_write_leaves_only_the_final_file_with_a_normal_mode(tmp_path):
    target = tmp_path / "a.json"
    utils.write_json(target, {"x": 1})
    utils.write_json(target, {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert target.read_text().strip().endswith("}") and '"x": 2' in target.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.time, "strftime", lambda fmt: "20250101-000000")
    existing = utils.make_run_dir(tmp_path, ["mnist"])
    (existing / "metrics.csv").write_text("a user's results\n")
    others = [utils.make_run_dir(tmp_path, ["mnist"]) for _ in range(3)]
    assert len({existing, *others}) == 4
    assert all(folder.is_dir() and list(folder.iterdir()) == [] for folder in others)
    assert (existing / "metrics.csv").read_text() == "a user's results\n"


def test_csv_round_trip(tmp_path):
    rows = [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 1.25}]
    utils.write_csv(tmp_path / "m.csv", rows)
    assert utils.read_csv(tmp_path / "m.csv") == [
        {"epoch": "1", "loss": "2.5"},
        {"epoch": "2", "loss": "1.25"},
    ]
    assert utils.read_csv(tmp_path / "absent.csv") == []


def test_create_fresh_files_never_reuse_a_name(tmp_path):
    (tmp_path / "metrics.x.json").write_text("kept")
    made = [utils.create_fresh(tmp_path, "metrics.x", ".json", folder=False) for _ in range(2)]
    assert [p.name for p in made] == ["metrics.x_2.json", "metrics.x_3.json"]
    assert all(p.is_file() and p.read_text() == "" for p in made)
    assert (tmp_path / "metrics.x.json").read_text() == "kept"
