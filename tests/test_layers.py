"""Behaviour of every layer of the package: construction, bad input, grouping, precision, state."""
import copy

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import mabn
from mabn import MABN1d, MABN2d, MABN3d, BatchNorm2d, BatchRenorm2d, CenConv2d, build_norm


def _train_steps(layer, inputs, grads):
    outputs, input_grads = [], []
    for x, dy in zip(inputs, grads):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        outputs.append(y.detach())
        input_grads.append(x.grad)
    return outputs, input_grads


def _data(steps, shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g, dtype=dtype) * (1 + 0.3 * i) for i in range(steps)]
    dys = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]
    return xs, dys


# ----------------------------------------------------------------------------- factory
@pytest.mark.parametrize("name", ["bn", "brn", "syncbn", "gn", "ln", "in", "mabn", "frozenbn"])
def test_every_norm_builds_and_runs(name):
    layer = build_norm(name, 64)
    x = torch.randn(4, 64, 6, 6, requires_grad=True)
    layer.train()
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    if name != "frozenbn":
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        assert layer(x).shape == x.shape


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_norm_batch_size_option(name):
    layer = build_norm(name, 8, norm_batch_size=2)
    x = torch.randn(6, 8, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    with pytest.raises(ValueError, match="cannot be cut into normalization batches of norm_batch_size=4"):
        build_norm(name, 8, norm_batch_size=4)(torch.randn(6, 8, 4, 4))


def test_factory_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown norm 'mabm' \(did you mean 'mabn'\?\)"):
        build_norm("mabm", 8)
    with pytest.raises(ValueError, match=r"norm 'gn' does not accept option\(s\) \['norm_batch_size'\]"):
        build_norm("gn", 64, norm_batch_size=2)
    with pytest.raises(ValueError, match="gn: 48 channels cannot be split into num_groups=32 groups"):
        build_norm("gn", 48)


def test_register_norm():
    mabn.register_norm("identity_for_test", lambda channels: nn.Identity())
    try:
        assert isinstance(build_norm("identity_for_test", 3), nn.Identity)
    finally:
        del mabn.NORMS["identity_for_test"]


# ----------------------------------------------------------------------------- MABN construction and input
def test_authors_constructor():
    layer = MABN2d(16, 2, 32, 1e-5, 0.98, 100)
    assert layer.buffer_size == 16 and layer.warmup_iters == 100 and layer.renorm_warmup_iters == 1000
    assert layer.window_var.shape == (16, 16) and layer.norm_batch_size is None
    assert MABN2d(4, warmup_iters=2000).renorm_warmup_iters == 2000
    assert MABN2d(4, warmup="classification").renorm_warmup_iters == 99


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(B=3, real_B=32), r"real_B=32 must be a positive multiple of B=3"),
        (dict(B=2), "give both B and real_B"),
        (dict(B=2, real_B=32, buffer_size=16), "either as buffer_size or as"),
        (dict(warmup="paper"), "warmup must be one of"),
        (dict(momentum=1.5), r"momentum \(EMA keep-rate\) must be in \[0, 1\]"),
        (dict(norm_batch_size=0), "norm_batch_size must be a positive integer"),
        (dict(buffer_size=0), "buffer_size must be a positive integer"),
        (dict(r_max=0.5), "r_max must be at least 1"),
        (dict(momentum=float("nan")), r"momentum \(EMA keep-rate\) must be in \[0, 1\], got nan"),
        (dict(eps=float("nan")), "eps must be positive, got nan"),
        (dict(r_max=float("nan")), "r_max must be at least 1, got nan"),
    ],
)
def test_mabn_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MABN2d(8, **kwargs)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("bn", dict(momentum=3.0), r"BatchNorm2d: momentum \(update rate of the running statistics\) must be in \[0, 1\] or None, got 3.0"),
        ("bn", dict(momentum=-0.1), r"must be in \[0, 1\] or None, got -0.1"),
        ("bn", dict(eps=0.0), "BatchNorm2d: eps must be positive, got 0.0"),
        ("syncbn", dict(momentum=float("nan")), r"SyncBatchNorm: momentum .* must be in \[0, 1\] or None, got nan"),
        ("brn", dict(momentum=3.0), r"BatchRenorm2d: momentum must be in \(0, 1\], got 3.0"),
        ("brn", dict(r_max=float("nan")), "BatchRenorm2d: need r_max >= 1, d_max >= 0 and eps > 0, got r_max=nan"),
    ],
)
def test_batch_norm_option_ranges(name, kwargs, message):
    """nn.BatchNorm2d takes any momentum; 3.0 trains to NaN (issue 13)."""
    with pytest.raises(ValueError, match=message):
        build_norm(name, 8, **kwargs)
    build_norm(name, 8, momentum=None if name != "brn" else 1.0)  # the ends of the range are fine


