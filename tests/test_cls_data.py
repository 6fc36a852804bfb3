"""The classification data pipeline: ImageFolder, Fashion-MNIST idx files, synthetic data, transforms."""
import gzip
import logging
import pickle
import random
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as TV
from torchvision.transforms import functional as TF

from cls import datasets as D
from cls import transforms as T
from mabn.engine.sampling import SeededDataset

from fixtures_cls import IMAGE_KINDS, idx_bytes, make_image_folder, write_bytes, write_fashion_mnist, write_image

CLASSES = ("cat", "dog")
PER_CLASS = len(IMAGE_KINDS)


def _path_pattern(path) -> str:
    return re.escape(str(path))


# ---------------------------------------------------------------------------------------------- ImageFolder

@pytest.mark.parametrize("transform,crop", [
    pytest.param(T.imagenet_train_transform(), 224, id="train"),
    pytest.param(T.imagenet_eval_transform(), 224, id="eval"),
    pytest.param(T.imagenet_train_transform(crop_size=64, lighting_std=0.0), 64, id="train-64-nolight"),
    pytest.param(T.imagenet_eval_transform(resize_size=72, crop_size=64), 64, id="eval-64"),
    pytest.param(T.authors_train_transform(), 224, id="authors-train"),
    pytest.param(T.authors_eval_transform(), 224, id="authors-eval"),
    pytest.param(T.authors_eval_transform(resize_size=72, crop_size=64), 64, id="authors-eval-64"),
])
def test_image_folder_loads_with_transforms(tmp_path, transform, crop):
    make_image_folder(tmp_path, "train", CLASSES)
    dataset = D.image_folder(tmp_path, "train", transform)
    assert isinstance(dataset, torchvision.datasets.ImageFolder)
    assert dataset.classes == list(CLASSES) and len(dataset) == len(CLASSES) * PER_CLASS
    assert dataset.targets == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, crop, crop) and image.dtype == torch.float32
        assert label == dataset.targets[index]


def test_image_folder_converts_every_mode_to_rgb(tmp_path):
    make_image_folder(tmp_path, "val", CLASSES)
    dataset = D.image_folder(tmp_path, "val")
    modes = set()
    for path, _ in dataset.samples:
        with Image.open(path) as image:
            modes.add(image.mode)
    assert modes == {mode for _, mode in IMAGE_KINDS}  # the fixture really mixes modes
    assert all(dataset[i][0].mode == "RGB" for i in range(len(dataset)))


