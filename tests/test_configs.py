"""Every config of configs/ loads, states the published recipe, builds its model and trains one step."""
import glob
import os
import sys

import pytest
import torch
import yaml

import mabn
from cls.config import get_default_config as cls_defaults
from cls.train import build_model, check_config
from det.config import get_default_config as det_defaults
from det.train import build_model as build_detector
from det.train import check_config as check_det_config
from mabn.engine.config import load_config
from mabn.engine.solver import build_sgd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import paper_tables  # noqa: E402  (the paper's rows: configs/paper_tables.yaml)

CLS_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "cls", "**", "*.yaml"), recursive=True))
DET_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "det", "**", "*.yaml"), recursive=True))
DET_ROWS = {row["name"]: row["norm"] for row in paper_tables.rows("coco")}  # the paper's COCO table (+ GN): norm
IMAGENET_ROWS = [row["name"] for row in paper_tables.rows("imagenet_batch") + paper_tables.rows("imagenet_baselines")]
FASHION_ROWS = [os.path.basename(row["name"]) for row in paper_tables.rows("fashion_mnist")]
TABLE_ROWS = [row for table in paper_tables.load()["tables"].values() for row in table["rows"] if "config" in row]


def _rel(path):
    return os.path.relpath(path, os.path.join(ROOT, "configs"))


def _leaves(values, prefix=""):
    for key, value in values.items():
        if key == "_BASE_":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _lookup(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return KeyError
        node = node[part]
    return node


def test_every_row_of_the_paper_has_a_config():
    names = {_rel(p) for p in CLS_CONFIGS}
    for row in IMAGENET_ROWS:
        assert f"cls/{row}.yaml" in names
    assert len([n for n in names if n.startswith("cls/ablation/")]) == 16  # 2^4 switch combinations
    for row in FASHION_ROWS:
        assert f"cls/fashion_mnist/{row}.yaml" in names


def _is_row_config(path):
    """Whether a config is a row of a table: not a base that rows share, nor the CPU demo on generated
    shapes (configs/det/shapes/), which stands in for no row of the paper."""
    return not os.path.basename(path).endswith("base.yaml") and not _rel(path).startswith("det/shapes/")


def test_the_tables_file_and_the_row_configs_match():
    listed = {row["config"] for row in TABLE_ROWS}
    missing = sorted(c for c in listed if not os.path.isfile(os.path.join(ROOT, "configs", c)))
    assert not missing, f"configs/paper_tables.yaml names configs that do not exist: {missing}"
    unlisted = sorted(_rel(p) for p in CLS_CONFIGS + DET_CONFIGS if _is_row_config(p) and _rel(p) not in listed)
    assert not unlisted, f"configs that are no row of configs/paper_tables.yaml: {unlisted}"


@pytest.mark.parametrize("row", [r for r in TABLE_ROWS if r["config"].startswith("cls/") and "switches" not in r], ids=lambda r: r["name"])
def test_classification_rows_normalize_as_the_tables_file_says(row):
    cfg = load_config(cls_defaults(), os.path.join(ROOT, "configs", row["config"]))
    assert cfg.MODEL.NORM == row["norm"]
    b = row.get("b")
    full_batch = b is None or b == cfg.DATA.BATCH_SIZE  # the default: normalize over the whole batch
    assert cfg.MODEL.NORM_BATCH_SIZE in ((None, b) if full_batch else (b,))


@pytest.mark.parametrize("row", paper_tables.rows("imagenet_ablation"), ids=lambda r: r["name"])
def test_ablation_configs_set_the_switches_of_their_row(row):
    table = paper_tables.table("imagenet_ablation")
    cfg = load_config(cls_defaults(), os.path.join(ROOT, "configs", row["config"]))
    assert (cfg.MODEL.NORM, cfg.MODEL.NORM_BATCH_SIZE) == (table["norm"], table["b"])
    assert {switch: cfg.MODEL.NORM_OPTIONS.get(switch, True) for switch in table["switches"]} == row["switches"]


@pytest.mark.parametrize("path", CLS_CONFIGS + DET_CONFIGS, ids=_rel)
def test_config_does_not_restate_its_base(path):
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if "_BASE_" not in values:
        return
    defaults = det_defaults if _rel(path).startswith("det/") else cls_defaults
    base = load_config(defaults(), os.path.join(os.path.dirname(path), values["_BASE_"]))
    for key, value in _leaves(values):
        inherited = _lookup(base, key)
        assert inherited is KeyError or inherited != value, f"{_rel(path)} repeats {key} = {value!r} from its base"


@pytest.mark.parametrize("path", CLS_CONFIGS, ids=_rel)
def test_config_builds_its_model_and_takes_a_training_step(path):
    cfg = load_config(cls_defaults(), path)
    check_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_sgd(model, 0.01, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.NORM_WEIGHT_DECAY)
    size = 28 if cfg.MODEL.ARCH == "resnet20" else 32  # tiny input, the real batch (b must divide it)
    x = torch.randn(cfg.DATA.BATCH_SIZE, cfg.MODEL.IN_CHANNELS, size, size)
    y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (cfg.DATA.BATCH_SIZE,))
    before = model.fc.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=cfg.SOLVER.LABEL_SMOOTHING)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