@pytest.mark.parametrize(
    "cls,shape,message",
    [
        (MABN2d, (2, 8, 4), r"MABN2d: expected 4D \(N, C, H, W\) input, got a 3D tensor"),
        (MABN1d, (2, 8, 4, 4), r"MABN1d: expected 2D \(N, C\) or 3D \(N, C, L\) input, got a 4D tensor"),
        (MABN3d, (2, 8, 4, 4), r"MABN3d: expected 5D \(N, C, D, H, W\) input"),
        (MABN2d, (2, 5, 4, 4), r"MABN2d: expected 8 channels \(dim 1\)"),
    ],
)
def test_mabn_input_errors(cls, shape, message):
    with pytest.raises(ValueError, match=message):
        cls(8)(torch.randn(shape))


def test_batch_not_divisible_by_norm_batch_size():
    with pytest.raises(ValueError, match="MABN2d: a batch of 6 samples cannot be cut into normalization batches of norm_batch_size=4"):
        MABN2d(3, norm_batch_size=4)(torch.randn(6, 3, 2, 2))


def test_mabn1d_and_3d_share_the_2d_implementation():
    kwargs = dict(buffer_size=2, warmup_iters=1, renorm_warmup_iters=1, norm_batch_size=2)
    layers = {"1d": MABN1d(3, **kwargs), "2d": MABN2d(3, **kwargs), "3d": MABN3d(3, **kwargs), "1d-flat": MABN1d(3, **kwargs)}
    xs, dys = _data(4, (4, 3, 5), dtype=torch.float32)
    results = {
        "1d": _train_steps(layers["1d"], xs, dys),
        "2d": _train_steps(layers["2d"], [x[..., None] for x in xs], [d[..., None] for d in dys]),
        "3d": _train_steps(layers["3d"], [x[..., None, None] for x in xs], [d[..., None, None] for d in dys]),
    }
    for key in ("2d", "3d"):
        for a, b in zip(results["1d"][0] + results["1d"][1], results[key][0] + results[key][1]):
            torch.testing.assert_close(a, b.reshape(a.shape))
    y = layers["1d-flat"](torch.randn(4, 3, requires_grad=True))
    assert y.shape == (4, 3)


# ----------------------------------------------------------------------------- precision and layouts
def test_autocast_bf16_keeps_statistics_in_fp32():
    torch.manual_seed(0)
    ref = MABN2d(8, buffer_size=2, warmup_iters=1, renorm_warmup_iters=1)
    amp = copy.deepcopy(ref)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    for _ in range(4):
        x = torch.randn(4, 3, 8, 8)
        y_ref = ref(conv(x))
        y_ref.float().square().mean().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            assert h.dtype == torch.bfloat16
            y = amp(h)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2)
    for name, buf in amp.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, getattr(ref, name), rtol=2e-2, atol=1e-3)
    amp.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(amp(conv(torch.randn(2, 3, 8, 8))).float()).all()