# The recipes as they were before the speed-ups (every step copying), built from torchvision's parts.
COPYING_TRAIN = TV.Compose([TV.RandomResizedCrop(64, scale=(0.08, 1.0)), TV.RandomHorizontalFlip(), TV.ToTensor(),
                            T.Lighting(0.1), TV.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
COPYING_EVAL = TV.Compose([TV.Resize(72), TV.CenterCrop(64), TV.ToTensor(), TV.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])


@pytest.mark.parametrize("transform,copying", [
    pytest.param(T.imagenet_train_transform(crop_size=64), COPYING_TRAIN, id="train"),
    pytest.param(T.imagenet_eval_transform(resize_size=72, crop_size=64), COPYING_EVAL, id="eval"),
])
def test_loading_gives_the_tensors_of_the_copying_pipeline(tmp_path, transform, copying):
    """load_rgb skips pil_loader's copy of RGB images, the recipes work in place after ToTensor: no pixel and no
    augmentation draw may change for it."""
    make_image_folder(tmp_path, "train", CLASSES, size=(120, 90))
    cmyk = np.random.default_rng(7).integers(0, 256, (90, 120, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "train" / CLASSES[0] / "cmyk.jpg")  # ImageNet has some
    dataset = D.image_folder(tmp_path, "train", transform)
    for path, _ in dataset.samples:
        loaded, reference = D.load_rgb(path), torchvision.datasets.folder.pil_loader(path)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(reference))
    seeded = SeededDataset(dataset, seed=3)
    now = [seeded[(1, i)][0] for i in range(len(dataset))]
    dataset.loader, dataset.transform = torchvision.datasets.folder.pil_loader, copying
    before = [seeded[(1, i)][0] for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(now, before))


def test_seeded_dataset_seeds_the_cpu_generator_only_and_restores_it(monkeypatch):
    """A sample's draws come from the CPU generator seeded per (seed, epoch, index), as torch.manual_seed would seed
    it; the CUDA generators are never reseeded (that cost ~100 us per sample and, with no loader workers, left the
    training process's CUDA generator reseeded), and the CPU generator and Python's random are restored."""
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.rand(4), random.random()

    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seeds.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: cuda_seeds.append(seed))
    seeded = SeededDataset(Draws(), seed=3)
    torch.manual_seed(11)
    random.seed(11)
    cpu_state, python_state = torch.get_rng_state(), random.getstate()
    cuda_seeds.clear()
    drawn, number = seeded[(2, 1)]
    assert cuda_seeds == []
    assert torch.equal(torch.get_rng_state(), cpu_state) and random.getstate() == python_state
    sample_seed = (3 * 1_000_003 + 2) * 10_000_019 + 1
    torch.manual_seed(sample_seed)
    random.seed(sample_seed)
    assert torch.equal(drawn, torch.rand(4)) and number == random.random()
    assert not torch.equal(seeded[(2, 2)][0], drawn)


def test_lighting_in_place_adds_the_same_offset_to_the_given_tensor():
    image = torch.rand(2, 3, 5, 4)
    torch.manual_seed(0)
    copied = T.Lighting(0.1)(image)
    torch.manual_seed(0)
    target = image.clone()
    assert T.Lighting(0.1, inplace=True)(target) is target and torch.equal(target, copied)
    assert not torch.equal(target, image)


def test_image_folder_missing_root_names_it(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=_path_pattern(root)) as info:
        D.image_folder(root, "train")
    assert "<root>/<split>/<class>/<image>" in str(info.value)


def test_image_folder_missing_split_names_it_and_lists_the_others(tmp_path):
    make_image_folder(tmp_path, "train", CLASSES)
    with pytest.raises(FileNotFoundError, match=_path_pattern(tmp_path / "val")) as info:
        D.image_folder(tmp_path, "val")
    assert "['train']" in str(info.value) and "<root>/<split>/<class>/<image>" in str(info.value)


@pytest.mark.parametrize("populate,problem", [
    pytest.param(lambda split_dir: None, "class folder", id="no-class-folder"),
    pytest.param(lambda split_dir: (split_dir / "cat").mkdir(), "cat", id="empty-class"),
    pytest.param(lambda split_dir: ((split_dir / "cat").mkdir(), (split_dir / "cat" / "notes.txt").write_text("x")),
                 "cat", id="no-image-in-class"),
])
def test_image_folder_empty_split_is_a_clear_error(tmp_path, populate, problem):
    split_dir = tmp_path / "train"
    split_dir.mkdir()
    populate(split_dir)
    with pytest.raises(FileNotFoundError, match=_path_pattern(split_dir)) as info:
        D.image_folder(tmp_path, "train")
    assert problem in str(info.value) and "<root>/<split>/<class>/<image>" in str(info.value)


def _corrupt_file(path, kind):
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    else:  # a real JPEG cut in half: the header parses, the decode fails
        write_image(path, (64, 64), "RGB", seed=99)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# The corrupt file sorts last in its class: in 'cat' the next readable image is dog's first, in 'dog' it wraps to 0.
CORRUPT_CASES = [
    pytest.param(kind, owner, id=f"{kind}-in-{owner}") for kind in ("garbage", "truncated") for owner in CLASSES
]


@pytest.mark.parametrize("kind,owner", CORRUPT_CASES)
def test_corrupt_image_error_names_the_file(tmp_path, kind, owner):
    make_image_folder(tmp_path, "train", CLASSES)
    bad = tmp_path / "train" / owner / "zz_corrupt.JPEG"
    _corrupt_file(bad, kind)
    dataset = D.image_folder(tmp_path, "train", T.imagenet_eval_transform())
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(D.CorruptImageError, match=_path_pattern(bad)) as info:
        dataset[index]
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("kind,owner", CORRUPT_CASES)
def test_skip_corrupt_keeps_length_and_serves_the_next_image(tmp_path, caplog, kind, owner):
    make_image_folder(tmp_path, "train", CLASSES)
    bad = tmp_path / "train" / owner / "zz_corrupt.JPEG"
    _corrupt_file(bad, kind)
    dataset = D.image_folder(tmp_path, "train", T.imagenet_eval_transform(), skip_corrupt=True)
    assert len(dataset) == len(CLASSES) * PER_CLASS + 1
    index = [path for path, _ in dataset.samples].index(str(bad))
    replacement = (index + 1) % len(dataset)

    with caplog.at_level(logging.WARNING, logger="cls.datasets"):
        first = dataset[index]
        second = dataset[index]
    expected_image, expected_label = dataset[replacement]
    for image, label in (first, second):
        assert torch.equal(image, expected_image) and label == expected_label
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_skip_corrupt_with_no_readable_image_fails(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    _corrupt_file(tmp_path / "train" / "cat" / "a.JPEG", "garbage")
    dataset = D.image_folder(tmp_path, "train", skip_corrupt=True)
    with pytest.raises(D.CorruptImageError, match="no readable image"):
        dataset[0]


def test_skip_corrupt_under_distributed_sampler_and_workers(tmp_path):
    make_image_folder(tmp_path, "train", CLASSES)
    _corrupt_file(tmp_path / "train" / "cat" / "zz_corrupt.JPEG", "garbage")
    dataset = D.image_folder(tmp_path, "train", T.imagenet_eval_transform(72, 64), skip_corrupt=True)
    bad, n = PER_CLASS, len(dataset)  # the corrupt file is cat's last; dog's first stands in for it
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        batches = list(DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2))
        assert all(images.shape[1:] == (3, 64, 64) for images, _ in batches)
        labels = torch.cat([labels for _, labels in batches]).tolist()
        assert labels == [dataset.targets[(i + (i == bad)) % n] for i in sampler]


# ---------------------------------------------------------------------------------------------- idx / Fashion-MNIST

IDX_ARRAYS = [
    pytest.param(np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8), id="images-u8"),
    pytest.param(np.random.default_rng(2).integers(0, 10, 7, dtype=np.uint8), id="labels-u8"),
    pytest.param(np.array([[-70000, 3, 2**31 - 1], [0, -1, 258]], dtype=np.int32), id="int32"),
    pytest.param(np.array([1.5, -2.25e10, np.pi], dtype=np.float64), id="float64"),
]


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("array", IDX_ARRAYS)
def test_read_idx_round_trips(tmp_path, array, suffix):
    path = write_bytes(tmp_path / f"data-idx{suffix}", idx_bytes(array))
    parsed = D.read_idx(path)
    assert parsed.shape == array.shape and parsed.dtype == array.dtype and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


