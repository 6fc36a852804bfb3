"""Mask R-CNN R50-FPN assembly (det/model.py) and ImageNet backbone loading (det/backbone_weights.py).

Images are tiny (64-96 px) and proposals few, so a full training step of ResNet-50 Mask R-CNN takes
about a second on two CPU cores.
"""
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

import mabn
from det.backbone_weights import load_backbone_weights
from det.model import build_mask_rcnn

from fixtures_weights import randomized_statistics

NUM_CLASSES = 3
TINY = dict(
    min_size=64,
    max_size=96,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
)
# Parameters whose gradient shows that the loss reaches each part of the model.
PROBES = (
    "backbone.body.conv1.weight",
    "backbone.body.layer4.2.conv3.weight",
    "backbone.fpn.inner_blocks.0.0.weight",
    "backbone.fpn.layer_blocks.3.0.weight",
    "rpn.head.conv.0.0.weight",
    "roi_heads.box_head.0.0.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.mask_head.0.0.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
)


def tiny_model(norm, **kwargs):
    torch.manual_seed(0)
    return build_mask_rcnn(NUM_CLASSES, norm=norm, **{**TINY, **kwargs})


def target(box, height, width, label):
    x1, y1, x2, y2 = box
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label]), "masks": masks}


def empty_target(height, width):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, height, width, dtype=torch.uint8)}


def batch():
    torch.manual_seed(1)
    images = [torch.rand(3, 80, 64), torch.rand(3, 64, 80)]
    return images, [target([10, 10, 50, 60], 80, 64, 1), target([5, 20, 60, 50], 64, 80, 2)]


def train_step(model, images, targets):
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses


def norm_after_each_conv(part):
    """``[(conv, module registered right after it)]`` for every 2d conv of ``part``: the norm that a
    Conv-Norm block (torchvision's Bottleneck, Conv2dNormActivation, downsample) applies to its output."""
    pairs = []
    for module in part.modules():
        children = list(module.children())
        pairs += [(child, children[i + 1] if i + 1 < len(children) else None) for i, child in enumerate(children) if isinstance(child, nn.Conv2d)]
    return pairs


