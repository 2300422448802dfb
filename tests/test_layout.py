"""The module layout of ../shared/DESIGN.md: each module imports only those below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

# What each program module may import from the project (DESIGN.md's table). data_utils'
# constants (image size, classes, split sizes) are facts about the data that every
# layer reads; data_utils itself imports NumPy and utils only.
ALLOWED = {
    "utils": set(),
    "data_utils": {"utils"},
    "config": {"utils", "data_utils"},
    "draws": {"data_utils"},
    "cvae": {"draws", "data_utils"},
    "steps": {"cvae", "draws", "utils"},
    "evaluate": {"config", "cvae", "draws", "data_utils", "utils"},
    "checkpoints": {"config", "cvae", "steps", "utils"},
    "features": {"config", "cvae", "data_utils", "utils"},
    "run_folder": {"config", "utils"},
    "plot": {"config", "data_utils", "utils"},
    "summaries": {"config", "data_utils", "plot", "utils"},
    "train": {
        "config",
        "checkpoints",
        "cvae",
        "data_utils",
        "draws",
        "features",
        "evaluate",
        "export",
        "plot",
        "run_folder",
        "steps",
        "stopping",
        "summaries",
        "utils",
    },
    "main": {"config", "train", "utils"},
    "stopping": {"data_utils", "utils"},
    "export": {"config", "cvae", "data_utils", "draws", "evaluate", "features", "utils"},
    "sample": {
        "checkpoints",
        "config",
        "data_utils",
        "export",
        "features",
        "plot",
        "run_folder",
        "utils",
    },
}


def project_imports(path: Path) -> set[str]:
    """The project modules that `path` imports, anywhere in it (TYPE_CHECKING included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & set(ALLOWED)


def test_every_program_module_imports_only_those_below_it():
    modules = {p.stem for p in PROJECT.glob("*.py")}
    assert modules <= set(ALLOWED), f"module(s) missing from the layout: {modules - set(ALLOWED)}"
    for name in sorted(modules):
        extra = project_imports(PROJECT / f"{name}.py") - ALLOWED[name]
        assert not extra, f"{name}.py imports {sorted(extra)}, which DESIGN.md puts above it"


def test_the_layout_has_no_import_circle():
    def visit(name: str, path: tuple[str, ...]) -> None:
        for dep in ALLOWED[name]:
            assert dep not in path, f"import circle: {' -> '.join((*path, dep))}"
            visit(dep, (*path, dep))

    for name in ALLOWED:
        visit(name, (name,))


def test_nothing_but_the_tests_imports_the_entry_script():
    scripts = [*PROJECT.glob("*.py"), *(PROJECT / "benchmarks").glob("*.py")]
    importers = [p.name for p in scripts if "main" in project_imports(p) and p.stem != "main"]
    assert importers == []


@pytest.mark.slow  # A fresh Python process each.
@pytest.mark.parametrize(
    "code",
    [
        "import main, config, data_utils",
        "import plot",
        "import main; main.parse_args(['--n_z', '5', '--add_noise', 'yes'])",
    ],
)
def test_flags_data_and_pictures_load_no_tensorflow(code):
    """Parsing flags (so `--help` and every flag error), reading data and plot.py stay
    instant: nothing behind them imports TensorFlow or Keras."""
    check = f"{code}; import sys; print(sorted({{'tensorflow', 'keras'}} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
