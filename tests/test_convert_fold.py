"""Model conversion, inference folding, the authors' checkpoints and the statistics recorder."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

import mabn
from mabn import BatchNorm2d, BatchRenorm2d, CenConv2d, MABN2d, convert_model, fold_model, load_authors_state_dict

from spec_mabn import LoopMABN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _calibrated(model, steps=3, size=64):
    """A few training forwards so that the inference statistics describe the activations."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, size, size, dtype=next(model.parameters()).dtype))
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, BatchRenorm2d, MABN2d)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_convert_resnet50_keeps_keys_and_parameters_then_trains_and_evaluates():
    reference = torchvision.models.resnet50()
    model = copy.deepcopy(reference)
    params_before = dict(model.named_parameters())
    convert_model(model, norm="mabn", conv="cen", norm_options={"norm_batch_size": 2, "warmup_iters": 1, "renorm_warmup_iters": 1})
    assert sum(isinstance(m, MABN2d) for m in model.modules()) == 53
    assert sum(isinstance(m, CenConv2d) for m in model.modules()) == 53
    assert not any(type(m) in (nn.BatchNorm2d, nn.Conv2d) for m in model.modules())
    # parameters are the same objects under the same names: torchvision's keys and values are kept
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert [k for k in model.state_dict() if not k.endswith(("running_mean", "num_batches_tracked"))][:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    plain_keys = {k for k in reference.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert plain_keys <= set(model.state_dict())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_convert_carries_running_statistics():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0]))
    model = convert_model(nn.Sequential(bn), norm="mabn")
    torch.testing.assert_close(model[0].running_var, torch.tensor([1.5, 5.0, 2.25]))
    full = convert_model(nn.Sequential(copy.deepcopy(bn)), norm="mabn", norm_options={"reduced_stats": False})
    torch.testing.assert_close(full[0].running_mean, bn.running_mean)
    grouped = convert_model(nn.Sequential(copy.deepcopy(bn)), norm="bn", norm_options={"norm_batch_size": 2})
    assert isinstance(grouped[0], BatchNorm2d) and grouped[0].norm_batch_size == 2
    torch.testing.assert_close(grouped[0].running_var, bn.running_var)
    with pytest.raises(ValueError, match="conv must be None, 'plain' or 'cen'"):
        convert_model(nn.Sequential(bn), conv="centered")


@pytest.mark.parametrize("norm,conv", [("mabn", "cen"), ("bn", None), ("brn", "cen"), ("mabn", None)])
def test_fold_resnet50_reproduces_eval_outputs(norm, conv):
    torch.manual_seed(0)
    options = {"mabn": {"momentum": 0.0, "warmup_iters": 1}, "bn": {"momentum": 1.0}, "brn": {"momentum": 1.0, "warmup_steps": 0}}[norm]
    model = convert_model(torchvision.models.resnet50(), norm=norm, conv=conv, norm_options=options).double()
    _calibrated(model)
    folded = fold_model(model)
    assert model.training is False and folded.training is False
    leftovers = [n for n, m in folded.named_modules() if isinstance(m, (nn.BatchNorm2d, BatchRenorm2d, MABN2d, CenConv2d))]
    assert leftovers == []
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == 53
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        # float64: the fold itself is exact
        assert _relative(folded(x), model(x)) < 1e-10
        # float32: the folded model is as close to the exact output as the unfolded one
        exact = model(x)
        model32, folded32 = copy.deepcopy(model).float(), fold_model(copy.deepcopy(model).float())
        unfolded_error = _relative(model32(x.float()).double(), exact)
        folded_error = _relative(folded32(x.float()).double(), exact)
    assert folded_error < 1.5 * unfolded_error + 1e-6, (folded_error, unfolded_error)


def test_folded_mabn_resnet50_is_the_same_network_as_folded_bn():
    """Free at inference: the folded MABN model runs exactly the modules, shapes, dtypes and memory layouts
    of the folded BN model, so its speed is BN's by construction (timing noise aside, scripts/bench_inference)."""
    def layout(model):
        modules = [(name, type(m).__name__, repr(m)) for name, m in model.named_modules()]
        tensors = [(name, t.shape, t.dtype, t.stride()) for name, t in [*model.named_parameters(), *model.named_buffers()]]
        return modules, tensors

    bn = fold_model(torchvision.models.resnet50())
    mabn = fold_model(convert_model(torchvision.models.resnet50(), norm="mabn", conv="cen"))
    assert layout(mabn) == layout(bn)