_LABELS = np.arange(10, dtype=np.uint8)
BAD_IDX = [
    pytest.param(lambda: b"\x1f\x8b\x08\x01" + idx_bytes(_LABELS)[4:], "magic", id="nonzero-magic"),
    pytest.param(lambda: b"\x00\x00\x07\x01" + idx_bytes(_LABELS)[4:], "magic", id="unknown-type-code"),
    pytest.param(lambda: idx_bytes(_LABELS)[:6], "header", id="truncated-header"),
    pytest.param(lambda: idx_bytes(_LABELS)[:-3], "truncated", id="truncated-data"),
    pytest.param(lambda: idx_bytes(_LABELS) + b"\x00", "truncated or corrupt", id="trailing-bytes"),
]


@pytest.mark.parametrize("content,problem", BAD_IDX)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, content, problem):
    path = write_bytes(tmp_path / "train-labels-idx1-ubyte.gz", content())
    with pytest.raises(D.IdxFormatError, match=_path_pattern(path)) as info:
        D.read_idx(path)
    assert problem in str(info.value)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    compressed = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(D.IdxFormatError, match=_path_pattern(path)):
        D.read_idx(path)


@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
@pytest.mark.parametrize("split,prefix,num", [("train", "train", 7), ("test", "t10k", 4), ("val", "t10k", 4)])
def test_fashion_mnist_reads_generated_files(tmp_path, layout, split, prefix, num):
    images, labels = write_fashion_mnist(tmp_path / layout, prefix, num, seed=num)
    dataset = D.fashion_mnist(split, root=tmp_path)
    assert len(dataset) == num and dataset.classes == list(D.FASHION_MNIST_CLASSES) and len(dataset.classes) == 10
    assert dataset.targets == labels.tolist()
    for index in range(num):
        image, label = dataset[index]
        assert image.mode == "L" and image.size == (28, 28) and type(label) is int
        np.testing.assert_array_equal(np.asarray(image), images[index])
        assert label == labels[index]