def _norm_layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("row", IMAGENET_ROWS)
def test_imagenet_configs_state_the_published_recipe(row):
    cfg = load_config(cls_defaults(), os.path.join(ROOT, "configs", "cls", f"{row}.yaml"))
    s, d = cfg.SOLVER, cfg.DATA
    assert (cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES, d.DATASET, d.BATCH_SIZE) == ("resnet50", 1000, "imagenet", 32)
    assert (s.BASE_LR, s.REFERENCE_BATCH, s.MOMENTUM, s.WEIGHT_DECAY, s.NORM_WEIGHT_DECAY) == (0.1, 256, 0.9, 1e-4, None)
    assert (s.EPOCHS, s.LR_SCHEDULE, s.LR_STEPS, s.LR_GAMMA, s.WARMUP_EPOCHS, s.LABEL_SMOOTHING) == (120, "step", [30, 60, 90], 0.1, 0.0, 0.1)
    assert (d.CROP_SIZE, d.RESIZE_SIZE, d.LIGHTING_STD) == (224, 256, 0.1)
    norm, _, b = row.partition("_b")
    assert cfg.MODEL.NORM == norm
    model = build_model(cfg)
    if norm in ("gn", "ln", "in"):
        assert cfg.MODEL.NORM_BATCH_SIZE is None
        groups = {"gn": 32, "ln": 1}
        for layer in _norm_layers(model, torch.nn.GroupNorm):
            assert layer.num_groups == groups.get(norm, layer.num_channels)
        return
    b = int(b)
    assert cfg.MODEL.NORM_BATCH_SIZE in ((b,) if b < 32 else (None, 32))
    if norm == "mabn":
        layers = _norm_layers(model, mabn.MABN2d)
        assert len(layers) == 53 and cfg.MODEL.CENTERED_CONVS
        assert all(type(m) is not torch.nn.Conv2d for m in model.modules())  # every conv is weight-centered
        for layer in layers:
            assert (layer.buffer_size, layer.norm_batch_size, layer.momentum, layer.r_max) == (32 // b, b, 0.98, 5.0)
            assert (layer.warmup, layer.warmup_iters, layer.renorm_warmup_iters) == ("classification", 2, 99)
    elif norm == "brn":
        layers = _norm_layers(model, mabn.BatchRenorm2d)
        assert len(layers) == 53
        for layer in layers:
            assert (layer.r_max, layer.d_max, layer.warmup_steps, layer.d_max_steps, layer.r_max_steps) == (3.0, 5.0, 5000, 25000, 40000)
    else:
        assert len(_norm_layers(model, mabn.BatchNorm2d)) == 53


def test_ablation_rows_span_the_four_switches():
    seen = set()
    for path in glob.glob(os.path.join(ROOT, "configs", "cls", "ablation", "*.yaml")):
        cfg = load_config(cls_defaults(), path)
        o = cfg.MODEL.NORM_OPTIONS
        switches = (o.get("forward_sma", True), o.get("backward_sma", True), o.get("reduced_stats", True), o.get("renorm", True))
        assert cfg.MODEL.CENTERED_CONVS == switches[2], "centered convs go with the reduced statistics"
        assert (cfg.MODEL.NORM, cfg.MODEL.NORM_BATCH_SIZE, o["buffer_size"]) == ("mabn", 2, 16)
        seen.add(switches)
    assert len(seen) == 16


# ----------------------------------------------------------------------------- detection
def test_every_coco_row_has_a_config():
    names = {_rel(p) for p in DET_CONFIGS}
    for row in DET_ROWS:
        assert f"det/{row}.yaml" in names


@pytest.mark.parametrize("row,norm", list(DET_ROWS.items()))
def test_coco_configs_state_the_published_recipe(row, norm):
    cfg = load_config(det_defaults(), os.path.join(ROOT, "configs", "det", f"{row}.yaml"))
    check_det_config(cfg)
    s, m = cfg.SOLVER, cfg.MODEL
    assert (s.MAX_ITER, s.STEPS, s.GAMMA, s.BASE_LR, s.REFERENCE_BATCH, s.IMS_PER_GPU) == (180000, [120000, 160000], 0.1, 0.02, 16, 2)
    assert (s.WARMUP_ITERS, s.MOMENTUM, s.WEIGHT_DECAY, s.NORM_WEIGHT_DECAY) == (500, 0.9, 1e-4, None)
    assert s.WARMUP_FACTOR == pytest.approx(1 / 3)
    assert (m.MIN_SIZE, m.MAX_SIZE, m.ROI_HEADS.BATCH_SIZE_PER_IMAGE, m.RPN.POST_NMS_TOP_N_TEST) == (800, 1333, 512, 1000)
    assert (m.NORM, m.TRAINABLE_BACKBONE_LAYERS, m.HEAD_NORM) == (norm, 5, None)  # norm everywhere, nothing frozen
    assert (cfg.DATA.TRAIN_IMAGES, cfg.DATA.VAL_IMAGES) == (["train2017"], "val2017")
    assert bool(m.BACKBONE_WEIGHTS) == row.startswith("finetune")
    if norm == "mabn":
        assert m.CENTERED_CONVS and m.NORM_OPTIONS["buffer_size"] == 16  # b = 2 images per GPU, m = 16


def _detection_step(cfg):
    torch.manual_seed(0)
    model = build_detector(cfg, 3)
    optimizer = build_sgd(model, 0.001, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.NORM_WEIGHT_DECAY)
    images = [torch.rand(3, 64, 80) for _ in range(cfg.SOLVER.IMS_PER_GPU)]
    mask = torch.zeros(1, 64, 80, dtype=torch.uint8)
    mask[0, 10:40, 20:60] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([1]), "masks": mask} for _ in images]
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("path", DET_CONFIGS, ids=_rel)
def test_det_config_builds_its_model_and_takes_a_training_step(path):
    cfg = load_config(det_defaults(), path)
    check_det_config(cfg)
    # tiny images and few RoIs; fine-tune rows without their (absent) ImageNet weights
    small = load_config(det_defaults(), path, ["MODEL.MIN_SIZE", "64", "MODEL.MAX_SIZE", "96", "MODEL.BACKBONE_WEIGHTS", "",
                                               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOP_N_TRAIN", "100"])
    assert torch.isfinite(_detection_step(small))
