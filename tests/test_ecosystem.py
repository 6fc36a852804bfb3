"""Misuse warnings, folding to pure torch, and MABN seen by code written for BatchNorm (issue 12, items 2, 4-6)."""
import copy
import logging
import warnings

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn

import mabn
from mabn.layers import fused
from mabn.norm_inputs import CONCATENATION, CONV, NormInput, norm_inputs

MABN_OPTIONS = {"buffer_size": 2, "warmup_iters": 1, "renorm_warmup_iters": 1}


def _centered(model):
    return {name for name, m in model.named_modules() if isinstance(m, mabn.CenConv2d)}


# ----------------------------------------------------------------------------- convert_model(conv="cen")
class _SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, 2, 1)
        self.fc2 = nn.Conv2d(2, c, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def test_cen_centers_only_the_convs_a_norm_follows():
    model = nn.Sequential(_SqueezeExcite(4), nn.Conv2d(4, 3, 1))
    mabn.convert_model(model, norm="mabn", conv="cen")
    assert _centered(model) == {"0.conv"}
    with_group_norm = mabn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)), conv="cen")
    assert _centered(with_group_norm) == {"0"}  # weight centering before any norm (GN + WS) is the user's choice
    effnet = torchvision.models.efficientnet_b0()
    mabn.convert_model(effnet, norm="mabn", conv="cen")
    plain = [m for m in effnet.modules() if type(m) is nn.Conv2d]
    assert (len(_centered(effnet)), len(plain)) == (49, 32)  # the squeeze-excitation convs stay plain


class _Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, only its children."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        x = self.block(self.bn(self.conv(x)))
        return self.head(x) if x.sum() > 0 else x


def test_where_tracing_fails_children_are_traced_and_registration_order_decides():
    model = _Branching()
    assert norm_inputs(model) == {"bn": NormInput(CONV, "conv"), "block.1": NormInput(CONV, "block.0")}
    mabn.convert_model(model, norm="mabn", conv="cen")
    assert _centered(model) == {"conv", "block.0"}


def test_mabn_after_a_plain_conv_warns_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"MABN with reduced statistics follows a conv that is not weight-centered \(convert with conv='cen'\) at 1 layer\(s\): 1\."):
        mabn.convert_model(model, norm="mabn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mabn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), norm="mabn", conv="cen")
        mabn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), norm="mabn",
                           norm_options={"reduced_stats": False})


def test_mabn_after_relu_or_pooling_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning) as record:
        mabn.convert_model(model, norm="mabn", conv="cen")
    messages = sorted(str(w.message) for w in record)
    assert messages[0].startswith("MABN with reduced statistics follows a pooling at 1 layer(s): 4.")
    assert messages[1].startswith("MABN with reduced statistics follows an activation (ReLU) at 1 layer(s): 2.")


# ----------------------------------------------------------------------------- densenet: warnings, folding
def test_densenet_warns_about_its_norms_after_concatenations_and_folds_to_pure_torch():
    model = torchvision.models.densenet121()
    inputs = norm_inputs(model)
    assert inputs["features.denseblock1.denselayer1.norm1"].kind == CONCATENATION
    assert sum(s.kind == CONCATENATION for s in inputs.values()) == 62
    with pytest.warns(UserWarning, match=r"follows a concatenation at 62 layer\(s\): features.denseblock1.denselayer1.norm1, "):
        mabn.convert_model(model, norm="mabn", conv="cen")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mabn.MABN2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = mabn.fold_model(model)
    assert not [name for name, m in folded.named_modules() if type(m).__module__.startswith("mabn")]
    assert sum(type(m) is nn.BatchNorm2d and not m.training for m in folded.modules()) == 62
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_norm_after_no_conv_becomes_an_identical_torch_batch_norm():
    for layer, x, kind in ((mabn.MABN1d(3, reduced_stats=False), torch.randn(5, 3), nn.BatchNorm1d),
                           (mabn.MABN3d(3), torch.randn(2, 3, 2, 2, 2), nn.BatchNorm3d),
                           (mabn.BatchRenorm2d(3), torch.randn(2, 3, 4, 4), nn.BatchNorm2d)):
        with torch.no_grad():
            layer.running_var.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1, 1)
        model = nn.Sequential(nn.Identity(), layer).eval()
        folded = mabn.fold_model(model)
        assert type(folded[1]) is kind and not folded[1].training
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm,layer", [("mabn", "MABN2d"), ("brn", "BatchRenorm2d"), ("bn", "BatchNorm2d")])
def test_jit_script_of_a_converted_model_says_to_fold_or_export(norm, layer):
    model = mabn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), norm=norm, conv="cen")
    with pytest.raises(RuntimeError, match=layer + r" cannot be compiled by torch.jit.script .* fold the model first .* torch.export"):
        torch.jit.script(model)
    scripted = torch.jit.script(mabn.fold_model(model))
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(scripted(x), model.eval()(x))