@pytest.mark.parametrize("make", [lambda: MABN2d(4, buffer_size=2, warmup_iters=1, norm_batch_size=2), lambda: BatchRenorm2d(4, warmup_steps=0, norm_batch_size=2), lambda: BatchNorm2d(4, norm_batch_size=2)])
def test_channels_last_matches_contiguous(make):
    a, b = make(), make()
    xs, dys = _data(3, (4, 4, 5, 6), dtype=torch.float32)
    out_a = _train_steps(a, xs, dys)
    out_b = _train_steps(b, [x.to(memory_format=torch.channels_last) for x in xs], [d.to(memory_format=torch.channels_last) for d in dys])
    for u, v in zip(out_a[0] + out_a[1], out_b[0] + out_b[1]):
        torch.testing.assert_close(u, v)
    assert out_b[0][0].is_contiguous(memory_format=torch.channels_last)
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, msg=name)


@pytest.mark.parametrize("make", [lambda: MABN2d(4, norm_batch_size=2), lambda: BatchRenorm2d(4), lambda: BatchNorm2d(4, norm_batch_size=2)],
                         ids=["mabn-b=2", "brn", "bn-b=2"])
def test_empty_batch_returns_empty_and_touches_no_buffer(make, device):
    layer = make().to(device)
    layer(torch.randn(4, 4, 3, 3, device=device)).sum().backward()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------- MABN state machinery
def test_two_forwards_before_one_backward_is_refused():
    layer = MABN2d(3)
    y1 = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="a second training forward ran before the backward of the previous one"):
        layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    y1.sum().backward()
    layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()  # one forward per backward: fine
    with torch.no_grad():
        layer(torch.randn(2, 3, 4, 4))  # a forward without a graph never blocks the next one
    y = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    del y  # a discarded graph releases the layer too
    layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    assert layer.num_steps.item() == 5


def test_backward_twice_through_one_forward_is_refused():
    layer = MABN2d(3)
    y = layer(torch.randn(2, 3, 4, 4, requires_grad=True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the same forward"):
        y.backward()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_advances_state_once(use_reentrant, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    plain = nn.Sequential(copy.deepcopy(conv), MABN2d(4, buffer_size=2, warmup_iters=1, renorm_warmup_iters=2, norm_batch_size=2).double(), nn.ReLU())
    plain.to(device)
    ckpt = copy.deepcopy(plain)
    xs, _ = _data(5, (4, 3, 6, 6))
    _, dys = _data(5, (4, 4, 6, 6), seed=1)
    xs, dys = [x.to(device) for x in xs], [dy.to(device) for dy in dys]
    for x, dy in zip(xs, dys):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        plain(xa).backward(dy)
        checkpoint.checkpoint(ckpt, xb, use_reentrant=use_reentrant).backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad)
    assert ckpt[1].num_steps.item() == 5 and ckpt[1].num_norm_batches.item() == 10
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict()[name], value, msg=name)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_state_dict_round_trip_in_the_middle_of_a_window():
    kwargs = dict(buffer_size=4, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2)
    layer = MABN2d(3, **kwargs).double()
    xs, dys = _data(12, (4, 3, 3, 3))
    _train_steps(layer, xs[:6], dys[:6])  # 12 normalization batches: the window has wrapped, mid-cycle
    restored = MABN2d(3, **kwargs).double()
    restored.load_state_dict(layer.state_dict())
    expected = _train_steps(layer, xs[6:], dys[6:])
    actual = _train_steps(restored, xs[6:], dys[6:])
    for a, b in zip(expected[0] + expected[1], actual[0] + actual[1]):
        assert torch.equal(a, b)
    assert set(layer.state_dict()) == {"weight", "bias", "running_var", "num_steps", "num_norm_batches", "window_var", "window_psi"}


def test_full_statistics_buffers_are_in_the_state_dict():
    keys = set(MABN2d(3, reduced_stats=False).state_dict())
    assert {"running_mean", "window_mean", "window_grad_mean"} <= keys


def test_formal_grouped_batch_equals_separate_calls_after_warmup():
    """Spec: past every warm-up, N cut into groups of b gives what N/b calls on the groups would."""
    kwargs = dict(buffer_size=3, warmup_iters=1, renorm_warmup_iters=0, r_max=1.5)
    grouped = MABN2d(2, norm_batch_size=2, **kwargs).double()
    separate = MABN2d(2, **kwargs).double()
    xs, dys = _data(6, (6, 2, 3, 3))
    for x, dy in zip(xs, dys):
        (y_grouped,), (dx_grouped,) = _train_steps(grouped, [x], [dy])
        parts = _train_steps(separate, list(x.split(2)), list(dy.split(2)))
        if grouped.num_steps.item() > 1:  # the formal step-counter warm-up differs for separate calls
            torch.testing.assert_close(y_grouped, torch.cat(parts[0]))
            torch.testing.assert_close(dx_grouped, torch.cat(parts[1]))
    torch.testing.assert_close(grouped.window_var, separate.window_var)
    torch.testing.assert_close(grouped.running_var, separate.running_var)


def test_pickles_with_a_live_graph():
    layer = MABN2d(3)
    y = layer(torch.randn(2, 3, 2, 2, requires_grad=True))
    clone = copy.deepcopy(layer)
    assert clone._pending is None
    y.sum().backward()
    torch.save(layer, __import__("io").BytesIO())


# ----------------------------------------------------------------------------- BN and BRN baselines
def test_grouped_batch_norm_equals_consecutive_batch_norm_calls():
    grouped = BatchNorm2d(3, norm_batch_size=2).double()
    separate = nn.BatchNorm2d(3).double()
    xs, dys = _data(3, (6, 3, 4, 4))
    for x, dy in zip(xs, dys):
        (y, ), (dx, ) = _train_steps(grouped, [x], [dy])
        parts = _train_steps(separate, list(x.split(2)), list(dy.split(2)))
        torch.testing.assert_close(y, torch.cat(parts[0]))
        torch.testing.assert_close(dx, torch.cat(parts[1]))
    torch.testing.assert_close(grouped.running_mean, separate.running_mean)
    torch.testing.assert_close(grouped.running_var, separate.running_var)
    assert grouped.num_batches_tracked.item() == separate.num_batches_tracked.item() == 9
    torch.testing.assert_close(grouped.weight.grad, separate.weight.grad)


def test_batch_norm_without_groups_is_torch_batch_norm():
    ours, ref = BatchNorm2d(3), nn.BatchNorm2d(3)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))


