"""Compare two run folders of main.py: do they hold the same results?

    python benchmarks/compare_runs.py RUN_A RUN_B

For checking that a refactor leaves behaviour unchanged: run the same command
before and after it, then compare the two run folders. Compared:

- metrics.csv: same columns in the same order, same rows, each value the same
  text, apart from the wall-clock columns (TIMING_COLUMNS);
- metrics.json: same keys, equal values at every depth, apart from the
  timing keys (any key in TIMING_COLUMNS or ending in "_seconds");
- config.json: same keys and values apart from CONFIG_IGNORED. Library
  versions are compared: a change of version invalidates a byte comparison;
- every PNG and GIF, recursively: byte-identical. Files are matched by their
  path relative to the run folder, and those left over by their file name
  alone, when that name is unique among the left-overs of both folders (so
  that per-epoch canvases moved into a subfolder are still found); the
  summary says how many were matched each way.

Ignored: the timings above; config.json's CONFIG_IGNORED; checkpoints/
(TensorFlow's files, whose variable paths a restructuring may rename), tb/
(TensorBoard events hold wall times) and any other file. Prints one line per
difference and a summary line; exits 0 when the runs are identical, 1
otherwise, 2 on bad arguments. Standard library only, no TensorFlow.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

TIMING_COLUMNS = frozenset({"seconds"})  # metrics.csv: the epoch's wall time.
TIMING_SUFFIX = "_seconds"  # metrics.json: eval_seconds, train_seconds.
# results_dir: where the run was written, differs by design. resume and
# eval_only hold run-folder paths (null in a fresh run).
CONFIG_IGNORED = frozenset({"results_dir", "resume", "eval_only"})
PICTURES = (".png", ".gif")


def is_timing(key: str) -> bool:
    """Whether a metrics key or column is a wall-clock time."""
    return key in TIMING_COLUMNS or key.endswith(TIMING_SUFFIX)


def diff_values(a: Any, b: Any, where: str) -> list[str]:
    """The differences of two JSON values, recursively, timing keys skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in A" for k in a if k not in b and not is_timing(k)]
        out += [f"{where}.{k}: only in B" for k in b if k not in a and not is_timing(k)]
        for key in (k for k in a if k in b and not is_timing(k)):
            out += diff_values(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in diff_values(x, y, f"{where}[{i}]")
        ]
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    if type(a) is not type(b) or (a != b and not both_nan):
        return [f"{where}: {a!r} != {b!r}"]
    return []


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def compare_json(a: Path, b: Path, name: str, ignored: frozenset[str]) -> list[str]:
    """metrics.json or config.json: equal apart from timing keys and `ignored` top-level keys."""
    if not (a / name).is_file() or not (b / name).is_file():
        return [f"{name}: missing in {'A' if not (a / name).is_file() else 'B'}"]
    left, right = read_json(a / name), read_json(b / name)
    for data in (left, right):
        for key in ignored:
            data.pop(key, None)
    return diff_values(left, right, name)


def compare_csv(a: Path, b: Path) -> list[str]:
    """metrics.csv: same header and cells as text, the timing columns left out."""
    if not (a / "metrics.csv").is_file() or not (b / "metrics.csv").is_file():
        return [f"metrics.csv: missing in {'A' if not (a / 'metrics.csv').is_file() else 'B'}"]
    tables = []
    for run in (a, b):
        with (run / "metrics.csv").open(newline="") as handle:
            rows = list(csv.reader(handle))
        keep = [i for i, column in enumerate(rows[0]) if not is_timing(column)] if rows else []
        tables.append([[row[i] if i < len(row) else "" for i in keep] for row in rows])
    left, right = tables
    if left[:1] != right[:1]:
        return [f"metrics.csv: columns {left[:1]} != {right[:1]}"]
    out: list[str] = []
    if len(left) != len(right):
        out.append(f"metrics.csv: {len(left) - 1} rows != {len(right) - 1} rows")
    header = left[0] if left else []
    for number, (x, y) in enumerate(zip(left[1:], right[1:], strict=False), start=1):
        out += [
            f"metrics.csv: row {number} {column}: {p} != {q}"
            for column, p, q in zip(header, x, y, strict=True)
            if p != q
        ]
    return out


def pictures(run: Path) -> dict[str, Path]:
    """Every PNG and GIF under `run` (checkpoints/ and tb/ aside), by relative path."""
    return {
        path.relative_to(run).as_posix(): path
        for path in sorted(run.rglob("*"))
        if path.suffix.lower() in PICTURES
        and path.is_file()
        and path.relative_to(run).parts[0] not in ("checkpoints", "tb")
    }


def compare_pictures(a: Path, b: Path) -> tuple[list[str], Counter[str]]:
    """Byte comparison of the PNGs and GIFs; the differences and how many were matched how."""
    left, right = pictures(a), pictures(b)
    pairs = [(name, left[name], right[name], "path") for name in left if name in right]
    rest_a = {k: v for k, v in left.items() if k not in right}
    rest_b = {k: v for k, v in right.items() if k not in left}
    names_a = Counter(Path(k).name for k in rest_a)
    names_b = Counter(Path(k).name for k in rest_b)
    by_name_b = {Path(k).name: (k, v) for k, v in rest_b.items()}
    for key, path in list(rest_a.items()):
        name = Path(key).name
        if names_a[name] == 1 and names_b[name] == 1:
            key_b, path_b = by_name_b[name]
            pairs.append((f"{key} ~ {key_b}", path, path_b, "file name"))
            del rest_a[key], rest_b[key_b]
    out = [f"{key}: only in A" for key in rest_a] + [f"{key}: only in B" for key in rest_b]
    out += [
        f"{label}: bytes differ" for label, p, q, _ in pairs if p.read_bytes() != q.read_bytes()
    ]
    return out, Counter(how for *_, how in pairs)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(Path(arg).is_dir() for arg in argv):
        print(__doc__.split("\n\n")[1] if __doc__ else "", file=sys.stderr)
        print("error: give two run folders", file=sys.stderr)
        return 2
    a, b = (Path(arg) for arg in argv)
    differences = compare_csv(a, b)
    differences += compare_json(a, b, "metrics.json", frozenset())
    differences += compare_json(a, b, "config.json", CONFIG_IGNORED)
    picture_differences, matched = compare_pictures(a, b)
    differences += picture_differences
    for line in differences:
        print(line)
    how = f"{matched['path']} by path, {matched['file name']} by file name"
    verdict = "IDENTICAL" if not differences else f"DIFFERENT ({len(differences)} differences)"
    total = sum(matched.values())
    print(f"{verdict}: metrics.csv, metrics.json, config.json; {total} PNG/GIF, {how}")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
