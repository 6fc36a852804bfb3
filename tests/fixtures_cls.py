"""Tiny on-disk datasets for the classification tests: an ImageNet-layout folder and MNIST-style idx files."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# idx type codes, written independently of the parser under test.
IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
                  np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}

# Mixed formats and modes, like a real crawl: the dataset must hand out RGB for all of them.
IMAGE_KINDS = (("JPEG", "RGB"), ("png", "L"), ("png", "RGBA"))


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """A noise image of ``size`` (width, height) in ``mode``, format from the suffix."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    # fromarray infers L, RGB or RGBA from the channel count.
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)


def make_image_folder(root: Path, split: str = "train", classes=("cat", "dog"), size=(40, 30)) -> Path:
    """``root/split/<class>/img<k>.<ext>``, one image of each of IMAGE_KINDS per class; returns the split dir."""
    split_dir = root / split
    for c, name in enumerate(classes):
        (split_dir / name).mkdir(parents=True)
        for k, (ext, mode) in enumerate(IMAGE_KINDS):
            write_image(split_dir / name / f"img{k}.{ext}", size, mode, seed=10 * c + k)
    return split_dir


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of ``array``: magic (0, 0, type code, ndim), big-endian sizes, big-endian data."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data``, gzipped when the name ends in .gz."""
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_mnist(directory: Path, prefix: str, num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random Fashion-MNIST-shaped ``<prefix>-images-idx3-ubyte.gz`` / labels files; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, num, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes(directory / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images))
    write_bytes(directory / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(labels))
    return images, labels
