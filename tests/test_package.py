"""The package boundary: `mabn` is a layer library on torch and torchvision alone, the trainers' machinery is
`mabn.engine`, and the checkout stands alone."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import mabn
from mabn.layers import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_ONLY = ("yaml", "tqdm", "tensorboard", "pycocotools", "matplotlib", "cls", "det", "mabn.engine")


def test_import_mabn_loads_nothing_of_the_engine_or_the_training_dependencies():
    # what mabn adds to what torch and torchvision import themselves (torch imports tqdm, for one)
    code = ("import sys, torch, torchvision; before = set(sys.modules); import mabn; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in %r or m.startswith('mabn.engine')))"
            % (TRAINING_ONLY,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_wheel_holds_only_mabn_and_requires_only_torch_and_torchvision(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ROOT],
                   check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("mabn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"mabn"}
    assert any(name.startswith("mabn/engine/") for name in names)  # installed, but only the train extra makes it usable
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = sorted(r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in requires if "extra ==" not in r)
    assert unconditional == ["torch", "torchvision"]
    train_extra = {r.split(";")[0].strip() for r in requires if "extra == \"train\"" in r}
    assert {"pyyaml", "tqdm", "tensorboard", "pycocotools"} <= {r.split("=")[0].split(">")[0] for r in train_extra}
    _assert_a_range_that_holds_the_pinned_versions([r for r in requires if "extra ==" not in r])


def _assert_a_range_that_holds_the_pinned_versions(requires):
    # pip install of the library must keep a user's torch: a range, which holds the project's own pins
    from packaging.requirements import Requirement

    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, version = line.strip().split("==")
                pins[name] = version
    assert set(pins) == {"torch", "torchvision"}
    for text in requires:
        requirement = Requirement(text)
        assert "==" not in str(requirement.specifier), text
        assert requirement.specifier.contains(pins[requirement.name]), (text, pins)


def test_nothing_in_the_repository_points_outside_it():
    outside = ("../" + "shared", "shared" + "/spec")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path) or name.endswith((".png", ".pth")):
            continue
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read()
        offenders += [f"{name}: {needle}" for needle in outside if needle in text]
    assert not offenders, offenders


# ----------------------------------------------------------------------------- the registry of norm types
def test_registry_knows_what_each_norm_type_can_do():
    mabn1d, mabn2d, mabn3d = mabn.MABN1d(4), mabn.MABN2d(4), mabn.MABN3d(4)
    bn, ours, brn, frozen = nn.BatchNorm2d(4), mabn.BatchNorm2d(4, norm_batch_size=2), mabn.BatchRenorm2d(4), FrozenBatchNorm2d(4)
    untracked, gn, ln = nn.BatchNorm2d(4, track_running_stats=False), nn.GroupNorm(2, 4), nn.LayerNorm(4)
    table = {
        "mabn1d": mabn1d, "mabn2d": mabn2d, "mabn3d": mabn3d, "bn": bn, "ours": ours, "brn": brn, "frozen": frozen,
        "untracked": untracked, "gn": gn, "ln": ln,
    }
    def having(predicate):
        return sorted(name for name, module in table.items() if predicate(module))
    assert having(registry.is_norm) == sorted(table)
    assert not registry.is_norm(nn.Conv2d(4, 4, 1))
    assert having(registry.uses_batch_statistics) == ["bn", "brn", "mabn1d", "mabn2d", "mabn3d", "ours", "untracked"]
    assert having(registry.has_running_statistics) == ["bn", "brn", "frozen", "mabn1d", "mabn2d", "mabn3d", "ours"]
    assert having(registry.learns_running_statistics) == ["bn", "brn", "mabn1d", "mabn2d", "mabn3d", "ours"]
    assert having(registry.is_foldable) == ["bn", "brn", "frozen", "mabn1d", "mabn2d", "mabn3d", "ours"]
    assert having(registry.has_sma_windows) == ["mabn1d", "mabn2d", "mabn3d"]
    assert having(registry.is_groupable) == ["brn", "mabn1d", "mabn2d", "mabn3d", "ours"]
    assert having(registry.converts_from) == ["bn", "frozen", "ours", "untracked"]
    assert not registry.converts_from(nn.BatchNorm1d(4))  # convert_model builds 2d norms
    assert registry.groupable_norms() == ["bn", "brn", "mabn"]
    assert isinstance(mabn1d, mabn.MovingAverageBatchNorm) and isinstance(mabn3d, mabn.MovingAverageBatchNorm)


def test_a_registered_norm_type_is_seen_everywhere(monkeypatch):
    class ScaleNorm(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x):
            return x * self.weight.view(1, -1, 1, 1)

    monkeypatch.setattr(registry, "_NORM_TYPES", dict(registry._NORM_TYPES))
    mabn.register_norm_type(ScaleNorm)
    assert registry.is_norm(ScaleNorm(3)) and not registry.is_foldable(ScaleNorm(3))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), ScaleNorm(3))
    optimizer_groups = [g for g in __import__("mabn.engine.solver", fromlist=["x"]).build_sgd(model, 0.1, 0.9, 1e-4, 0.0).param_groups]
    assert [len(g["params"]) for g in optimizer_groups] == [2, 1]  # conv weight + bias decayed, the norm's weight not


def test_the_recorder_records_every_batch_statistics_norm_and_not_frozen_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), mabn.MABN2d(4), FrozenBatchNorm2d(4), nn.Flatten(2), mabn.MABN1d(4),
                          nn.Unflatten(2, (1, 1, -1)), mabn.MABN3d(4), nn.GroupNorm(2, 4), nn.BatchNorm3d(4))
    assert mabn.batch_statistics.norm_layer_names(model) == ["1", "4", "6", "8"]


def test_estimator_state_and_config_are_built_by_name():
    """Swapping two adjacent switches in the layer would change an ablation silently: each field must carry the
    attribute of its own name."""
    layer = mabn.MABN2d(4, buffer_size=3, warmup_iters=7, renorm_warmup_iters=9, r_max=2.5, momentum=0.9, eps=1e-3,
                        forward_sma=False, backward_sma=True, reduced_stats=False, renorm=True)
    for name, value in layer._config()._asdict().items():
        assert value == getattr(layer, name), name
    for name, value in layer._state()._asdict().items():
        assert value is getattr(layer, name), name


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_momentum_means_what_each_norm_says(name):
    assert (mabn.option_meaning(name, "momentum") or "").startswith("the keep-rate" if name == "mabn" else "the update rate")
    assert mabn.option_meaning(name, "eps") is None