def mabn_buffers(part):
    return {name: value.clone() for name, value in part.state_dict().items() if not name.endswith(("weight", "bias"))}


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("norm", ["bn", "brn", "gn", "mabn", "frozenbn", "syncbn"])
def test_train_step_reaches_every_part_and_eval_predicts_masks(norm):
    model = tiny_model(norm)
    images, targets = batch()
    losses = train_step(model, images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    for name, loss in losses.items():
        assert torch.isfinite(loss), f"{norm}: {name} = {loss}"
    params = dict(model.named_parameters())
    for name in PROBES:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{norm}: no gradient at {name}"

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        assert set(out) == {"boxes", "labels", "scores", "masks"}
        count = len(out["boxes"])
        assert out["masks"].shape == (count, 1, *image.shape[-2:])
        assert out["labels"].shape == out["scores"].shape == (count,)


def test_mask_head_without_positive_rois_trains_and_leaves_mabn_buffers_alone():
    model = tiny_model("mabn")
    images, _ = batch()
    mask_head_before = mabn_buffers(model.roi_heads.mask_head)
    # No ground truth at all: every sampled RoI is background, so the mask branch receives 0 RoIs.
    losses = train_step(model, images, [empty_target(80, 64), empty_target(64, 80)])
    assert losses["loss_mask"].item() == 0.0
    assert all(torch.isfinite(loss) for loss in losses.values())
    for name, value in mabn_buffers(model.roi_heads.mask_head).items():
        assert torch.equal(value, mask_head_before[name]), f"mask head buffer {name} changed without RoIs"
    assert model.backbone.body.bn1.num_steps.item() == 1  # the rest of the model did train
    assert model.roi_heads.box_head[0][1].num_steps.item() == 1


def test_eval_without_detections_returns_empty_masks():
    model = tiny_model("mabn").eval()
    model.roi_heads.score_thresh = 1.1  # no box survives: the mask head runs on 0 RoIs
    images, _ = batch()
    with torch.no_grad():
        outputs = model(images)
    assert [tuple(out["masks"].shape) for out in outputs] == [(0, 1, 80, 64), (0, 1, 64, 80)]


# ----------------------------------------------------------------------------------------- structure
def test_mabn_model_centers_every_conv_before_a_norm_and_keeps_the_rpn_plain():
    model = tiny_model("mabn")
    assert isinstance(model, MaskRCNN)
    assert (model.transform.min_size, model.transform.max_size) == ((64,), 96)
    parts = {"body": model.backbone.body, "fpn": model.backbone.fpn, "box head": model.roi_heads.box_head, "mask head": model.roi_heads.mask_head}
    expected_convs = {"body": 53, "fpn": 8, "box head": 4, "mask head": 4}
    for part_name, part in parts.items():
        pairs = norm_after_each_conv(part)
        assert len(pairs) == expected_convs[part_name]
        for conv, norm in pairs:
            assert isinstance(conv, mabn.CenConv2d), f"{part_name}: plain conv {conv}"
            assert isinstance(norm, mabn.MABN2d) and norm.num_features == conv.out_channels, f"{part_name}: {conv} not followed by MABN"
            assert conv.bias is None
    assert [type(m) for m in model.rpn.head.modules() if isinstance(m, nn.Conv2d)] == [nn.Conv2d] * 3
    assert not any(isinstance(m, (mabn.MABN2d, nn.BatchNorm2d)) for m in model.rpn.modules())
    predictor = model.roi_heads.mask_predictor
    assert type(predictor.mask_fcn_logits) is nn.Conv2d and type(predictor.conv5_mask) is nn.ConvTranspose2d
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    assert predictor.mask_fcn_logits.out_channels == NUM_CLASSES
    assert all(p.requires_grad for p in model.parameters())  # from scratch: nothing frozen


def test_body_and_rpn_keys_match_torchvision_maskrcnn_resnet50_fpn():
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).state_dict()
    ours = {"bn": tiny_model("bn").state_dict(), "mabn": tiny_model("mabn").state_dict()}

    def keys(state, prefix, parameters_only=False):
        norm_buffers = ("running_mean", "running_var", "num_batches_tracked", "num_steps", "num_norm_batches", "window_var", "window_psi")
        return {k for k in state if k.startswith(prefix) and not (parameters_only and k.endswith(norm_buffers))}

    assert keys(ours["bn"], "backbone.body.") == keys(reference, "backbone.body.")
    assert keys(ours["mabn"], "backbone.body.", True) == keys(reference, "backbone.body.", True)
    for state in ours.values():
        assert keys(state, "rpn.") == keys(reference, "rpn.")
        assert all(state[k].shape == reference[k].shape for k in keys(reference, "backbone.body.", True))


def test_frozenbn_baseline_has_no_norm_in_fpn_and_heads_unless_head_norm_names_one():
    model = tiny_model("frozenbn")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules()) == 53
    for part in (model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head):
        pairs = norm_after_each_conv(part)
        assert all(type(conv) is nn.Conv2d and conv.bias is not None and not isinstance(after, (nn.GroupNorm, FrozenBatchNorm2d)) for conv, after in pairs)
    with_gn = tiny_model("frozenbn", head_norm="gn")
    for part in (with_gn.backbone.fpn, with_gn.roi_heads.box_head, with_gn.roi_heads.mask_head):
        assert all(isinstance(after, nn.GroupNorm) and after.num_groups == 32 for _, after in norm_after_each_conv(part))