# ----------------------------------------------------------------------------- DDP with buffer broadcasting
@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_broadcasting_buffers_warns_once_and_not_without_it(gloo_group):
    model = nn.Sequential(mabn.CenConv2d(3, 4, 3), mabn.MABN2d(4, **MABN_OPTIONS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates the broadcast_buffers argument
        wrapped = nn.parallel.DistributedDataParallel(model)  # torch's default: broadcast buffers
        quiet = nn.parallel.DistributedDataParallel(copy.deepcopy(model), broadcast_buffers=False)
    with pytest.warns(UserWarning, match=r"MABN2d runs inside DistributedDataParallel with broadcast_buffers=True: every forward overwrites"):
        wrapped(torch.randn(2, 3, 6, 6)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(torch.randn(2, 3, 6, 6)).sum().backward()  # checked once per layer
        quiet(torch.randn(2, 3, 6, 6)).sum().backward()
        model(torch.randn(2, 3, 6, 6)).sum().backward()  # the same layers outside DDP


# ----------------------------------------------------------------------------- first compile
def test_the_first_compile_is_announced_and_the_cuda_notice_silenced(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_GRAPHS", {})
    with caplog.at_level(logging.WARNING, logger="mabn"):
        fused._compiled(fused._apply)
        fused._compiled(fused._moments)
    assert [r.getMessage() for r in caplog.records if r.name == "mabn"] == [fused.FIRST_COMPILE_MESSAGE]
    assert "MABN_BACKEND=reference" in fused.FIRST_COMPILE_MESSAGE
    notice = logging.getLogger("torch.utils.cpp_extension")
    record = notice.makeRecord(notice.name, logging.WARNING, __file__, 0, "No CUDA runtime is found, using CUDA_HOME='%s'", ("/usr",), None)
    assert not notice.filter(record)
    other = notice.makeRecord(notice.name, logging.WARNING, __file__, 0, "something else", (), None)
    assert notice.filter(other)


# ----------------------------------------------------------------------------- BatchNorm's API
def _trained(layer, steps=3, shape=(4, 3, 5, 5)):
    for _ in range(steps):
        layer(torch.randn(*shape, requires_grad=True)).square().mean().backward()
    return layer


@pytest.mark.parametrize("options", [{}, {"warmup": "classification"}, {"reduced_stats": False, "affine": False}])
def test_reset_running_stats_and_reset_parameters_give_a_fresh_layer(options):
    fresh = mabn.MABN2d(3, **MABN_OPTIONS, **options)
    layer = _trained(copy.deepcopy(fresh))
    if layer.affine:
        with torch.no_grad():
            layer.weight.add_(1.0)
    layer.reset_running_stats()
    for name, buffer in fresh.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[name], buffer, rtol=0, atol=0, msg=name)
    if layer.affine:
        assert not torch.equal(layer.weight, fresh.weight)
    layer.reset_parameters()
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert layer.track_running_stats and layer.num_features == 3


def test_torch_update_bn_leaves_mabn_alone_and_mabn_update_bn_recomputes_it():
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(3)]
    layer = mabn.MABN2d(3, norm_batch_size=2, **MABN_OPTIONS)
    before = copy.deepcopy(layer.state_dict())
    torch.optim.swa_utils.update_bn(batches, layer)  # sees no _BatchNorm: nothing changes (README)
    for name, value in before.items():
        assert torch.equal(layer.state_dict()[name], value), name

    layer.eval()
    mabn.update_bn([(x, 0) for x in batches], layer)
    groups = torch.cat(batches).double().unflatten(0, (6, 2))  # normalization batches of 2
    torch.testing.assert_close(layer.running_var, groups.square().mean((1, 3, 4)).mean(0).float())
    assert not layer.training
    for name, value in before.items():  # windows and counters are those of before
        if name != "running_var":
            assert torch.equal(layer.state_dict()[name], value), name

    full = mabn.MABN2d(3, reduced_stats=False, **MABN_OPTIONS)
    mabn.update_bn(batches, full)
    per_batch = torch.stack(batches).double()
    torch.testing.assert_close(full.running_mean, per_batch.mean((1, 3, 4)).mean(0).float())
    torch.testing.assert_close(full.running_var, per_batch.var((1, 3, 4), unbiased=False).mean(0).float())


def test_update_bn_matches_torch_on_batch_norm_in_a_mixed_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), mabn.CenConv2d(4, 4, 1),
                          mabn.MABN2d(4, **MABN_OPTIONS), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=0.3))
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    theirs = copy.deepcopy(model)
    mabn.update_bn(batches, model)
    torch.optim.swa_utils.update_bn(batches, theirs)
    for index in (1, 6):
        torch.testing.assert_close(model[index].running_mean, theirs[index].running_mean)
        torch.testing.assert_close(model[index].running_var, theirs[index].running_var)
        assert model[index].momentum == theirs[index].momentum
