"""Datasets of the classification trainer: ImageNet (ImageFolder), Fashion-MNIST (offline idx files), synthetic."""
import gzip
import inspect
import itertools
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from mabn.engine.image_files import CorruptImageError, load_rgb

logger = logging.getLogger(__name__)

# The ILSVRC-2012 (ImageNet-1k) training set: what one epoch of the paper's recipe reads.
IMAGENET_TRAIN_IMAGES = 1_281_167

IMAGE_FOLDER_LAYOUT = "expected <root>/<split>/<class>/<image>, e.g. <root>/train/n01440764/n01440764_10026.JPEG"

# Where the Debian package `dataset-fashion-mnist` installs the original idx files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fashion-MNIST has no validation split; the trainer asks for 'val' on every dataset and gets the test set.
_FASHION_MNIST_SPLITS = {"train": "train", "test": "test", "val": "test"}
_FASHION_MNIST_HELP = (
    f"Install them offline with `apt-get install dataset-fashion-mnist` (into {DEBIAN_FASHION_MNIST_DIR}), "
    "pass root=<directory holding the idx .gz files>, or pass download_dir=<directory> to download them."
)

# idx type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

class IdxFormatError(ValueError):
    """An idx(.gz) file that is truncated, corrupt or not of the expected kind; the message names the file."""


class ImageFolderDataset(torchvision.datasets.ImageFolder):
    """``ImageFolder`` over one split directory, with clear errors and optional skipping of corrupt images.

    With ``skip_corrupt`` an unreadable image is replaced by the next readable one (wrapping around), so that
    the length, and with it the ``DistributedSampler`` partition, stays fixed.
    """

    def __init__(self, root: str, transform: Callable | None = None, skip_corrupt: bool = False) -> None:
        try:
            super().__init__(root, transform=transform, loader=load_rgb)
        except FileNotFoundError as e:  # no class folder, or a class folder without images
            raise FileNotFoundError(f"{root}: {e} ({IMAGE_FOLDER_LAYOUT})") from e
        self.skip_corrupt = skip_corrupt
        self._corrupt: set[int] = set()  # per process: each DataLoader worker warns on its own copy

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for the {n} images under {self.root}")
        index %= n
        for i in itertools.chain(range(index, n), range(index)):
            if i in self._corrupt:
                continue
            try:
                return super().__getitem__(i)
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                self._corrupt.add(i)
                logger.warning("%s; skipping it, its index is served by the next readable image", e)
        raise CorruptImageError(f"no readable image under {self.root}: all {n} files failed to decode")


def image_folder(
    root: str | os.PathLike, split: str, transform: Callable | None = None, skip_corrupt: bool = False
) -> ImageFolderDataset:
    """The ImageNet-layout dataset in ``root/split`` (``root/train/<wnid>/*.JPEG``), images as RGB PIL."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root} is not a directory; {IMAGE_FOLDER_LAYOUT}")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(d.name for d in os.scandir(root) if d.is_dir())
        raise FileNotFoundError(
            f"split directory {split_dir} not found (subdirectories of {root}: {found or 'none'}); "
            f"{IMAGE_FOLDER_LAYOUT}"
        )
    return ImageFolderDataset(split_dir, transform, skip_corrupt)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format, optionally gzipped) into a native-endian numpy array."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000, a type code among "
            f"{', '.join(hex(c) for c in _IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise IdxFormatError(
            f"{path}: {len(raw)} bytes where the header announces {shape} of {dtype} ({expected} bytes); "
            f"the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _read_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (os.path.join(directory, name) for name in _FASHION_MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    # uint8 with 3 (resp. 1) dimensions is what the magic numbers 0x803 and 0x801 of MNIST-style files say.
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxFormatError(
            f"{image_file}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxFormatError(f"{label_file}: expected a uint8 vector of labels, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IdxFormatError(
            f"{label_file}: label {labels.max()} out of range for {len(FASHION_MNIST_CLASSES)} classes"
        )
    return images, labels


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST held in memory as uint8; yields ``(PIL 'L' 28x28 image, int label)`` after ``transform``."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None, source: str = ""):
        self.data = images
        self.targets: list[int] = labels.tolist()
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _holds(directory: str, files: tuple[str, ...]) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in files)


def _fashion_mnist_directories(root: str | os.PathLike) -> list[str]:
    """Where under ``root`` the idx files may be: in it, or in torchvision's layout ``root/FashionMNIST/raw``."""
    return [os.fspath(root), os.path.join(root, "FashionMNIST", "raw")]


