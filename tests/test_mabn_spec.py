"""MABN2d against the independent loop re-implementation of the spec, and its gradients against closed forms."""
import pytest
import torch
import torch.nn.functional as F

from mabn import MABN2d
from mabn.layers.functional import REFERENCE, BatchStatistics, Plan, train_step
from mabn.layers.fused import FUSED

from spec_mabn import LoopMABN

torch.set_default_dtype(torch.float32)

# (norm_batch_size, window, warmup, warmup_iters, renorm_warmup_iters): every warm-up boundary is crossed
# well inside the 300 steps; r_max is small so that the clip is active on some steps.
CASES = [
    pytest.param(None, 4, "formal", 30, 120, id="formal-b=N"),
    pytest.param(2, 16, "formal", 30, 120, id="formal-b=2"),
    pytest.param(None, 4, "classification", None, None, id="classification-b=N"),
    pytest.param(2, 4, "classification", None, None, id="classification-b=2"),
]


def _scale_schedule(step):
    """Input scale that drifts over training so that chi^2, the EMA and r move, and r hits its clip."""
    return 1.0 + 0.6 * torch.sin(torch.tensor(step / 9.0)).item()


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("norm_batch_size,window,warmup,warmup_iters,renorm_warmup_iters", CASES)
def test_matches_loop_reference_over_300_steps(norm_batch_size, window, warmup, warmup_iters, renorm_warmup_iters, backend):
    torch.manual_seed(0)
    channels, steps, r_max, eps, momentum = 3, 310, 1.3, 1e-5, 0.9
    layer = MABN2d(
        channels, eps=eps, momentum=momentum, warmup_iters=warmup_iters, buffer_size=window,
        norm_batch_size=norm_batch_size, renorm_warmup_iters=renorm_warmup_iters, r_max=r_max, warmup=warmup, backend=backend,
    ).double()
    oracle = LoopMABN(
        channels, window, norm_batch_size, eps, momentum, layer.warmup_iters, layer.renorm_warmup_iters, r_max, warmup
    )
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels) + 0.5)
        layer.bias.copy_(torch.randn(channels))
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()

    for step in range(1, steps + 1):
        x = (torch.randn(8, channels, 4, 5, dtype=torch.float64) * _scale_schedule(step) + 0.1).requires_grad_()
        dy = torch.randn(8, channels, 4, 5, dtype=torch.float64)
        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dgamma_ref, dbeta_ref = oracle.step(x.detach(), dy, gamma, beta)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step}: output {m}")
        torch.testing.assert_close(x.grad, dx_ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step}: dx {m}")
        torch.testing.assert_close(layer.weight.grad, dgamma_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, dbeta_ref, rtol=1e-6, atol=1e-6)
        for name, expected in oracle.buffers().items():
            actual = getattr(layer, name)
            expected = torch.as_tensor(expected, dtype=actual.dtype)
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8, msg=lambda m: f"step {step}: {name} {m}")
    # the run must have crossed every boundary: SMA in use, r active and clipped at least once.
    assert oracle.t > layer.renorm_warmup_iters and oracle.n > window


def _closed_form_case(centered, groups, r, d, backend):
    """A function of x alone whose custom backward is the spec's closed form; gradcheck compares it with
    finite differences of the forward, which recomputes the statistics from the perturbed input."""

    def fn(x, weight, bias):
        xg = x.detach().unflatten(0, (groups, -1))
        dims = (1, 3, 4)
        if centered:
            mean = xg.mean(dims)
            var = ((xg - mean[:, None, :, None, None]) ** 2).mean(dims)
        else:
            mean, var = None, (xg * xg).mean(dims)
        plan = Plan(mean, (var + 1e-5).sqrt(), r, d)  # a fixed plan: the step applies it and its backward
        state = BatchStatistics.State(None, None, None)
        return train_step(x, weight, bias, backend, BatchStatistics, state, BatchStatistics.Config(1e-5, None), groups, plan)[0]

    return fn


FUNCTIONS = pytest.mark.parametrize("backend", [REFERENCE, FUSED], ids=["reference", "fused"])


@FUNCTIONS
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("with_r", [False, True])
def test_gradcheck_reduced_statistics_closed_form(groups, with_r, backend):
    """MABN's backward with the batch statistic (no SMA) and constant r is the exact gradient."""
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = (torch.rand(groups, 2, dtype=torch.float64) + 0.5) if with_r else None
    assert torch.autograd.gradcheck(_closed_form_case(False, groups, r, None, backend), (x, w, b))


@FUNCTIONS
@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_batch_renorm_closed_form(groups, backend):
    """BRN: the BN gradient through mu_B, sigma_B with r and d held constant."""
    torch.manual_seed(2)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = torch.rand(groups, 2, dtype=torch.float64) + 0.5
    d = torch.randn(groups, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(_closed_form_case(True, groups, r, d, backend), (x, w, b))


def test_module_backward_with_sma_and_renorm_against_closed_form():
    """Past every warm-up: y = gamma * r * z + beta and dx = (g - z * Psi_bar) / sqrt(chi2_bar + eps) with
    g = gamma * r * dy, chi2_bar / Psi_bar the window means, r = clip(sqrt(chi2_bar + eps) / sqrt(nu + eps))."""
    torch.manual_seed(4)
    eps, alpha = 1e-5, 0.9
    layer = MABN2d(3, buffer_size=2, momentum=alpha, warmup_iters=0, renorm_warmup_iters=0, r_max=10.0).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    gamma = layer.weight.detach().view(1, -1, 1, 1)
    for step in range(4):
        x = (torch.randn(4, 3, 2, 2, dtype=torch.float64) * (1 + step)).requires_grad_()
        dy = torch.randn_like(x)
        prev_chi2, prev_psi, nu = layer.window_var[-1].clone(), layer.window_psi[-1].clone(), layer.running_var.clone()
        y = layer(x)
        y.backward(dy)
    chi2_bar = (prev_chi2 + (x.detach() ** 2).mean((0, 2, 3))) / 2
    s = (chi2_bar + eps).sqrt().view(1, -1, 1, 1)
    r = (s / (nu + eps).sqrt().view(1, -1, 1, 1)).clamp(0.1, 10.0)
    assert (r - 1).abs().min() > 0.05, "r must be active for this check to mean something"
    z = x.detach() / s
    torch.testing.assert_close(y, gamma * r * z + layer.bias.detach().view(1, -1, 1, 1))
    g = gamma * r * dy
    psi_t = (g * z).mean((0, 2, 3))
    psi_bar = ((prev_psi + psi_t) / 2).view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, (g - z * psi_bar) / s)
    torch.testing.assert_close(layer.running_var, alpha * nu + (1 - alpha) * chi2_bar)


def test_full_statistics_without_sma_or_renorm_is_batch_norm():
    torch.manual_seed(5)
    layer = MABN2d(3, reduced_stats=False, forward_sma=False, backward_sma=False, renorm=False).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    layer(x).backward(dy)
    F.batch_norm(x_ref, None, None, w, b, True, 0.0, 1e-5).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
