"""The points of the authors' detection recipe (maskrcnn-benchmark) that torchvision does differently: each is an
option of det.model / det.train, torchvision's by default and the authors' in the paper rows, and each changes
what it should on a tiny input."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import fastrcnn_loss

from det.config import get_default_config
from det.model import build_mask_rcnn
from det.roi_heads import box_regression_loss
from det.rpn import TORCHVISION_BETA, best_over_batch, inside_image
from det.train import build_optimizer, check_config
from mabn.engine.config import ConfigError, load_config
from mabn.engine.distributed import DistInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import paper_tables  # noqa: E402

DET_ROWS = [row["name"] for row in paper_tables.rows("coco")]
TINY = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=40,
            rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=30, rpn_batch_size_per_image=64, box_batch_size_per_image=32)
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return build_mask_rcnn(3, **{"norm": "gn", **TINY, **kwargs})


def batch():
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    targets = []
    for box in ([10, 8, 50, 40], [2, 20, 70, 60]):
        masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
        masks[0, box[1]:box[3], box[0]:box[2]] = 1
        targets.append({"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]), "masks": masks})
    return images, targets


def rpn_inputs(model):
    """What the RPN sees of the tiny batch: the transformed images, the FPN features and the targets."""
    images, targets = batch()
    images, targets = model.transform(images, targets)
    return images, model.backbone(images.tensors), targets


# ----------------------------------------------------------------------------- the paper rows
@pytest.mark.parametrize("row", DET_ROWS)
def test_paper_rows_resolve_to_the_authors_values(row):
    cfg = load_config(get_default_config(), os.path.join(ROOT, "configs", "det", f"{row}.yaml"))
    check_config(cfg)
    m, s = cfg.MODEL, cfg.SOLVER
    assert (s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS, m.HEAD_INIT, m.INPUT_FORMAT) == (2.0, 0.0, "authors", "authors")
    assert (m.RPN.SMOOTH_L1_BETA, m.ROI_HEADS.SMOOTH_L1_BETA) == (1 / 9, 1.0)
    assert (m.RPN.POST_NMS_PER_BATCH, m.RPN.POST_NMS_TOP_N_TRAIN, m.RPN.STRADDLE_THRESH) == (True, 2000, 0.0)
    # from scratch the authors' MSRA layout; a fine-tune row takes the layout its ImageNet weights were trained in
    assert m.RESNETS.STRIDE_IN_1X1 == (not row.startswith("finetune"))


def test_defaults_are_torchvision_behaviour():
    cfg = get_default_config()
    m, s = cfg.MODEL, cfg.SOLVER
    assert (s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS, m.HEAD_INIT, m.RESNETS.STRIDE_IN_1X1) == (1.0, None, "torchvision", False)
    assert m.INPUT_FORMAT == "torchvision"
    assert (m.RPN.SMOOTH_L1_BETA, m.ROI_HEADS.SMOOTH_L1_BETA, m.RPN.POST_NMS_PER_BATCH, m.RPN.STRADDLE_THRESH) == (1 / 9, 1 / 9, False, -1.0)


@pytest.mark.parametrize("key", ["MODEL.RPN.SMOOTH_L1_BETA", "MODEL.ROI_HEADS.SMOOTH_L1_BETA", "SOLVER.BIAS_LR_FACTOR"])
def test_a_non_positive_beta_or_bias_factor_is_a_config_error_naming_the_key(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "' in the command line must be a finite number > 0, got 0"):
        load_config(get_default_config(), None, [key, "0"])


# ----------------------------------------------------------------------------- solver
def test_detection_optimizer_has_the_bias_group_at_twice_the_rate_without_decay():
    cfg = load_config(get_default_config(), os.path.join(ROOT, "configs", "det", "scratch_mabn_2.yaml"))
    model = tiny_model(norm_options={})
    optimizer, scheduler, _, lr = build_optimizer(cfg, CPU, model)
    assert lr == pytest.approx(0.02 * 2 / 16)
    others, biases = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    bias_names = {names[id(p)] for p in biases["params"]}
    assert bias_names == {name for name, p in model.named_parameters() if name.endswith(".bias") and p.requires_grad}
    assert "backbone.body.bn1.bias" in bias_names and "roi_heads.box_predictor.bbox_pred.bias" in bias_names
    assert not any(names[id(p)].endswith(".bias") for p in others["params"])
    assert (others["initial_lr"], others["weight_decay"]) == (lr, 1e-4)
    assert (biases["initial_lr"], biases["weight_decay"]) == (2 * lr, 0.0)
    assert biases["lr"] == pytest.approx(2 * others["lr"]) and others["lr"] == pytest.approx(lr / 3)  # warm-up start
    for _ in range(600):  # past the warm-up the schedule scales both groups alike
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, 2 * lr])


def test_sgd_applies_the_groups_weight_decay_and_rate():
    """One SGD step from zero gradient: a weight moves by lr * wd * w, a bias by 2 lr * 0 (not at all)."""
    cfg = load_config(get_default_config(), os.path.join(ROOT, "configs", "det", "scratch_bn_2.yaml"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.nn.init.ones_(model[0].bias)
    optimizer, _, _, lr = build_optimizer(cfg, CPU, model)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    model(torch.zeros(1, 3)).sum().mul(0).backward()
    optimizer.step()
    warm = optimizer.param_groups[0]["lr"]
    assert torch.allclose(model[0].weight, weight * (1 - warm * 1e-4)) and torch.equal(model[0].bias, bias)


# ----------------------------------------------------------------------------- backbone and heads
@pytest.mark.parametrize("stride_in_1x1,conv1_size", [(True, 8), (False, 16)])
def test_stride_placement_shows_in_the_output_of_layer2_0_conv1(stride_in_1x1, conv1_size):
    body = tiny_model(stride_in_1x1=stride_in_1x1).backbone.body.eval()
    sizes = {}
    for name in ("conv1", "conv2"):
        getattr(body.layer2[0], name).register_forward_hook(lambda m, i, o, name=name: sizes.update({name: o.shape[-1]}))
    with torch.no_grad():
        out = body(torch.rand(1, 3, 64, 64))
    assert (sizes["conv1"], sizes["conv2"]) == (conv1_size, 8)  # 1x1 strided, or 3x3 strided: layer2 ends at 1/8
    assert [out[k].shape[-1] for k in out] == [16, 8, 4, 2]


def test_authors_options_keep_the_torchvision_state_dict():
    authors = dict(stride_in_1x1=True, head_init="authors", rpn_smooth_l1_beta=1 / 9, box_smooth_l1_beta=1.0,
                   rpn_post_nms_per_batch=True, rpn_straddle_thresh=0.0, input_format="authors")
    plain, recipe = tiny_model().state_dict(), tiny_model(**authors).state_dict()
    assert list(plain) == list(recipe) and all(plain[k].shape == recipe[k].shape for k in plain)


def test_authors_input_format_is_bgr_0_255_minus_the_pixel_mean():
    torch.manual_seed(2)
    image = torch.rand(3, 6, 7)  # what the data pipeline gives: RGB in [0, 1]
    authors = tiny_model(input_format="authors").transform.normalize(image)
    mean_bgr = torch.tensor([102.9801, 115.9465, 122.7717])[:, None, None]
    assert torch.allclose(authors, torch.stack([image[2], image[1], image[0]]) * 255 - mean_bgr, atol=1e-4)
    # torchvision's: the ImageNet mean / std on RGB, untouched
    imagenet = (image - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(tiny_model().transform.normalize(image), imagenet, atol=1e-6)
    with pytest.raises(ValueError, match="input_format must be one of"):
        tiny_model(input_format="bgr")


def test_authors_head_init_statistics():
    heads = tiny_model(head_init="authors").roi_heads
    convs = [m for m in heads.box_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)  # a norm follows each
    assert all(c.weight.std().item() == pytest.approx(0.01, rel=0.01) and abs(c.weight.mean().item()) < 1e-4 for c in convs)
    fc = next(m for m in heads.box_head.modules() if isinstance(m, torch.nn.Linear))
    bound = math.sqrt(3 / fc.in_features)  # Kaiming-uniform with a = 1: gain 1
    assert fc.weight.abs().max().item() <= bound and fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    predictor = heads.box_predictor
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    mask_convs = [m for m in list(heads.mask_head.modules()) + list(heads.mask_predictor.modules())
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for conv in mask_convs:  # Kaiming-normal, fan-out: std sqrt(2 / (out_channels * k * k))
        fan_out = conv.weight.shape[1 if isinstance(conv, torch.nn.ConvTranspose2d) else 0] * conv.weight[0, 0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    biases = [fc.bias, predictor.cls_score.bias, predictor.bbox_pred.bias] + [c.bias for c in mask_convs if c.bias is not None]
    assert len(biases) == 5 and all(torch.count_nonzero(b) == 0 for b in biases)
    # torchvision's box head convs are Kaiming-normal (fan-out) and its mask predictor's biases PyTorch's default
    plain = tiny_model().roi_heads
    assert plain.box_head[0][0].weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert torch.count_nonzero(plain.mask_predictor.mask_fcn_logits.bias) > 0


# ----------------------------------------------------------------------------- losses and sampling
def test_box_regression_loss_at_torchvision_beta_is_torchvisions_and_beta_changes_it():
    torch.manual_seed(0)
    labels = [torch.tensor([0, 2, 1, 0]), torch.tensor([1, 0])]
    targets = [torch.randn(4, 4) * 0.3, torch.randn(2, 4) * 0.3]
    logits, regression = torch.randn(6, 3), torch.randn(6, 12) * 0.3
    _, reference = fastrcnn_loss(logits, regression, labels, targets)
    assert torch.allclose(box_regression_loss(regression, labels, targets, TORCHVISION_BETA), reference)
    # by hand at beta 1: foreground rows 1, 2 and 4, each its own class's deltas; 0.5 x^2 below 1, |x| - 0.5 above
    deltas = regression.reshape(6, 3, 4)[[1, 2, 4], [2, 1, 1]] - torch.cat(targets)[[1, 2, 4]]
    by_hand = torch.where(deltas.abs() < 1, 0.5 * deltas ** 2, deltas.abs() - 0.5).sum() / 6
    assert torch.allclose(box_regression_loss(regression, labels, targets, 1.0), by_hand)


def test_box_head_beta_changes_only_the_box_loss():
    images, targets = batch()
    losses = {}
    for beta in (TORCHVISION_BETA, 1.0):
        model = tiny_model(box_smooth_l1_beta=beta).train()
        torch.manual_seed(2)
        losses[beta] = model(images, targets)
    for key in losses[1.0]:
        same = torch.equal(losses[1.0][key], losses[TORCHVISION_BETA][key])
        assert same == (key != "loss_box_reg"), key
    assert losses[1.0]["loss_box_reg"] > 0
    # a box predictor swapped in after building (torchvision's fine-tuning idiom) is read the same way
    model.roi_heads.box_predictor = FastRCNNPredictor(1024, 3)
    assert torch.isfinite(model(images, targets)["loss_box_reg"])


def test_rpn_beta_reimplementation_matches_torchvision_and_changes_the_rpn_box_loss():
    model = tiny_model().train()
    images, features, targets = rpn_inputs(model)
    results = {}
    for beta in (TORCHVISION_BETA, float(np.nextafter(TORCHVISION_BETA, 1)), 1.0):  # torchvision's code, ours, ours
        model.rpn.smooth_l1_beta = beta
        torch.manual_seed(3)
        results[beta] = model.rpn(images, features, targets)[1]
    torchvision_losses, ours_at_1_9, ours_at_1 = results.values()
    for key in torchvision_losses:
        assert torch.allclose(ours_at_1_9[key], torchvision_losses[key], rtol=1e-6)
    assert torch.equal(ours_at_1["loss_objectness"], torchvision_losses["loss_objectness"])
    assert not torch.allclose(ours_at_1["loss_rpn_box_reg"], torchvision_losses["loss_rpn_box_reg"])


def test_best_over_batch_keeps_the_top_scores_of_the_batch_split_by_image():
    boxes = [torch.arange(8.0).reshape(2, 4), torch.arange(12.0).reshape(3, 4)]
    scores = [torch.tensor([0.9, 0.2]), torch.tensor([0.8, 0.7, 0.1])]
    kept_boxes, kept_scores = best_over_batch(boxes, scores, 3)
    assert [s.tolist() for s in kept_scores] == [[pytest.approx(0.9)], [pytest.approx(0.8), pytest.approx(0.7)]]
    assert torch.equal(kept_boxes[0], boxes[0][:1]) and torch.equal(kept_boxes[1], boxes[1][:2])
    assert best_over_batch(boxes, scores, 5) == (boxes, scores)


@pytest.mark.parametrize("per_batch", [False, True])
def test_post_nms_top_n_counts_over_the_batch_or_per_image(per_batch):
    model = tiny_model(rpn_post_nms_per_batch=per_batch).train()
    images, features, targets = rpn_inputs(model)
    with torch.no_grad():
        proposals = model.rpn(images, features, targets)[0]
    counts = [len(p) for p in proposals]
    if per_batch:
        assert sum(counts) == 40  # TINY's POST_NMS_TOP_N_TRAIN over the batch
    else:
        assert counts == [40, 40]  # per image
    model.eval()  # inference is per image either way
    with torch.no_grad():
        assert [len(p) for p in model.rpn(images, features)[0]] == [30, 30]


def test_straddling_anchors_are_left_out_of_the_rpn_loss():
    model = tiny_model().train()
    images, features, targets = rpn_inputs(model)
    anchors = model.rpn.anchor_generator(images, list(features.values()))
    labels = {}
    for thresh in (-1.0, 0.0):
        model.rpn.straddle_thresh = thresh
        model.rpn._image_sizes = images.image_sizes  # what forward hands to assign_targets_to_anchors
        labels[thresh] = model.rpn.assign_targets_to_anchors(anchors, targets)[0]
    for image, (height, width) in enumerate(images.image_sizes):
        inside = inside_image(anchors[image], height, width, 0.0)
        assert 0 < inside.sum() < len(inside)
        assert (labels[0.0][image][~inside] == -1).all() and (labels[-1.0][image][~inside] >= 0).any()
        assert torch.equal(labels[0.0][image][inside], labels[-1.0][image][inside])
    # and the sampler never draws them, so neither RPN loss sees them
    torch.manual_seed(4)
    positives, negatives = model.rpn.fg_bg_sampler(labels[0.0])
    for image, (height, width) in enumerate(images.image_sizes):
        drawn = positives[image].bool() | negatives[image].bool()
        assert drawn.any() and inside_image(anchors[image][drawn], height, width, 0.0).all()


def test_image_sizes_reach_the_straddle_check_through_forward():
    model = tiny_model(rpn_straddle_thresh=0.0).train()
    images, features, targets = rpn_inputs(model)
    captured = {}
    assign = model.rpn.assign_targets_to_anchors

    def spy(anchors, targets_):
        labels, matched = assign(anchors, targets_)
        captured["labels"], captured["anchors"] = labels, anchors
        return labels, matched

    model.rpn.assign_targets_to_anchors = spy
    model.rpn(images, features, targets)
    for labels, anchors, (height, width) in zip(captured["labels"], captured["anchors"], images.image_sizes):
        assert (labels[~inside_image(anchors, height, width, 0.0)] == -1).all()
    assert not hasattr(model.rpn, "_image_sizes")  # not kept past the call
