"""Image transforms of the classification trainer: two ImageNet pipelines and a small-image one.

``DATA.PIPELINE authors`` is the input pipeline of the authors' release (megvii-model/MABN, ``cls/utils.py``):
square random crops, OpenCV-style bilinear resizes on uint8 pixels, PCA lighting clipped to [0, 255] and a
BGR 0-255 network input without mean/std. ``torchvision`` is torchvision's reference recipe
(RandomResizedCrop, RGB in [0, 1] normalized by the ImageNet mean/std).
"""
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (AlexNet, as in fb.resnet.torch): eigvec's columns are the eigenvectors.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class Lighting:
    """AlexNet PCA lighting noise on a float RGB tensor (``3xHxW`` or ``Nx3xHxW``).

    Each image gets its own ``alpha ~ N(0, std)`` per principal component and is shifted by
    ``eigvec @ (alpha * eigval)``, the same offset on every pixel. ``inplace`` adds it to the given tensor
    (like ``Normalize(inplace=True)``), for pipelines that own it: the same numbers without a new image.
    """

    def __init__(
        self,
        std: float,
        eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC,
        inplace: bool = False,
    ) -> None:
        if std < 0:
            raise ValueError(f"Lighting std must be >= 0, got {std}")
        self.std = float(std)
        self.inplace = inplace
        self.eigval = torch.tensor(eigval, dtype=torch.float64)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float64)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ValueError(
                f"Lighting needs 3 eigenvalues and a 3x3 eigenvector matrix, got shapes "
                f"{tuple(self.eigval.shape)} and {tuple(self.eigvec.shape)}"
            )

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not (isinstance(img, torch.Tensor) and img.is_floating_point()):
            got = f"a tensor of dtype {img.dtype}" if isinstance(img, torch.Tensor) else type(img).__name__
            raise TypeError(f"Lighting expects a float tensor (put it after ToTensor), got {got}")
        if img.dim() < 3 or img.shape[-3] != 3:
            raise ValueError(f"Lighting expects RGB images shaped [..., 3, H, W], got {tuple(img.shape)}")
        if self.std == 0:
            return img
        # Drawn from the global torch RNG, like torchvision's random transforms, so worker seeding applies.
        alpha = torch.randn(*img.shape[:-3], 3, dtype=torch.float64) * self.std
        rgb = (alpha * self.eigval) @ self.eigvec.T
        rgb = rgb.to(device=img.device, dtype=img.dtype)[..., None, None]
        return img.add_(rgb) if self.inplace else img + rgb

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std}{', inplace=True' if self.inplace else ''})"


def imagenet_transforms(pipeline: str, crop_size: int, resize_size: int, lighting_std: float) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms of the ImageNet pipeline ``pipeline`` ("authors" or "torchvision")."""
    if pipeline == "authors":
        return authors_train_transform(crop_size, lighting_std), authors_eval_transform(resize_size, crop_size)
    if pipeline == "torchvision":
        return imagenet_train_transform(crop_size, lighting_std), imagenet_eval_transform(resize_size, crop_size)
    raise ValueError(f"unknown ImageNet pipeline {pipeline!r}: choose 'authors' or 'torchvision'")


# ----------------------------------------------------------------------------- the authors' pipeline
def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``3xHxW`` uint8 tensor (RGB order)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    array = np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    return torch.from_numpy(array).permute(2, 0, 1)


# OpenCV's INTER_LINEAR on uint8 works in fixed point: weights in 1/2048 (INTER_RESIZE_COEF_BITS = 11).
_COEF_BITS = 11


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and fixed-point weights of each output position, computed as OpenCV computes them.

    The sample point is ``(dst + 0.5) * scale - 0.5`` (the half-pixel-centre convention of
    ``F.interpolate(mode="bilinear", align_corners=False)``), in float32 like OpenCV; its fraction is rounded
    (half to even, ``cvRound``) to 1/2048.
    """
    scale = 1.0 / (n_out / n_in)  # OpenCV keeps 1 / inv_scale, not n_in / n_out: the last bit matters
    src = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    low = np.floor(src).astype(np.int64)
    frac = src - low.astype(np.float32)
    upper = np.round(frac * (1 << _COEF_BITS)).astype(np.int32)
    # Past the border both taps read the edge pixel, but keep their weights: the truncating vertical pass gives a
    # different last bit for (w0, w1) than for (2048, 0).
    return (torch.from_numpy(np.clip(low, 0, n_in - 1)), torch.from_numpy(np.clip(low + 1, 0, n_in - 1)),
            torch.from_numpy((1 << _COEF_BITS) - upper), torch.from_numpy(upper))


