"""Image transforms of the classification trainer: the authors' ImageNet recipe and a small-image one."""
from collections.abc import Callable, Sequence

import torch
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


# After ToTensor the pipelines own their tensor, so Lighting and Normalize work in place: the same numbers without
# allocating (and page-faulting) two more float images, ~0.2 ms of ~5 ms per ImageNet sample (scripts/bench_data.py).
def imagenet_train_transform(crop_size: int = 224, lighting_std: float = 0.1) -> Callable:
    """The authors' ImageNet training augmentation: random-resized crop, flip, PCA lighting."""
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