def _loop_batch_renorm(x, gamma, beta, mean, var, r_lim, d_lim, eps, momentum):
    """Ioffe's algorithm for one normalization batch, written out (r, d as constants)."""
    mu_b = x.mean((0, 2, 3))
    var_b = x.var((0, 2, 3), unbiased=False)
    sigma_b = (var_b + eps).sqrt()
    sigma = (var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_lim, r_lim)
    d = ((mu_b - mean) / sigma).clamp(-d_lim, d_lim)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    y = v(gamma) * ((x - v(mu_b)) / v(sigma_b) * v(r) + v(d)) + v(beta)
    return y, mean + momentum * (mu_b - mean), var + momentum * (var_b - var)


def test_batch_renorm_against_a_loop_over_normalization_batches():
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, momentum=0.3, warmup_steps=1, r_max_steps=4, d_max_steps=3, r_max=1.5, d_max=0.5, norm_batch_size=2).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    xs, dys = _data(6, (4, 3, 3, 3))
    for step, x in enumerate(xs, start=1):
        r_lim, d_lim = (t.item() for t in layer.limits(torch.tensor(step)))
        expected = []
        for part in x.split(2):
            y, mean, var = _loop_batch_renorm(part + 0.5, layer.weight.detach(), layer.bias.detach(), mean, var, r_lim, d_lim, 1e-5, 0.3)
            expected.append(y)
        y = layer(x + 0.5)
        torch.testing.assert_close(y, torch.cat(expected))
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
    assert layer.limits(torch.tensor(1)) == (1.0, 0.0)
    r_lim, d_lim = layer.limits(torch.tensor(100))
    assert r_lim.item() == 1.5 and d_lim.item() == 0.5