@pytest.mark.parametrize("transform", [T.small_train_transform(28, 4), T.small_eval_transform()], ids=["train", "eval"])
def test_fashion_mnist_with_small_transforms(tmp_path, transform):
    write_fashion_mnist(tmp_path, "train", 3)
    image, label = D.fashion_mnist("train", transform, root=tmp_path)[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= label < 10


@pytest.mark.parametrize("break_files,bad_file", [
    pytest.param(lambda d, imgs, lbls: write_bytes(d / "train-labels-idx1-ubyte.gz", idx_bytes(lbls[:-1])),
                 "train-images-idx3-ubyte.gz", id="count-mismatch"),
    pytest.param(lambda d, imgs, lbls: write_bytes(d / "train-labels-idx1-ubyte.gz", idx_bytes(lbls + 10)),
                 "train-labels-idx1-ubyte.gz", id="label-out-of-range"),
    pytest.param(lambda d, imgs, lbls: write_bytes(d / "train-images-idx3-ubyte.gz", idx_bytes(imgs[:, :20])),
                 "train-images-idx3-ubyte.gz", id="not-28x28"),
    pytest.param(lambda d, imgs, lbls: write_bytes(d / "train-labels-idx1-ubyte.gz", idx_bytes(imgs)),
                 "train-labels-idx1-ubyte.gz", id="labels-are-images"),
])
def test_fashion_mnist_rejects_inconsistent_files(tmp_path, break_files, bad_file):
    images, labels = write_fashion_mnist(tmp_path, "train", 5)
    break_files(tmp_path, images, labels)
    with pytest.raises(D.IdxFormatError, match=_path_pattern(tmp_path / bad_file)):
        D.fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_unknown_split():
    with pytest.raises(ValueError, match="'validation'.*train, test, val"):
        D.fashion_mnist("validation")


class _FakeDownload:
    """Stands in for torchvision.datasets.FashionMNIST: the tests have no network."""

    calls = []
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8))
    targets = torch.arange(6) + 2

    def __init__(self, root, train, download):
        self.calls.append((root, train, download))
        self.raw_folder = f"{root}/FashionMNIST/raw"


def _failing_download(root, train, download):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")


def test_fashion_mnist_downloads_only_when_no_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeDownload)
    _FakeDownload.calls.clear()
    dataset = D.fashion_mnist("test", root=tmp_path / "empty", download_dir=tmp_path / "dl")
    assert _FakeDownload.calls == [(tmp_path / "dl", False, True)]
    assert dataset.targets == _FakeDownload.targets.tolist()
    np.testing.assert_array_equal(np.asarray(dataset[5][0]), _FakeDownload.data[5].numpy())

    write_fashion_mnist(tmp_path / "local", "t10k", 2)
    _FakeDownload.calls.clear()
    assert len(D.fashion_mnist("test", root=tmp_path / "local", download_dir=tmp_path / "dl")) == 2
    assert _FakeDownload.calls == []


@pytest.mark.parametrize("download_dir", [None, "dl"])
def test_fashion_mnist_unavailable_says_how_to_get_it(tmp_path, monkeypatch, download_dir):
    debian = tmp_path / "not-installed"
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _failing_download)
    download_dir = download_dir and tmp_path / download_dir
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        D.fashion_mnist("train", root=tmp_path / "empty", download_dir=download_dir)
    message = str(info.value)
    assert str(tmp_path / "empty") in message and str(debian) in message
    assert (download_dir is not None) == ("Error downloading" in message)


