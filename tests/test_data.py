"""Data loading, verification, download and splits."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import stat
import threading
import urllib.request

import numpy as np
import pytest

import data_utils
import utils

SHIPPED = data_utils.DATASETS["mnist"].default_dir


def test_splits_are_the_originals(splits):
    assert splits.train_images.shape == (55_000, 784) and splits.train_images.dtype == np.uint8
    assert splits.valid_images.shape == (5_000, 784)
    assert splits.test_images.shape == (10_000, 784)
    assert splits.train_images.min() == 0 and splits.train_images.max() == 255
    # Facts of the verified copy (data/mnist/README.md): the file's first labels, with
    # which the validation split starts. As in the original (README, "Data"): the first
    # 5,000 images of the training file validate, the last 55,000 train, images and
    # labels split alike.
    np.testing.assert_array_equal(splits.valid_labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    labels = data_utils.read_idx(SHIPPED / data_utils.FILE_NAMES["train_labels"])
    images = data_utils.read_idx(SHIPPED / data_utils.FILE_NAMES["train_images"])
    np.testing.assert_array_equal(splits.valid_labels, labels[:5_000])
    np.testing.assert_array_equal(splits.train_labels, labels[5_000:])
    np.testing.assert_array_equal(splits.valid_images, images[:5_000].reshape(5_000, -1))
    np.testing.assert_array_equal(splits.train_images, images[5_000:].reshape(55_000, -1))
    all_train = np.concatenate([splits.train_labels, splits.valid_labels])
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    np.testing.assert_array_equal(np.bincount(all_train), counts)
    np.testing.assert_array_equal(
        np.bincount(splits.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    pixels = data_utils.scale(np.concatenate([splits.train_images, splits.valid_images]))
    np.testing.assert_allclose(pixels.mean(), 0.13066, atol=5e-5)
    np.testing.assert_allclose(pixels.std(), 0.30811, atol=5e-5)


def test_idx_reads_gzip_and_raw_alike(tmp_path):
    gz = SHIPPED / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    sha = data_utils.DATASETS["mnist"].sha256["test_labels"]
    np.testing.assert_array_equal(data_utils.read_idx(gz, sha), data_utils.read_idx(raw, sha))


def test_parse_idx_by_hand():
    content = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(data_utils.parse_idx(content), [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(data_utils.DataError, match="magic"):
        data_utils.parse_idx(bytes([0, 0, 9, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(data_utils.DataError, match="damaged"):
        data_utils.parse_idx(content[:-1])


def _copy_mnist(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(SHIPPED, folder)
    return folder


def test_checksum_refuses_a_corrupted_copy(tmp_path):
    folder = _copy_mnist(tmp_path)
    labels = folder / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # One label changed, the format still valid.
    labels.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(data_utils.DataError, match="checksum mismatch") as err:
        data_utils.load_dataset("mnist", folder)
    assert "train-labels-idx1-ubyte.gz" in str(err.value) and "--data_dir" in str(err.value)


def test_truncated_gzip_is_refused(tmp_path):
    folder = _copy_mnist(tmp_path)
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(data_utils.DataError, match="truncated or corrupt"):
        data_utils.load_dataset("mnist", folder)


def test_missing_files_offline_name_the_folder_files_and_flag(tmp_path, monkeypatch):
    # A mirror nobody listens on stands in for a machine without internet.
    spec = data_utils.DATASETS["mnist"]
    monkeypatch.setitem(
        data_utils.DATASETS,
        "mnist",
        data_utils.DatasetSpec(**{**spec.__dict__, "mirrors": ("http://127.0.0.1:9/",)}),
    )
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(data_utils.DataError) as err:
        data_utils.load_dataset("mnist", folder)
    message = str(err.value)
    assert str(folder) in message and "--data_dir" in message
    assert all(name in message for name in data_utils.FILE_NAMES.values())
    assert list(folder.iterdir()) == []  # No partial download left behind.


def test_a_download_lands_whole_verified_and_readable(tmp_path, monkeypatch):
    # A file:// mirror (the shipped copy) stands in for the official server; the
    # shipped gzips are not the official bytes, so their own md5s stand in too.
    spec = data_utils.DATASETS["mnist"]
    mirror = SHIPPED.resolve().as_uri() + "/"
    md5 = {
        key: hashlib.md5((SHIPPED / name).read_bytes()).hexdigest()
        for key, name in data_utils.FILE_NAMES.items()
    }
    monkeypatch.setitem(
        data_utils.DATASETS,
        "mnist",
        data_utils.DatasetSpec(**{**spec.__dict__, "mirrors": (mirror,), "md5_gz": md5}),
    )
    folder = tmp_path / "mnist"
    data_utils.download("mnist", folder)
    names = sorted(data_utils.FILE_NAMES.values())
    assert sorted(p.name for p in folder.iterdir()) == names  # No temporary file left.
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        path = folder / name
        assert path.read_bytes() == (SHIPPED / name).read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # Not private (0600).
    splits = data_utils.load_dataset("mnist", folder)
    assert splits.train_images.shape == (55_000, 784)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder's files; records (path, status) of each request instead of logging."""

    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-") -> None:
        self.requests.append((self.path, int(code)))

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _http_server(folder):
    """A web server on 127.0.0.1 (loopback only) serving `folder`, in a thread; yields its
    base URL and the list of (path, status) it answers."""
    requests = []
    handler = type("Handler", (_QuietFiles,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("first", ["closed port", "404", "wrong bytes"])
def test_download_falls_back_to_the_second_mirror(tmp_path, monkeypatch, first):
    # Traffic to 127.0.0.1 must not go through a proxy that the environment may name.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    # The shipped gzips are not the official bytes: their own md5s stand in.
    md5 = {
        key: hashlib.md5((SHIPPED / name).read_bytes()).hexdigest()
        for key, name in data_utils.FILE_NAMES.items()
    }
    wrong = tmp_path / "wrong"  # Every file there, under its name, of other bytes.
    wrong.mkdir()
    for name in data_utils.FILE_NAMES.values():
        (wrong / name).write_bytes(gzip.compress(b"not the MNIST file " + name.encode()))
    with (
        socket.socket() as unused,  # Bound, never listening: connecting is refused.
        _http_server(SHIPPED) as (good, served),
        _http_server(wrong) as (bad, served_wrong),
    ):
        unused.bind(("127.0.0.1", 0))
        first_mirror = {
            "closed port": f"http://127.0.0.1:{unused.getsockname()[1]}/",
            "404": good + "nothing-here/",
            "wrong bytes": bad,
        }[first]
        mirrors = (first_mirror, good)
        spec = data_utils.DatasetSpec(
            **{**vars(data_utils.DATASETS["mnist"]), "mirrors": mirrors, "md5_gz": md5}
        )
        monkeypatch.setitem(data_utils.DATASETS, "mnist", spec)
        monkeypatch.setattr(data_utils, "DOWNLOAD_TIMEOUT", 10.0)
        folder = tmp_path / "mnist"
        data_utils.download("mnist", folder)

    names = [data_utils.FILE_NAMES[key] for key in data_utils.FILE_KEYS]
    # Each file was asked of the first mirror, then fetched from the second.
    fetched = [(f"/{name}", 200) for name in names]
    if first == "404":
        missed = [(f"/nothing-here/{name}", 404) for name in names]
        assert served == [r for pair in zip(missed, fetched, strict=True) for r in pair]
    else:
        assert served == fetched
    assert served_wrong == (fetched if first == "wrong bytes" else [])
    # What landed is whole and verified, and nothing else is there.
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    for name in names:
        assert (folder / name).read_bytes() == (SHIPPED / name).read_bytes()
    splits = data_utils.load_dataset("mnist", folder)  # Checked by sha256 on load.
    assert splits.test_images.shape == (10_000, 784)


def test_a_silent_server_times_out_instead_of_hanging(tmp_path, monkeypatch):
    # A socket that listens but never answers: connect succeeds, the read waits, until
    # the download's timeout (asked of every request) ends it.
    asked = []
    real_urlopen = urllib.request.urlopen

    def urlopen(*args, **kwargs):
        asked.append(kwargs.get("timeout"))
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        mirror = f"http://127.0.0.1:{server.getsockname()[1]}/"
        spec = data_utils.DatasetSpec(
            **{**vars(data_utils.DATASETS["mnist"]), "mirrors": (mirror,)}
        )
        monkeypatch.setitem(data_utils.DATASETS, "mnist", spec)
        monkeypatch.setattr(data_utils, "DOWNLOAD_TIMEOUT", 0.5)
        with pytest.raises(data_utils.DataError, match=r"download failed.*timed out"):
            data_utils.download("mnist", tmp_path / "new")
    assert asked and set(asked) == {0.5}, asked
    assert list(tmp_path.iterdir()) == []  # Neither a partial file nor the new folder.


def test_readme_data_section_names_the_fashion_mnist_classes():
    readme = (utils.PROJECT_DIR / "README.md").read_text()
    data_section = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    words = " ".join(data_section.split())  # Lines joined, as Markdown reads them.
    class_names = data_utils.DATASETS["fashion_mnist"].class_names
    assert "fashion_mnist" in words and ", ".join(class_names) in words
