"""Image files as both trainers read them: decoded to RGB with errors that name the file (:func:`load_rgb`), and
checked before any work starts (:func:`check_image_files`: each exists and its header parses, format and size,
without decoding it), so that a missing or broken validation image is found before the training it would
otherwise cost."""
from __future__ import annotations

import struct
from typing import Iterable, Optional

from PIL import Image

# PIL reports malformed files through many exception types, depending on the format plugin and the stage.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageFileError(OSError):
    """An image file that is missing or whose header does not parse; the message names the file."""


class CorruptImageError(OSError):
    """An image file that cannot be read or decoded; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, turning any decoding failure into a :class:`CorruptImageError` naming ``path``.

    The pixels are those of torchvision's ``pil_loader`` (``Image.open(f).convert('RGB')``), without its copy of
    images that decode to RGB already (nearly every JPEG): ``convert`` to the same mode copies the whole image,
    a few per cent of the decode time of an ImageNet JPEG (``scripts/bench_data.py``).
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            # load() / convert() force the full decode here, so that truncated files fail now and not in a transform.
            if image.mode == "RGB":
                image.load()
                return image
            return image.convert("RGB")
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header of the image at ``path``."""
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except DECODE_ERRORS as e:
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