def bilinear_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``CxHxW`` uint8 image to ``size = (height, width)`` as OpenCV's ``cv2.resize(INTER_LINEAR)``.

    Mathematically this is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (two taps, no
    antialiasing, for up- and downscaling alike), but OpenCV rounds its weights to 1/2048 and its vectorized x86
    path drops 4 bits of the horizontal sums before the vertical pass. Done in float, the result is off by one gray
    level on about 12 % of the pixels; this integer emulation matched cv2 4.x on every pixel of the photos that
    ``scripts/measure_opencv_resize.py`` measures (figures in docs/reproduction.md).
    """
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"bilinear_resize expects a CxHxW uint8 image, got {image.dtype} {tuple(image.shape)}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"bilinear_resize: the target size must be positive, got {size}")
    if tuple(image.shape[1:]) == (height, width):
        return image.clone()  # OpenCV copies too
    y0, y1, wy0, wy1 = _linear_taps(image.shape[1], height)
    x0, x1, wx0, wx1 = _linear_taps(image.shape[2], width)
    # The same integer arithmetic as written out in one expression, in place and with index_select: about twice as
    # fast as advanced indexing and fresh tensors at every operation (scripts/bench_data.py, SquareRandomCrop).
    pixels = image.to(torch.int32)
    rows = pixels.index_select(2, x0).mul_(wx0)  # horizontal pass, weights summing to 2048
    rows.add_(pixels.index_select(2, x1).mul_(wx1))
    rows >>= 4
    top = rows.index_select(1, y0).mul_(wy0[:, None])
    top >>= 16
    bottom = rows.index_select(1, y1).mul_(wy1[:, None])
    bottom >>= 16
    top.add_(bottom).add_(2)
    top >>= 2  # (top >> 16) + (bottom >> 16) + 2 >> 2
    return top.clamp_(0, 255).to(torch.uint8)


class SquareRandomCrop:
    """The authors' training crop: a random square of ``U(scale)`` times the image area, resized to ``size``.

    The side is ``round(sqrt(area))``; its corner is uniform over the positions where the square fits. Up to
    ``attempts`` squares are drawn until one fits inside the image; if none does, the last one is used with the
    part outside the image zero (black), as in the authors' release. Input: a ``3xHxW`` uint8 tensor.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0), attempts: int = 10) -> None:
        if size < 1 or attempts < 1 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"SquareRandomCrop needs size >= 1, attempts >= 1, 0 < scale[0] <= scale[1]; "
                             f"got size={size}, scale={scale}, attempts={attempts}")
        self.size, self.scale, self.attempts = int(size), (float(scale[0]), float(scale[1])), int(attempts)

    @staticmethod
    def _offset(slack: int) -> int:
        """Uniform over [slack, 0] or [0, slack], both ends included (global torch RNG, seeded per worker)."""
        low, high = min(slack, 0), max(slack, 0)
        return int(torch.randint(low, high + 1, ()).item())

    def window(self, height: int, width: int) -> tuple[int, int, int]:
        """``(top, left, side)`` of the square; top/left may be negative and the square may leave the image."""
        for _ in range(self.attempts):
            area = height * width * float(torch.empty(()).uniform_(*self.scale))
            side = round(math.sqrt(area))
            top, left = self._offset(height - side), self._offset(width - side)
            if side <= height and side <= width:
                break
        return top, left, side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        top, left, side = self.window(height, width)
        crop = image.new_zeros((channels, side, side))
        rows = slice(max(top, 0), min(top + side, height))
        cols = slice(max(left, 0), min(left + side, width))
        crop[:, rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = image[:, rows, cols]
        return bilinear_resize(crop, (self.size, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, attempts={self.attempts})"


class ClippedLighting:
    """PCA lighting on a uint8 RGB image as the authors apply it: shift in [0, 1] units, back to 0-255, clip, truncate."""

    def __init__(self, std: float) -> None:
        self.lighting = Lighting(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"ClippedLighting expects a uint8 image, got {image.dtype}")
        shifted = self.lighting(image.float() / 255) * 255
        return shifted.clamp_(0, 255).to(torch.uint8)  # truncation, like numpy's uint8 cast

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.lighting.std})"


