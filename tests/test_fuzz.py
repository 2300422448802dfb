"""Random inputs to the flag parser and the IDX reader: only clean errors, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data_utils
import main
from config import Config

FLAGS = [f"--{f.name}" for f in dataclasses.fields(Config)]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["True", "no", "maybe", "", "nan", "-inf", "1e400", "mnist", "dynamic"]),
    st.text(max_size=12),
)
# Flags (some abbreviated or misspelt) and values in any order.
TOKENS = st.one_of(
    st.sampled_from(FLAGS),
    st.sampled_from(FLAGS).map(lambda flag: flag[: max(3, len(flag) - 2)]),
    st.sampled_from(["--nz", "-x", "--", "--help=no"]),
    VALUES,
)


# derandomize: the same examples on every run (a failure repeats, CI is repeatable);
# no example database, which would be written into the working directory.
FIXED = dict(derandomize=True, database=None, deadline=None)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], **FIXED)
@given(st.lists(TOKENS, max_size=8))
def test_flag_parser_returns_a_config_or_exits_cleanly(argv):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            config = main.parse_args(argv)
        except SystemExit as exit_info:
            help_asked = any(token in ("-h", "--help") for token in argv)
            assert exit_info.code == 2 or (help_asked and exit_info.code == 0), exit_info.code
            return
    assert isinstance(config, Config)


def _idx_like() -> st.SearchStrategy[bytes]:
    """Bytes that often get past the magic number, so that the deeper checks are hit."""
    header = st.tuples(st.sampled_from([0, 8, 9]), st.integers(0, 4)).map(
        lambda t: bytes([0, 0, t[0], t[1]])
    )
    dims = st.lists(st.integers(0, 2**32 - 1), max_size=4).map(
        lambda d: struct.pack(f">{len(d)}I", *d)
    )
    small = st.lists(st.integers(0, 6), min_size=1, max_size=4).map(
        lambda d: bytes([0, 0, 8, len(d)]) + struct.pack(f">{len(d)}I", *d)
    )
    return st.one_of(
        st.binary(max_size=64),
        st.tuples(header, dims, st.binary(max_size=64)).map(b"".join),
        st.tuples(small, st.binary(max_size=300)).map(b"".join),
    )


@settings(max_examples=500, **FIXED)
@given(content=_idx_like(), compress=st.sampled_from(["raw", "gzip", "cut gzip"]))
def test_idx_reader_returns_an_array_or_a_data_error(tmp_path_factory, content, compress):
    if compress != "raw":
        content = gzip.compress(content)
        if compress == "cut gzip":
            content = content[: len(content) // 2]
    path = tmp_path_factory.getbasetemp() / "fuzz-idx1-ubyte.gz"
    path.write_bytes(content)
    try:
        data_utils.read_idx(path, expected_sha256="0" * 64)
    except data_utils.DataError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:  # No content hashes to zeros: accepting it would be a bug.
        raise AssertionError("a file with a wrong checksum was accepted")
    try:
        decompressed = data_utils.read_idx_bytes(path)
        array = data_utils.parse_idx(decompressed)
    except data_utils.DataError:
        return
    assert array.dtype.name == "uint8"
    assert array.size == len(decompressed) - (4 + 4 * array.ndim)  # Every byte after the header.