@pytest.mark.parametrize("momentum", [0.2, None], ids=["ema", "cumulative"])
def test_grouped_batch_norm_per_step_update_against_a_plain_loop(momentum):
    layer = BatchNorm2d(3, momentum=momentum, norm_batch_size=2, running_stats_update="per_step").double()
    separate = nn.BatchNorm2d(3).double()  # normalization and gradients: the same as per_group
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    xs, dys = _data(3, (6, 3, 4, 4))
    for step, (x, dy) in enumerate(zip(xs, dys), start=1):
        (y, ), (dx, ) = _train_steps(layer, [x + 0.5], [dy])
        parts = _train_steps(separate, list((x + 0.5).split(2)), list(dy.split(2)))
        torch.testing.assert_close(y, torch.cat(parts[0]))
        torch.testing.assert_close(dx, torch.cat(parts[1]))
        step_mean = torch.stack([p.mean((0, 2, 3)) for p in (x + 0.5).split(2)]).mean(0)
        step_var = torch.stack([p.var((0, 2, 3), unbiased=True) for p in (x + 0.5).split(2)]).mean(0)
        rate = momentum if momentum is not None else 1.0 / step
        mean, var = mean + rate * (step_mean - mean), var + rate * (step_var - var)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
    assert layer.num_batches_tracked.item() == 3  # one update per step
    assert not torch.allclose(separate.running_mean, mean)  # the two options really differ


def test_batch_renorm_per_step_update_against_a_loop_over_normalization_batches():
    layer = BatchRenorm2d(3, momentum=0.3, warmup_steps=1, r_max_steps=4, d_max_steps=3, r_max=1.5, d_max=0.5,
                          norm_batch_size=2, running_stats_update="per_step").double()
    per_group = copy.deepcopy(layer)
    per_group.running_stats_update = "per_group"
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    xs, _ = _data(6, (4, 3, 3, 3))
    for step, x in enumerate(xs, start=1):
        r_lim, d_lim = (t.item() for t in layer.limits(torch.tensor(step)))
        expected, group_means, group_vars = [], [], []
        for part in (x + 0.5).split(2):  # every group against the averages from before the step
            y, _, _ = _loop_batch_renorm(part, layer.weight.detach(), layer.bias.detach(), mean, var, r_lim, d_lim, 1e-5, 0.3)
            expected.append(y)
            group_means.append(part.mean((0, 2, 3)))
            group_vars.append(part.var((0, 2, 3), unbiased=False))
        mean = mean + 0.3 * (torch.stack(group_means).mean(0) - mean)
        var = var + 0.3 * (torch.stack(group_vars).mean(0) - var)
        torch.testing.assert_close(layer(x + 0.5), torch.cat(expected))
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
        per_group(x + 0.5)
    assert not torch.allclose(per_group.running_mean, mean)


@pytest.mark.parametrize("make", [BatchNorm2d, BatchRenorm2d])
def test_running_stats_update_option_is_checked_and_reaches_build_norm(make):
    with pytest.raises(ValueError, match="running_stats_update must be one of per_group, per_step, got 'per_epoch'"):
        make(3, norm_batch_size=2, running_stats_update="per_epoch")
    name = "bn" if make is BatchNorm2d else "brn"
    assert build_norm(name, 3, norm_batch_size=2, running_stats_update="per_step").running_stats_update == "per_step"


# ----------------------------------------------------------------------------- CenConv2d
def test_cen_conv_is_a_conv_with_centered_filters():
    torch.manual_seed(0)
    conv = CenConv2d(4, 6, 3, padding=1, bias=True)
    plain = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    assert isinstance(conv, nn.Conv2d)
    assert set(conv.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 5, 5)
    w = conv.weight.detach()
    expected = nn.functional.conv2d(x, w - w.mean(dim=(1, 2, 3), keepdim=True), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    conv(x).sum().backward()
    # the gradient of a centred weight has zero mean per output filter
    torch.testing.assert_close(conv.weight.grad.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-6, rtol=0)


def test_sync_batch_norm_without_process_group_is_batch_norm():
    ours, ref = mabn.SyncBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