@pytest.mark.parametrize("split,num", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, num):
    # No skip: this machine has the Debian package, and without it (and no download_dir) loading must fail.
    dataset = D.fashion_mnist(split)
    assert len(dataset) == num and len(dataset.classes) == 10
    assert np.bincount(dataset.targets).tolist() == [num // 10] * 10  # Fashion-MNIST is exactly balanced
    image, label = dataset[0]
    assert image.mode == "L" and image.size == (28, 28) and label == 9  # both splits start with an ankle boot


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_for_a_seed():
    a, b = D.synthetic(16, 5, 8, seed=3), D.synthetic(16, 5, 8, seed=3)
    assert len(a) == 16 and a.targets == b.targets and set(a.targets) <= set(range(5))
    for index in (15, 0, 7, -1):  # the access order must not matter
        (xa, ya), (xb, yb) = a[index], b[index]
        assert torch.equal(xa, xb) and ya == yb and xa.shape == (3, 8, 8) and xa.dtype == torch.float32
    other = D.synthetic(16, 5, 8, seed=4)
    assert not torch.equal(a[0][0], other[0][0]) and a.targets != other.targets
    assert not torch.equal(a[0][0], a[1][0])


def test_synthetic_is_roughly_normalized():
    images = torch.stack([D.synthetic(8, 10, 32, channels=1)[i][0] for i in range(8)])
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    with pytest.raises(IndexError):
        D.synthetic(8, 10, 32)[8]


@pytest.mark.parametrize("kwargs", [
    dict(num_samples=0), dict(num_classes=0), dict(image_size=-1), dict(channels=2.5), dict(seed=-1),
])
def test_synthetic_rejects_bad_arguments(kwargs):
    args = dict(num_samples=4, num_classes=2, image_size=8) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        D.synthetic(**args)


# ---------------------------------------------------------------------------------------------- build_dataset

def test_build_dataset_dispatches(tmp_path):
    make_image_folder(tmp_path / "imagenet", "val", CLASSES)
    imagenet = D.build_dataset("imagenet", "val", tmp_path / "imagenet", T.imagenet_eval_transform(), True)
    assert isinstance(imagenet, D.ImageFolderDataset) and imagenet.skip_corrupt and len(imagenet) == 6

    write_fashion_mnist(tmp_path / "fm", "t10k", 3)
    fm = D.build_dataset("fashion_mnist", "val", tmp_path / "fm", T.small_eval_transform())
    assert len(fm) == 3 and fm[0][0].shape == (1, 28, 28)

    default = D.build_dataset("synthetic", "train")
    assert len(default) == 1024 and len(default.classes) == 1000 and default[0][0].shape == (3, 224, 224)
    small = D.build_dataset("synthetic", "train", transform=T.imagenet_train_transform(), num_samples=8, image_size=16)
    assert len(small) == 8 and small[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("name,root,options,pattern", [
    pytest.param("cifar10", None, {}, "'cifar10'.*fashion_mnist, imagenet, synthetic", id="unknown-name"),
    pytest.param("synthetic", None, {"batch_size": 4}, "batch_size.*num_samples", id="unknown-option"),
    pytest.param("imagenet", None, {}, "needs root", id="imagenet-without-root"),
])
def test_build_dataset_rejects_bad_arguments(name, root, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        D.build_dataset(name, "train", root, **options)


@pytest.mark.parametrize("name,transform,options", [
    ("imagenet", T.imagenet_eval_transform(72, 64), {}),
    ("fashion_mnist", T.small_eval_transform(), {}),
    ("synthetic", None, {"num_samples": 4, "image_size": 8}),
])
def test_datasets_survive_pickling(tmp_path, name, transform, options):
    # spawn-started DataLoader workers receive the dataset pickled
    make_image_folder(tmp_path, "train", CLASSES)
    write_fashion_mnist(tmp_path, "train", 3)
    dataset = D.build_dataset(name, "train", tmp_path, transform, skip_corrupt=True, **options)
    clone = pickle.loads(pickle.dumps(dataset))
    (x, y), (x2, y2) = dataset[1], clone[1]
    assert len(clone) == len(dataset) and torch.equal(x, x2) and y == y2


# ---------------------------------------------------------------------------------------------- transforms

def _expected_lighting_std(std):
    eigval, eigvec = torch.tensor(T.IMAGENET_PCA_EIGVAL), torch.tensor(T.IMAGENET_PCA_EIGVEC)
    return std * (eigvec * eigval).square().sum(dim=1).sqrt()


def test_lighting_has_zero_mean_and_pca_spread():
    torch.manual_seed(0)
    draws = 20000
    images = torch.rand(draws, 3, 2, 2)
    shift = T.Lighting(0.1)(images) - images
    per_image = shift[..., 0, 0]
    assert torch.allclose(shift, per_image[..., None, None].expand_as(shift), atol=1e-6)  # one offset per image
    expected = _expected_lighting_std(0.1)
    assert (per_image.mean(dim=0).abs() < 5 * expected / draws**0.5).all()
    torch.testing.assert_close(per_image.std(dim=0), expected, rtol=0.03, atol=0)
    single = torch.rand(3, 5, 5)
    assert not torch.equal(T.Lighting(0.1)(single), single)


def test_lighting_is_a_no_op_at_std_zero():
    image = torch.rand(3, 8, 8)
    assert torch.equal(T.Lighting(0.0)(image), image)


@pytest.mark.parametrize("image,error", [
    pytest.param(torch.rand(1, 8, 8), ValueError, id="grayscale"),
    pytest.param(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), TypeError, id="uint8"),
    pytest.param(Image.new("RGB", (8, 8)), TypeError, id="pil"),
])
def test_lighting_rejects_non_rgb_float_tensors(image, error):
    with pytest.raises(error, match="Lighting expects"):
        T.Lighting(0.1)(image)


@pytest.mark.parametrize("mode,size,mean,std", [
    pytest.param("L", 28, T.FASHION_MNIST_MEAN, T.FASHION_MNIST_STD, id="gray-28"),
    pytest.param("RGB", 32, T.IMAGENET_MEAN, T.IMAGENET_STD, id="rgb-32"),
])
def test_small_transforms(mode, size, mean, std):
    image = Image.new(mode, (size, size), "white")
    expected = TF.normalize(TF.to_tensor(image), mean, std)
    evaluated = T.small_eval_transform(mean, std)(image)
    assert torch.equal(evaluated, expected)

    torch.manual_seed(0)
    train = T.small_train_transform(size, 4, mean, std)
    outputs = [train(image) for _ in range(20)]
    assert all(out.shape == expected.shape for out in outputs)
    # zero padding enters the crop: some pixels become normalized black
    padded = torch.tensor([-m / s for m, s in zip(mean, std)])[:, None, None]
    assert any(torch.isclose(out, padded.expand_as(out)).any() for out in outputs)


def test_small_transforms_reject_mismatched_stats():
    with pytest.raises(ValueError, match="one value per channel"):
        T.small_eval_transform((0.5, 0.5, 0.5), (0.2,))


# ---------------------------------------------------------------------------------------------- the authors' pipeline

def _opencv_linear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR written out in float64: sample at (dst + 0.5) * scale - 0.5, clamped to the image."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, wy = taps(image.shape[1], out_h)
    x0, x1, wx = taps(image.shape[2], out_w)
    img = image.astype(np.float64)
    rows = img[:, y0] * (1 - wy)[None, :, None] + img[:, y1] * wy[None, :, None]
    out = rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx
    return out  # unrounded


@pytest.mark.parametrize("size", [(224, 224), (37, 53), (256, 341), (5, 3)], ids=["up", "down", "eval-like", "tiny"])
def test_bilinear_resize_is_within_a_gray_level_of_the_linear_formula(size):
    image = torch.randint(0, 256, (3, 61, 90), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = T.bilinear_resize(image, size).numpy().astype(np.float64)
    exact = _opencv_linear_reference(image.numpy(), *size)
    assert ours.shape == (3, *size)
    # OpenCV's fixed point (weights in 1/2048, truncations) moves a value by less than one gray level
    assert np.abs(ours - exact).max() < 1.0


# cv2.resize(image, (3, 4), interpolation=cv2.INTER_LINEAR) of the image below, computed with opencv-python-headless
# 5.1.0 (channels first); scripts/measure_opencv_resize.py compares whole photos.
_CV2_SOURCE = (np.arange(6 * 7).reshape(6, 7, 1) * 37 + np.array([0, 91, 180])) % 256
_CV2_RESIZED_4x3 = [
    [[25, 112, 198], [30, 116, 203], [34, 121, 207], [39, 125, 212]],
    [[116, 203, 33], [121, 207, 38], [125, 212, 42], [130, 216, 47]],
    [[205, 36, 122], [210, 40, 127], [214, 45, 131], [219, 49, 136]],
]
_CV2_RESIZED_9x11_FIRST_ROWS = [  # rows 0 and 1 of the (11, 9) upscale, channel 2: the border rows' last bit
    [180, 197, 220, 244, 174, 35, 58, 82, 106, 129, 146],
    [182, 198, 210, 152, 94, 37, 60, 84, 107, 131, 148],
]


def test_bilinear_resize_matches_opencv_values():
    image = torch.from_numpy(_CV2_SOURCE.astype(np.uint8)).permute(2, 0, 1).contiguous()
    assert T.bilinear_resize(image, (4, 3)).tolist() == _CV2_RESIZED_4x3
    assert T.bilinear_resize(image, (9, 11))[2, :2].tolist() == _CV2_RESIZED_9x11_FIRST_ROWS


def test_bilinear_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="CxHxW uint8"):
        T.bilinear_resize(torch.zeros(3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="must be positive"):
        T.bilinear_resize(torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 2))


def test_square_random_crop_is_square_and_inside_when_it_fits():
    torch.manual_seed(0)
    crop = T.SquareRandomCrop(224)
    for _ in range(50):
        top, left, side = crop.window(300, 400)
        assert 0 <= top <= 300 - side and 0 <= left <= 400 - side
        assert round(np.sqrt(0.08 * 300 * 400)) <= side <= 300
    assert crop(torch.full((3, 300, 400), 7, dtype=torch.uint8)).shape == (3, 224, 224)


def test_square_random_crop_zero_pads_a_square_larger_than_the_image():
    # A 10 x 200 image: every square of area >= 0.08 * 2000 has a side >= 13 > 10, so all attempts fail and the
    # last square is used, its rows outside the image black.
    torch.manual_seed(0)
    crop = T.SquareRandomCrop(size=40, attempts=10)
    image = torch.full((3, 10, 200), 200, dtype=torch.uint8)
    torch.manual_seed(1)
    top, left, side = crop.window(10, 200)
    assert side > 10 and 10 - side <= top <= 0 and 0 <= left <= 200 - side
    torch.manual_seed(1)
    out = T.SquareRandomCrop(size=side)(image)  # no resize: the padded square itself
    assert out.shape == (3, side, side)
    inside = slice(-top, -top + 10)
    assert torch.all(out[:, inside] == 200)
    outside = torch.ones(side, dtype=torch.bool)
    outside[inside] = False
    assert outside.any() and torch.all(out[:, outside] == 0)


def test_authors_input_is_bgr_0_255_without_normalization():
    rgb = Image.new("RGB", (300, 260), (250, 128, 3))
    for transform in (T.authors_eval_transform(), T.authors_train_transform(lighting_std=0.0)):
        x = transform(rgb)
        assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
        assert torch.equal(x, torch.tensor([3.0, 128.0, 250.0])[:, None, None].expand(3, 224, 224))


def test_authors_lighting_clips_to_0_255_and_truncates():
    image = torch.tensor([0, 255, 128], dtype=torch.uint8)[:, None, None].expand(3, 4, 4).contiguous()
    torch.manual_seed(0)
    out = T.ClippedLighting(50.0)(image)  # a huge shift: channels saturate
    torch.manual_seed(0)
    alpha = torch.randn(3, dtype=torch.float64) * 50.0  # the same draw, spelled out
    shift = torch.tensor(T.IMAGENET_PCA_EIGVEC, dtype=torch.float64) @ (alpha * torch.tensor(T.IMAGENET_PCA_EIGVAL, dtype=torch.float64))
    expected = np.clip((image.double() / 255 + shift[:, None, None]).numpy() * 255, 0, 255).astype(np.uint8)
    assert out.dtype == torch.uint8 and ((out == 0).any() or (out == 255).any())
    assert np.abs(out.numpy().astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 at the truncation


@pytest.mark.parametrize("shape,expected", [((260, 300), (256, 295)), ((500, 375), (341, 256)), ((256, 256), (256, 256))])
def test_authors_eval_resize_rounds_the_longer_side(shape, expected):
    image = torch.zeros((3, *shape), dtype=torch.uint8)
    assert tuple(T.ShorterSideResize(256)(image).shape[1:]) == expected


def test_imagenet_pipeline_choice():
    authors_train, authors_eval = T.imagenet_transforms("authors", 224, 256, 0.1)
    assert isinstance(authors_train.transforms[1], T.SquareRandomCrop)
    torchvision_train, _ = T.imagenet_transforms("torchvision", 224, 256, 0.1)
    assert isinstance(torchvision_train.transforms[0], torchvision.transforms.RandomResizedCrop)
    with pytest.raises(ValueError, match="unknown ImageNet pipeline 'caffe'"):
        T.imagenet_transforms("caffe", 224, 256, 0.1)