def to_bgr_255(image: torch.Tensor) -> torch.Tensor:
    """The network input of the authors' release: float32, channels in BGR order, values 0-255, no normalization."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_bgr_255 expects a 3xHxW uint8 RGB image, got {image.dtype} {tuple(image.shape)}")
    return image.flip(0).float()


class ShorterSideResize:
    """Shorter side to ``size``, the longer one to ``int(size / short * long + 0.5)`` (the authors' rounding)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"ShorterSideResize needs a positive size, got {size}")
        self.size = int(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        if height < width:
            target = (self.size, int(self.size / height * width + 0.5))
        else:
            target = (int(self.size / width * height + 0.5), self.size)
        return bilinear_resize(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def authors_train_transform(crop_size: int = 224, lighting_std: float = 0.1) -> Callable:
    """The authors' training augmentation: square random crop, clipped PCA lighting, flip, BGR 0-255."""
    return T.Compose([
        pil_to_uint8,
        SquareRandomCrop(crop_size),
        ClippedLighting(lighting_std),
        T.RandomHorizontalFlip(),
        to_bgr_255,
    ])


def authors_eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable:
    """The authors' evaluation: shorter side to ``resize_size``, centre crop ``crop_size``, BGR 0-255."""
    return T.Compose([
        pil_to_uint8,
        ShorterSideResize(resize_size),
        T.CenterCrop(crop_size),
        to_bgr_255,
    ])


# ----------------------------------------------------------------------------- torchvision's pipeline


# After ToTensor the pipelines own their tensor, so Lighting and Normalize work in place: the same numbers without
# allocating (and page-faulting) two more float images, ~0.2 ms of ~5 ms per ImageNet sample (scripts/bench_data.py).
def imagenet_train_transform(crop_size: int = 224, lighting_std: float = 0.1) -> Callable:
    """torchvision's ImageNet training augmentation (with AlexNet's PCA lighting): random-resized crop, flip."""
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        Lighting(lighting_std, inplace=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD, inplace=True),
    ])


def imagenet_eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable:
    """Single centre crop, as in the paper's validation numbers."""
    return T.Compose([
        T.Resize(resize_size),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD, inplace=True),
    ])


def _channel_stats(mean: Sequence[float] | float, std: Sequence[float] | float) -> tuple[tuple, tuple]:
    mean = (float(mean),) if isinstance(mean, (int, float)) else tuple(float(m) for m in mean)
    std = (float(std),) if isinstance(std, (int, float)) else tuple(float(s) for s in std)
    if not mean or len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got mean={mean} and std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {std}")
    return mean, std


def small_train_transform(
    image_size: int = 28,
    padding: int = 4,
    mean: Sequence[float] | float = FASHION_MNIST_MEAN,
    std: Sequence[float] | float = FASHION_MNIST_STD,
) -> Callable:
    """Padded random crop and flip for 28-32 px images (defaults: Fashion-MNIST)."""
    mean, std = _channel_stats(mean, std)
    return T.Compose([
        T.RandomCrop(image_size, padding=padding),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def small_eval_transform(
    mean: Sequence[float] | float = FASHION_MNIST_MEAN,
    std: Sequence[float] | float = FASHION_MNIST_STD,
) -> Callable:
    """No augmentation: the full image, normalized (defaults: Fashion-MNIST)."""
    mean, std = _channel_stats(mean, std)
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