def test_trainable_backbone_layers_freezes_stem_and_early_stages_like_torchvision():
    model = tiny_model("bn", trainable_backbone_layers=3)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.body.conv1.weight" in frozen and "backbone.body.bn1.weight" in frozen
    assert "backbone.body.layer1.2.conv3.weight" in frozen
    assert all(name.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1")) for name in frozen)
    with pytest.raises(ValueError, match="range"):
        tiny_model("bn", trainable_backbone_layers=6)


def test_norm_options_reach_the_norms_that_accept_them():
    model = tiny_model("mabn", norm_options={"buffer_size": 4, "warmup_iters": 2, "norm_batch_size": 1})
    body_norm, fpn_norm = model.backbone.body.layer3[0].bn2, model.backbone.fpn.layer_blocks[0][1]
    box_norm, mask_norm = model.roi_heads.box_head[2][1], model.roi_heads.mask_head[3][1]
    for norm in (body_norm, fpn_norm, box_norm, mask_norm):
        assert (norm.buffer_size, norm.warmup_iters) == (4, 2)
    # one image per normalization batch in the body and FPN; the RoI heads normalize all their RoIs together
    assert body_norm.norm_batch_size == fpn_norm.norm_batch_size == 1
    assert box_norm.norm_batch_size is None and mask_norm.norm_batch_size is None
    losses = train_step(model, *batch())
    assert all(torch.isfinite(loss) for loss in losses.values())

    gn_body = tiny_model("gn", head_norm="bn", norm_options={"norm_batch_size": 1, "eps": 1e-3})
    assert gn_body.backbone.body.bn1.eps == 1e-3 and gn_body.backbone.fpn.inner_blocks[0][1].norm_batch_size == 1
    with pytest.raises(ValueError, match=r"norm_options \['buffer_size'\] are accepted by no norm in use.*'gn' accepts"):
        tiny_model("gn", norm_options={"buffer_size": 4})
    with pytest.raises(ValueError, match="unknown norm 'mabm'"):
        tiny_model("mabm")
    with pytest.raises(ValueError, match="builds \\['box_head'\\] itself"):
        tiny_model("bn", box_head=nn.Identity())

def test_an_option_two_norms_read_differently_is_refused_and_the_heads_take_their_own():
    """momentum is MABN's EMA keep-rate (0.98) but BRN's update rate (0.01): one value must not reach both."""
    with pytest.raises(ValueError, match=r"norm_options 'momentum' means different things to the norms in use "
                                         r"\(to 'mabn' the keep-rate .*; to 'brn' the update rate .*head_norm_options"):
        tiny_model("mabn", head_norm="brn", norm_options={"momentum": 0.98})
    model = tiny_model("mabn", head_norm="brn", norm_options={"momentum": 0.98, "buffer_size": 4},
                       head_norm_options={"momentum": 0.05, "norm_batch_size": 1})
    body_norm, fpn_norm, box_norm = model.backbone.body.layer1[0].bn1, model.backbone.fpn.layer_blocks[0][1], model.roi_heads.box_head[0][1]
    assert (body_norm.momentum, body_norm.buffer_size, body_norm.norm_batch_size) == (0.98, 4, None)
    assert (fpn_norm.momentum, fpn_norm.norm_batch_size) == (0.05, 1) and (box_norm.momentum, box_norm.norm_batch_size) == (0.05, None)
    same = tiny_model("mabn", norm_options={"buffer_size": 4}, head_norm_options={"buffer_size": 8})  # the head norm is the body's
    assert same.backbone.body.bn1.buffer_size == 4 and same.roi_heads.mask_head[0][1].buffer_size == 8
    with pytest.raises(ValueError, match=r"head_norm_options \['buffer_size'\] are not accepted by the head norm 'brn'"):
        tiny_model("mabn", head_norm="brn", head_norm_options={"buffer_size": 4})
    with pytest.raises(ValueError, match="head_norm_options \\['eps'\\] given, but the heads have no norm"):
        tiny_model("bn", head_norm="none", head_norm_options={"eps": 1e-3})



# ------------------------------------------------------------------------------------ backbone weights
def test_torchvision_resnet50_state_dict_loads_into_bn_model(tmp_path):
    source = randomized_statistics(torchvision.models.resnet50().state_dict())
    path = tmp_path / "resnet50.pth"
    torch.save(source, path)
    model = tiny_model("bn")
    report = load_backbone_weights(model, path)
    body = model.backbone.body.state_dict()
    for key, value in source.items():
        if key.startswith("fc."):
            assert "backbone.body." + key not in report["loaded"]
        elif key.endswith("num_batches_tracked"):  # a progress counter: restarts for detection
            assert body[key].item() == 0 and "backbone.body." + key in report["reset"]
        else:
            assert torch.equal(body[key], value), key
            assert "backbone.body." + key in report["loaded"]
    assert report["new"] and all(k.startswith(("backbone.fpn.", "rpn.", "roi_heads.")) for k in report["new"])
    assert "roi_heads.mask_head.0.1.running_var" in report["new"]
    assert set(report["loaded"]) | set(report["reset"]) | set(report["new"]) == set(model.state_dict())

    load_backbone_weights(model, source, reset_norm_state=False)
    assert model.backbone.body.bn1.num_batches_tracked.item() == 37


def test_bn_statistics_become_mabn_second_moments_and_gn_takes_the_affine_part():
    source = randomized_statistics(torchvision.models.resnet50().state_dict())
    model = tiny_model("mabn")
    load_backbone_weights(model, source)
    layer = model.backbone.body.layer2[1].bn3
    prefix = "layer2.1.bn3."
    torch.testing.assert_close(layer.running_var, source[prefix + "running_var"] + source[prefix + "running_mean"] ** 2)
    assert torch.equal(layer.weight, source[prefix + "weight"]) and layer.num_steps.item() == 0

    gn = tiny_model("gn")
    load_backbone_weights(gn, source)
    assert torch.equal(gn.backbone.body.layer2[1].bn3.bias, source[prefix + "bias"])


def mabn_classification_checkpoint():
    """What the classification trainer saves for a MABN + CenConv2d ResNet-50 trained under DDP."""
    torch.manual_seed(3)
    net = mabn.convert_model(torchvision.models.resnet50(), norm="mabn", conv="cen")
    state = randomized_statistics(net.state_dict())
    return {"model": {"module." + key: value for key, value in state.items()}, "epoch": 119}, state


def test_mabn_checkpoint_loads_into_mabn_model_and_restarts_its_warmup(tmp_path):
    checkpoint, state = mabn_classification_checkpoint()
    path = tmp_path / "mabn_resnet50.pth"
    torch.save(checkpoint, path)
    model = tiny_model("mabn")
    report = load_backbone_weights(model, str(path))
    body = model.backbone.body
    layer, prefix = body.layer3[4].bn2, "layer3.4.bn2."
    assert torch.equal(layer.running_var, state[prefix + "running_var"])
    assert torch.equal(layer.weight, state[prefix + "weight"]) and torch.equal(layer.bias, state[prefix + "bias"])
    assert torch.equal(body.layer3[4].conv2.weight, state["layer3.4.conv2.weight"])
    assert isinstance(body.layer3[4].conv2, mabn.CenConv2d)
    assert layer.num_steps.item() == 0 and layer.num_norm_batches.item() == 0
    assert not layer.window_var.any() and not layer.window_psi.any()
    assert "backbone.body.layer3.4.bn2.window_var" in report["reset"]
    assert "backbone.body.layer3.4.bn2.running_var" in report["loaded"]

    load_backbone_weights(model, checkpoint, reset_norm_state=False)
    assert torch.equal(layer.window_var, state[prefix + "window_var"]) and layer.num_steps.item() == 37
    losses = train_step(model, *batch())  # the loaded model trains
    assert all(torch.isfinite(loss) for loss in losses.values())


def test_corrupt_file_and_mismatched_keys_name_the_file_and_the_keys(tmp_path):
    model = tiny_model("bn")
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match=re.escape(str(corrupt))):
        load_backbone_weights(model, corrupt)
    with pytest.raises(RuntimeError, match="missing.pth"):
        load_backbone_weights(model, tmp_path / "missing.pth")

    source = torchvision.models.resnet50().state_dict()
    source["layer5.0.conv1.weight"] = torch.zeros(1)
    source["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del source["layer4.2.bn3.weight"]
    path = tmp_path / "mismatched.pth"
    torch.save({"model": source}, path)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(model, path)
    message = str(error.value)
    assert str(path) in message
    assert "layer5.0.conv1.weight (no module named 'layer5.0.conv1' in the ResNet body)" in message
    assert "conv1.weight (checkpoint shape (64, 3, 3, 3), model (64, 3, 7, 7))" in message
    assert "missing from the checkpoint: layer4.2.bn3.weight" in message

    checkpoint, _ = mabn_classification_checkpoint()
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1\.\* \(a MABN layer in the checkpoint, BatchNorm2d in the model"):
        load_backbone_weights(model, checkpoint)
    with pytest.raises(ValueError, match="holds no ResNet-50 state_dict"):
        load_backbone_weights(model, {"epoch": 3})
