"""Image files checked before any work starts: each exists and its header parses (format and size), without
decoding it. A missing or broken validation image is then found before the training it would otherwise cost."""
from __future__ import annotations

import struct
from typing import Iterable, Optional

from PIL import Image

# PIL reports unreadable headers through many exception types, depending on the format plugin.
HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageFileError(OSError):
    """An image file that is missing or whose header does not parse; the message names the file."""


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header of the image at ``path``."""
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except HEADER_ERRORS as e:
        raise ImageFileError(f"cannot read image {path}: {e}") from None


def check_image_files(paths: Iterable[str], what: str, sizes: Optional[Iterable[tuple[int, int]]] = None) -> int:
    """Check every file of ``paths`` (and, with ``sizes``, that its header has that (width, height)); raises
    :class:`ImageFileError` naming the first bad file and ``what`` it belongs to. Returns how many were checked."""
    count = 0
    for path, expected in zip(paths, sizes) if sizes is not None else ((p, None) for p in paths):
        try:
            size = image_size(path)
        except ImageFileError as e:
            raise ImageFileError(f"{what}: {e}") from None
        if expected is not None and tuple(size) != tuple(expected):
            raise ImageFileError(f"{what}: {path} is {size[0]}x{size[1]}, the annotations say {expected[0]}x{expected[1]}")
        count += 1
    return count
