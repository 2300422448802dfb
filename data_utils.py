"""MNIST-format data: IDX reading, checksums, download, splits, labelled subsets.

Every file is verified by the sha256 of its *decompressed* IDX content, so the
re-compressed copy shipped in `data/mnist/` and a fresh official download both
pass, and a truncated or altered file is refused before any training starts.

NumPy only: config.py reads the split sizes from here, and parsing flags
must not load TensorFlow. The draws in the graph are draws.py's.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import utils

IMAGE_SIZE = 28
N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
N_CLASSES = 10
N_VALID = 5_000  # The original validated on the first 5,000 training images.
N_TRAIN = 55_000
N_TEST = 10_000

FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class DataError(RuntimeError):
    """A data file is missing, unreadable or not the expected content."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and what its files must hash to."""

    sha256: dict[str, str]  # Of the decompressed IDX content, per file key.
    md5_gz: dict[str, str]  # Of the official gzip files, checked on download.
    mirrors: tuple[str, ...]
    default_dir: Path
    system_dir: Path | None = None  # Used when present (a Debian package).
    class_names: tuple[str, ...] = tuple(str(d) for d in range(10))


DATASETS = {
    "mnist": DatasetSpec(
        sha256={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        md5_gz={
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        default_dir=utils.PROJECT_DIR / "data" / "mnist",
    ),
    "fashion_mnist": DatasetSpec(
        sha256={
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        md5_gz={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("https://storage.googleapis.com/tensorflow/tf-keras-datasets/",),
        default_dir=utils.PROJECT_DIR / "data" / "fashion_mnist",
        system_dir=Path("/usr/share/datasets/fashion-mnist"),
        class_names=(
            "T-shirt",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Boot",
        ),
    ),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur here.
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Splits:
    """Flattened images as stored, uint8 pixels 0–255 (n, 784), and int32 labels (n,).

    Bytes, not floats: a quarter of the memory, also for the training copy
    resident in the graph (README, "Speed"). `scale` (NumPy) and
    `scale_in_graph` (TensorFlow) turn pixels into the model's [0, 1] floats,
    with identical values.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx_bytes(path: str | Path) -> bytes:
    """Return the decompressed content of an IDX file (gzip or raw)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}).") from err
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{path}: the gzip file is truncated or corrupt ({err}); replace it with a "
            "good copy (or move it away to have it downloaded again), or point --data_dir "
            "at a good copy."
        ) from err


def parse_idx(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (magic 0x0000 08 ndim, big-endian dims, then data)."""
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != _IDX_UBYTE:
        raise DataError(
            f"{name}: not an unsigned-byte IDX file (bad magic number "
            f"{content[:4].hex() or 'empty'}); point --data_dir at the MNIST-format files."
        )
    ndim = content[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(content) < header:
        raise DataError(f"{name}: IDX header is truncated; the file is damaged.")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    expected = header + math.prod(dims)  # Python ints: no overflow
    if len(content) != expected:
        raise DataError(
            f"{name}: IDX data holds {len(content) - header} bytes where the header "
            f"promises {expected - header} for shape {dims}; the file is damaged."
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file, refusing it if its decompressed sha256 differs.

    The structure is checked first, so that a damaged file gets the more
    precise message (truncated, bad magic) rather than a bare checksum mismatch.
    """
    content = read_idx_bytes(path)
    array = parse_idx(content, str(path))
    if expected_sha256 is not None:
        verify_sha256(content, expected_sha256, path)
    return array


def verify_sha256(content: bytes, expected: str, path: str | Path) -> None:
    """Raise DataError saying what to do if `content` does not hash to `expected`.

    When the content is a file of another known dataset, say so: the remedy is
    then a flag, not a new copy.
    """
    digest = hashlib.sha256(content).hexdigest()
    if digest != expected:
        raise DataError(f"{path}: {_checksum_advice(digest, expected)}")


def _checksum_advice(digest: str, expected: str) -> str:
    owner = {sha: name for name, spec in DATASETS.items() for sha in spec.sha256.values()}
    if digest in owner and owner[digest] != owner.get(expected):
        return (
            f"this is a {owner[digest]} file, not a {owner.get(expected, 'requested')} one; "
            "pass the matching --dataset, or point --data_dir at the right folder."
        )
    return (
        f"checksum mismatch (sha256 of the content is {digest}, expected {expected}); "
        "the file is damaged or not the official release: replace it with a good copy "
        "(or move it away to have it downloaded again), or point --data_dir at a good copy."
    )


def _find_file(folder: Path, key: str) -> Path | None:
    """The file for `key` in `folder`, gzipped or not."""
    gz = folder / FILE_NAMES[key]
    for candidate in (gz, gz.with_suffix("")):
        if candidate.is_file():
            return candidate
    return None


def resolve_data_dir(dataset: str, data_dir: str | Path | None) -> Path:
    """Pick the folder to read: `--data_dir`, else the system copy, else the default."""
    spec = DATASETS[dataset]
    if data_dir is not None:
        return Path(data_dir)
    if spec.system_dir is not None and all(_find_file(spec.system_dir, key) for key in FILE_KEYS):
        return spec.system_dir
    return spec.default_dir


# Seconds a download may wait for the server (per connection attempt and per
# read), so that a machine without network fails in seconds instead of hanging.
DOWNLOAD_TIMEOUT = 20.0


def download(dataset: str, folder: Path) -> None:
    """Fetch the official gzip files missing from `folder`, verified by md5.

    Each file is written under a temporary name and renamed only once its md5
    matches, so a failed download never leaves a partial file under the final
    name. If `folder` had to be created and nothing arrived, it is removed
    again (it is empty then), so that a failed run leaves nothing behind.
    """
    spec = DATASETS[dataset]
    missing = [key for key in FILE_KEYS if _find_file(folder, key) is None]
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(_missing_message(dataset, folder, f"cannot create it: {err}")) from err
    try:
        for key in missing:
            errors = []
            for mirror in spec.mirrors:
                try:
                    _fetch(mirror + FILE_NAMES[key], folder / FILE_NAMES[key], spec.md5_gz[key])
                    break
                except (OSError, http.client.HTTPException, ValueError, DataError) as err:
                    errors.append(f"{mirror}: {err}")
            else:
                raise DataError(_missing_message(dataset, folder, "; ".join(errors)))
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _fetch(url: str, destination: Path, md5: str) -> None:
    """Download `url` (one MNIST file, 10 MB at most) to `destination` if its md5 matches.

    `utils.atomic_write_bytes` writes it: under a temporary name, renamed once
    complete, with the file mode every file of the project gets.
    """
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        data = response.read()
    digest = hashlib.md5(data).hexdigest()
    if digest != md5:
        raise DataError(f"md5 of the download is {digest}, expected {md5}")
    utils.atomic_write_bytes(destination, data)


def _missing_message(dataset: str, folder: Path, reason: str) -> str:
    names = ", ".join(FILE_NAMES[key] for key in FILE_KEYS)
    reason = " ".join(reason.split())  # One line, whatever the network library said.
    return (
        f"{dataset} files missing from {folder} and the download failed ({reason}). "
        f"Put the four files {names} there, or pass --data_dir FOLDER that holds them."
    )


def load_dataset(dataset: str = "mnist", data_dir: str | Path | None = None) -> Splits:
    """Load, verify and split a dataset as the original did.

    Validation: the first 5,000 training images; training: the last 55,000;
    test: the 10,000 test images. Images flattened, pixels kept as uint8.
    An explicit `data_dir` must exist (a typo must not start a download into a
    new folder); missing files in it, or in the default folder, are downloaded.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}.")
    spec = DATASETS[dataset]
    folder = resolve_data_dir(dataset, data_dir)
    if data_dir is not None and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(
            f"--data_dir {folder} {what}; fix the path, or create the folder to have the "
            f"{dataset} files downloaded into it."
        )
    if not all(_find_file(folder, key) for key in FILE_KEYS):
        download(dataset, folder)
    # Structure and counts first, checksums last: the most precise message wins.
    paths = {key: _find_file(folder, key) for key in FILE_KEYS}
    contents = {key: read_idx_bytes(paths[key]) for key in FILE_KEYS}
    arrays = {key: parse_idx(contents[key], str(paths[key])) for key in FILE_KEYS}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(
                f"{paths[f'{part}_images']}: images have shape {images.shape}, not "
                "(n, 28, 28); point --data_dir at the MNIST-format files."
            )
        if labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{paths[f'{part}_labels']}: {len(labels)} labels for {len(images)} images "
                f"in {paths[f'{part}_images'].name}; the image and label files do not belong "
                "together: replace them with a matching pair, or point --data_dir at one."
            )
    for key in FILE_KEYS:
        verify_sha256(contents[key], spec.sha256[key], paths[key])
    train_x = arrays["train_images"].reshape(-1, N_PIXELS)
    test_x = arrays["test_images"].reshape(-1, N_PIXELS)
    train_labels = arrays["train_labels"].astype(np.int32)
    test_labels = arrays["test_labels"].astype(np.int32)
    return Splits(
        train_images=train_x[N_VALID:],
        train_labels=train_labels[N_VALID:],
        valid_images=train_x[:N_VALID],
        valid_labels=train_labels[:N_VALID],
        test_images=test_x,
        test_labels=test_labels,
    )


LABELLED_SEED = 4_000_037  # With --seed: which training images keep their labels (M2).


def labelled_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The training images that keep their labels in a semi-supervised run (--n_labeled).

    n / 10 images of each class, drawn without replacement from `seed` alone, so
    that a resumed run recomputes the same subset. Returns their sorted int32
    indices into `labels`.

    Raises:
      ValueError: in one line, if n is not a positive multiple of the classes, or a
        class has fewer than n / 10 images.
    """
    if n < N_CLASSES or n % N_CLASSES:
        raise ValueError(
            f"--n_labeled {n}: must be a positive multiple of {N_CLASSES}, balanced over "
            "the classes"
        )
    per_class = n // N_CLASSES
    counts = np.bincount(labels, minlength=N_CLASSES)
    if counts.min() < per_class:
        raise ValueError(
            f"--n_labeled {n} needs {per_class} images of each class, but the training "
            f"images have only {counts.min()} of class {counts.argmin()}: "
            "lower --n_labeled or raise --n_train"
        )
    rng = np.random.default_rng([seed, LABELLED_SEED])
    chosen = [
        rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in range(N_CLASSES)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int32)


# Pixels become floats by one float32 product with 1/255 (255 maps to exactly
# 1.0), in NumPy and in the graph alike: the same operation gives the same
# bits, which a division would not (the graph may rewrite x / 255 as x * (1/255)).
INV_255 = np.float32(1.0 / 255.0)


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) or (n, 784) -> float32 (n, 784) in [0, 1]."""
    if images.dtype != np.uint8:  # Scaling floats twice would go unnoticed.
        raise TypeError(f"scale expects uint8 pixels, got {images.dtype}")
    return images.reshape(len(images), -1).astype(np.float32) * INV_255


def as_floats(images: np.typing.ArrayLike) -> np.ndarray:
    """Images as a float32 NumPy array: uint8 pixels scaled (`scale`), float32 ones as
    they are; `draws.scale_in_graph`'s twin for arrays."""
    images = np.asarray(images)
    return scale(images) if images.dtype == np.uint8 else images