def fashion_mnist(
    split: str,
    transform: Callable | None = None,
    root: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
) -> FashionMNISTDataset:
    """Fashion-MNIST ``split`` ('train', or 'test' alias 'val') from local idx.gz files, else a download.

    Looks in ``root`` (or its torchvision layout ``root/FashionMNIST/raw``), then in the Debian package's
    directory; only if neither holds the files and ``download_dir`` is given does torchvision download them.
    """
    if split not in _FASHION_MNIST_SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_FASHION_MNIST_SPLITS)}")
    split = _FASHION_MNIST_SPLITS[split]
    files = _FASHION_MNIST_FILES[split]
    searched = _fashion_mnist_directories(root) if root is not None else []
    searched.append(DEBIAN_FASHION_MNIST_DIR)
    for directory in searched:
        if _holds(directory, files):
            return FashionMNISTDataset(*_read_fashion_mnist(directory, split), transform, source=directory)

    problem = f"Fashion-MNIST files {', '.join(files)} not found in {', '.join(searched)}"
    if download_dir is not None:
        try:
            downloaded = torchvision.datasets.FashionMNIST(download_dir, train=split == "train", download=True)
        except (RuntimeError, OSError) as e:  # torchvision wraps failed mirrors in RuntimeError; URLError is OSError
            raise FileNotFoundError(
                f"{problem}, and downloading them into {download_dir} failed ({e}). {_FASHION_MNIST_HELP}"
            ) from e
        return FashionMNISTDataset(
            downloaded.data.numpy(), downloaded.targets.numpy(), transform, source=downloaded.raw_folder
        )
    raise FileNotFoundError(f"{problem}. {_FASHION_MNIST_HELP}")


class SyntheticDataset(Dataset):
    """Deterministic standard-normal images and uniform labels, generated on access (no disk, no transform)."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int, channels: int = 3, seed: int = 0):
        sizes = {"num_samples": num_samples, "num_classes": num_classes, "image_size": image_size, "channels": channels}
        bad = {name: value for name, value in sizes.items() if not (isinstance(value, int) and value > 0)}
        if bad:
            raise ValueError(f"synthetic dataset sizes must be positive integers, got {bad}")
        if seed < 0:
            raise ValueError(f"synthetic dataset seed must be >= 0, got {seed}")
        self.shape = (channels, image_size, image_size)
        self.seed = seed
        self.classes = [str(c) for c in range(num_classes)]
        self.targets: list[int] = torch.randint(
            num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed)
        ).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.targets)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a synthetic dataset of {n} samples")
        index %= n
        # A generator per (seed, index): a sample does not depend on access order, worker or sampler.
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        return torch.randn(self.shape, generator=generator), self.targets[index]


def synthetic(
    num_samples: int, num_classes: int, image_size: int, channels: int = 3, seed: int = 0
) -> SyntheticDataset:
    """Random normalized tensors and labels for throughput benchmarks; the same ``seed`` gives the same data."""
    return SyntheticDataset(num_samples, num_classes, image_size, channels, seed)


def _build_imagenet(split, root, transform, skip_corrupt):
    if root is None:
        raise ValueError("dataset 'imagenet' needs root: the directory holding train/ and val/")
    return image_folder(root, split, transform, skip_corrupt)


def _build_fashion_mnist(split, root, transform, skip_corrupt, download_dir=None):
    # skip_corrupt does not apply: the files are decoded and validated as a whole when loading.
    # fashion_mnist() falls back to the Debian copy or a download; a root that was given must be the one read
    if root is not None and split in _FASHION_MNIST_SPLITS:
        files = _FASHION_MNIST_FILES[_FASHION_MNIST_SPLITS[split]]
        if not any(_holds(directory, files) for directory in _fashion_mnist_directories(root)):
            raise FileNotFoundError(
                f"root {os.fspath(root)} holds no Fashion-MNIST files {', '.join(files)} (nor its FashionMNIST/raw): "
                "give the directory that holds them, or no root for the installed copy"
            )
    return fashion_mnist(split, transform, root, download_dir)


def _build_synthetic(
    split, root, transform, skip_corrupt, num_samples=1024, num_classes=1000, image_size=224, channels=3, seed=0
):
    # Samples are ready tensors: root and the (PIL) transform the trainer builds for real data do not apply.
    return synthetic(num_samples, num_classes, image_size, channels, seed)


DATASETS = {"imagenet": _build_imagenet, "fashion_mnist": _build_fashion_mnist, "synthetic": _build_synthetic}


def build_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    skip_corrupt: bool = False,
    **options: Any,
) -> Dataset:
    """Build dataset ``name`` ('imagenet', 'fashion_mnist' or 'synthetic') for ``split``.

    ``options`` are dataset-specific: ``download_dir`` for fashion_mnist; ``num_samples`` (1024),
    ``num_classes`` (1000), ``image_size`` (224), ``channels`` (3) and ``seed`` (0) for synthetic.
    Every dataset has ``.classes`` and ``.targets``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    builder = DATASETS[name]
    valid_options = list(inspect.signature(builder).parameters)[4:]
    unknown = sorted(set(options) - set(valid_options))
    if unknown:
        raise ValueError(
            f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(valid_options) or 'none'}"
        )
    return builder(split, root, transform, skip_corrupt, **options)
