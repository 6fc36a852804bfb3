"""mabn.transfer_state_dict: a state_dict saved with one norm loaded into a model built with another."""
import pytest
import torch
import torchvision
from torch import nn

import mabn
from mabn.transfer import IncompatibleStateDictError

from fixtures_weights import randomized_statistics


def test_torchvision_bn_weights_into_a_mabn_model_with_another_classifier():
    source = randomized_statistics(torchvision.models.resnet18().state_dict())
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=10), norm="mabn", conv="cen")
    report = mabn.transfer_state_dict(model, source, strict=lambda key: not key.startswith("fc."))

    layer, prefix = model.layer3[1].bn2, "layer3.1.bn2."
    torch.testing.assert_close(layer.running_var, source[prefix + "running_var"] + source[prefix + "running_mean"] ** 2)
    assert torch.equal(layer.weight, source[prefix + "weight"]) and torch.equal(model.layer3[1].conv2.weight, source["layer3.1.conv2.weight"])
    assert layer.num_steps.item() == 0 and not layer.window_var.any()  # MABN's warm-up starts again
    assert prefix + "running_var" in report.translated and prefix + "weight" in report.loaded
    assert prefix + "window_var" in report.reset and report.dropped[prefix + "num_batches_tracked"] == "training progress, restarted"
    assert report.new == ["fc.weight", "fc.bias"]
    assert report.skipped == {"fc.weight": "checkpoint shape (1000, 512), model (10, 512)",
                              "fc.bias": "checkpoint shape (1000,), model (10,)"}
    assert set(report.loaded) | set(report.translated) | set(report.reset) | set(report.new) == set(model.state_dict())
    summary = report.summary()
    assert "new (initialized here): fc.* (2 keys)" in summary
    assert "not loaded: fc.weight (checkpoint shape (1000, 512), model (10, 512))" in summary

    loss = model(torch.randn(2, 3, 32, 32)).square().mean()  # the loaded model trains
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad is not None


def test_every_pair_of_norm_forms():
    """BN -> BN keeps counters on request; MABN's second moment -> full-statistics MABN is mean 0, that variance;
    BN -> GN takes the affine part only; MABN -> BN is refused as a layer."""
    bn = randomized_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict())
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    mabn.transfer_state_dict(target, bn, strict=True, reset_progress=False)
    assert target[1].num_batches_tracked.item() == 37 and torch.equal(target[1].running_mean, bn["1.running_mean"])

    reduced = randomized_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4, buffer_size=2)).state_dict())
    full = nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4, buffer_size=2, reduced_stats=False))
    report = mabn.transfer_state_dict(full, reduced, strict=True, reset_progress=False)
    assert not full[1].running_mean.any() and torch.equal(full[1].running_var, reduced["1.running_var"])
    assert full[1].num_steps.item() == 0  # windows of another form of statistics are not carried over
    assert set(report.translated) == {"1.running_mean", "1.running_var"}

    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    report = mabn.transfer_state_dict(gn, bn, strict=True)
    assert torch.equal(gn[1].bias, bn["1.bias"]) and report.dropped["1.running_var"] == "GroupNorm keeps no running statistics"

    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(IncompatibleStateDictError) as error:
        mabn.transfer_state_dict(target, reduced, strict=True)
    assert "1.* (a MABN layer in the checkpoint, BatchNorm2d in the model" in str(error.value)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in untouched.items())  # refused: nothing loaded


def test_what_does_not_fit_is_listed_by_module_and_strict_refuses_it():
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    classifier = torchvision.models.resnet18().state_dict()
    report = mabn.transfer_state_dict(detector, classifier)
    assert report.loaded == [] and "backbone.* (" in report.summary()
    assert "layer1.* (no module named 'layer1' in the FasterRCNN)" in report.skipped_lines()
    with pytest.raises(IncompatibleStateDictError, match=r"key\(s\) of the detector missing from the checkpoint: backbone\.\* \("):
        mabn.transfer_state_dict(detector, classifier, strict=lambda key: key.startswith("backbone."), model_name="the detector")