def test_fold_small_model_float32_within_1e5():
    torch.manual_seed(0)
    model = convert_model(torchvision.models.resnet18(), norm="mabn", conv="cen", norm_options={"momentum": 0.0, "warmup_iters": 1})
    _calibrated(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _relative(fold_model(model)(x), model(x)) < 1e-5


class _Branchy(nn.Module):
    """Data-dependent control flow (like detection models) defeats tracing of the whole module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(CenConv2d(3, 8, 3, padding=1), MABN2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), BatchNorm2d(4))
        self.shared = nn.Conv2d(4, 4, 1)
        self.shared_norm = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = x * 2
        x = self.head(x)
        y = self.shared(x)
        return self.shared_norm(y) + y  # the conv output has a second user: cannot fold


def test_fold_falls_back_to_children_and_respects_other_users():
    torch.manual_seed(0)
    model = _Branchy()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 5, 5))
    model.eval()
    folded = fold_model(model)
    assert isinstance(folded.body[1], nn.Identity) and type(folded.body[0]) is nn.Conv2d
    assert isinstance(folded.head[1], nn.Identity)
    assert isinstance(folded.shared_norm, nn.BatchNorm2d)  # shared conv output: left alone
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- authors' checkpoints
def _authors_formal_layer_state(oracle: LoopMABN, gamma, beta):
    """What the authors' formal MABN2d would hold after the oracle's steps: ring buffers at slot t % m."""
    m, t = oracle.m, oracle.t
    ring_x2, ring_gz = torch.zeros(m, gamma.numel()), torch.zeros(m, gamma.numel())
    for k in range(m):  # the value of step s lives at slot s % m
        step = t - m + 1 + k
        ring_x2[step % m] = oracle.chi2_history[-m + k].float()
        ring_gz[step % m] = oracle.psi_history[-m + k].float()
    return {
        "weight": gamma.float(), "bias": beta.float(), "running_var": oracle.nu.float().view(1, -1, 1, 1),
        "iters": torch.tensor([t], dtype=torch.long), "buffer_x2": ring_x2, "buffer_gz": ring_gz,
    }


def test_load_authors_formal_checkpoint_and_continue():
    torch.manual_seed(0)
    m, channels = 4, 3
    oracle = LoopMABN(channels, m, None, 1e-5, 0.98, 2, 5, 5.0, "formal")
    gamma, beta = torch.rand(channels, dtype=torch.float64) + 0.5, torch.randn(channels, dtype=torch.float64)
    for _ in range(7):  # 7 steps into a window of 4: the ring is mid-cycle
        oracle.step(torch.randn(2, channels, 3, 3, dtype=torch.float64), torch.randn(2, channels, 3, 3, dtype=torch.float64), gamma, beta)
    state = {f"module.block.norm.{k}": v for k, v in _authors_formal_layer_state(oracle, gamma, beta).items()}
    state["module.block.conv.weight"] = torch.randn(channels, channels, 1, 1)

    model = nn.Module()
    model.block = nn.Module()
    model.block.conv = CenConv2d(channels, channels, 1, bias=False)
    model.block.norm = MABN2d(channels, 2, 2 * m, warmup_iters=2, renorm_warmup_iters=5)
    load_authors_state_dict(model, state)
    layer = model.block.norm.double()
    assert layer.num_steps.item() == 7
    for _ in range(4):
        x = torch.randn(2, channels, 3, 3, dtype=torch.float64, requires_grad=True)
        dy = torch.randn_like(x)
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, _, _ = oracle.step(x.detach(), dy, gamma, beta)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, dx_ref, rtol=1e-5, atol=1e-5)


def test_load_authors_classification_checkpoint():
    m, channels = 4, 3
    sta = torch.zeros(m, 2 * m)
    for i in range(m):
        sta[i, i + 1:m + i + 1] = 1 / m
    pre_x2, pre_gz = torch.rand(m, channels), torch.randn(m, channels)
    state = {
        "weight": torch.ones(channels), "bias": torch.zeros(channels), "running_var": torch.rand(channels) + 0.5,
        "iters": torch.tensor([250.0]), "pre_x2": pre_x2, "pre_gz": pre_gz, "sta_matrix": sta,
    }
    layer = MABN2d(channels, buffer_size=m, norm_batch_size=2, warmup="classification")
    load_authors_state_dict(layer, state)
    assert layer.num_steps.item() == 250 and layer.num_norm_batches.item() == 1000
    torch.testing.assert_close(layer.window_var, pre_x2)
    torch.testing.assert_close(layer.window_psi, pre_gz)
    with pytest.raises(ValueError, match="sta_matrix is not the authors'"):
        load_authors_state_dict(layer, {**state, "sta_matrix": torch.ones(m, 2 * m)})


def test_load_authors_checkpoint_errors():
    layer = MABN2d(3, buffer_size=4)
    good = {"weight": torch.ones(3), "bias": torch.zeros(3), "running_var": torch.ones(1, 3, 1, 1),
            "iters": torch.tensor([5]), "buffer_x2": torch.zeros(4, 3), "buffer_gz": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="cannot map keys .* onto MABN"):
        load_authors_state_dict(layer, {**good, "extra_buffer": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"checkpoint windows have shape \(8, 3\), this layer needs \(buffer_size=4"):
        load_authors_state_dict(layer, {**good, "buffer_x2": torch.zeros(8, 3), "buffer_gz": torch.zeros(8, 3)})
    model = nn.Sequential(MABN2d(3, buffer_size=4))
    with pytest.raises(ValueError, match=r"keys with no place in the model: \['fc.weight'\]"):
        load_authors_state_dict(model, {**{f"0.{k}": v for k, v in good.items()}, "fc.weight": torch.zeros(2)})


# ----------------------------------------------------------------------------- statistics recorder
class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value


def test_recorder_computes_the_four_statistics_of_the_first_normalization_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4, norm_batch_size=2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    writer = _Writer()
    recorder = mabn.BatchStatisticsRecorder(model, writer, channel=0)
    assert recorder.layers == ["1"]
    x = torch.randn(6, 3, 5, 5)
    out = model(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    recorder.write(step=7)
    h = model[0](x)[:2, 0].detach().double()
    mu, var = h.mean(), h.var(unbiased=False)
    y_hat = (h - mu) / (var + 1e-5).sqrt()
    dy_hat = 2.0 * dy[:2, 0].double()
    expected = {"mu": mu, "sigma2": var, "g": dy_hat.mean(), "psi": (y_hat * dy_hat).mean()}
    for key, value in expected.items():
        assert writer.scalars[(f"batch_stats/1/{key}", 7)] == pytest.approx(value.item(), rel=1e-5, abs=1e-7)
    recorder.close()
    with pytest.raises(ValueError, match=r"no layer named \['nope'\]"):
        mabn.BatchStatisticsRecorder(model, writer, layers=["nope"])


def test_plot_script_draws_two_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run, b in (("bn32", None), ("bn2", 2)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4, norm_batch_size=b), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        writer = SummaryWriter(str(tmp_path / run))
        recorder = mabn.BatchStatisticsRecorder(model, writer)
        for step in range(5):
            model(torch.randn(4, 3, 6, 6)).sum().backward()
            recorder.write(step)
        writer.close()
    out = tmp_path / "stats.png"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_batch_stats.py"), str(tmp_path / "bn32"), str(tmp_path / "bn2"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_batch_stats.py"), str(tmp_path / "absent")], capture_output=True, text=True)
    assert missing.returncode != 0 and "run directory not found" in missing.stderr


def test_convert_model_with_nothing_to_convert_says_so():
    """Not a silent no-op (issue 13): a model converted already, a norm type it does not know, a filter accepting nothing."""
    model = convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), norm="mabn")
    with pytest.warns(UserWarning, match=r"convert_model: nothing to convert in this Sequential: no 2d batch norms to turn "
                                         r"into 'mabn'; the model is returned unchanged"):
        assert convert_model(model, norm="mabn") is model
    with pytest.warns(UserWarning, match="no 2d batch norms to turn into 'gn' or nn.Conv2d layers accepted by conv_filter"):
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), norm="gn", conv="cen", conv_filter=lambda name, conv: False)
    with pytest.warns(UserWarning, match=r"nothing was asked for \(norm=None, conv=None\)"):
        convert_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), conv="cen")  # a conv replaced: no warning
