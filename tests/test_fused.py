"""The fused kernels against the reference path: same outputs, gradients and buffers, step after step."""
import copy

import pytest
import torch

from mabn import BatchNorm2d, BatchRenorm2d, MABN1d, MABN2d, MABN3d
from mabn.layers import fused as backends  # the backend switch lives beside the fused kernels
from mabn.layers import functional
from mabn.layers.functional import REFERENCE

MABN_CASES = {
    "formal-b=N": lambda backend: MABN2d(8, buffer_size=3, warmup_iters=2, renorm_warmup_iters=3, r_max=1.5, backend=backend),
    "formal-b=2": lambda backend: MABN2d(8, buffer_size=5, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2, backend=backend),
    "classification-b=1": lambda backend: MABN2d(8, buffer_size=6, warmup="classification", renorm_warmup_iters=2, norm_batch_size=1, backend=backend),
    "full-statistics-b=2": lambda backend: MABN2d(8, buffer_size=3, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2, reduced_stats=False, backend=backend),
    "no-sma-no-renorm": lambda backend: MABN2d(8, forward_sma=False, backward_sma=False, renorm=False, backend=backend),
    "bn-b=2": lambda backend: BatchNorm2d(8, norm_batch_size=2, backend=backend),
    "brn-b=2": lambda backend: BatchRenorm2d(8, warmup_steps=1, r_max_steps=3, d_max_steps=3, norm_batch_size=2, backend=backend),
    "mabn1d": lambda backend: MABN1d(8, buffer_size=3, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2, backend=backend),
    "mabn3d": lambda backend: MABN3d(8, buffer_size=3, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2, backend=backend),
}
SHAPES = {"mabn1d": (8, 8, 7), "mabn3d": (8, 8, 3, 4, 5)}


def _close(actual, expected, rtol, msg):
    """Relative to the tensor's scale: a sum that happens to be near zero has no relative precision of its own."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def _compare(make, shape, device, steps=7, dtype=torch.float32, memory_format=torch.contiguous_format, rtol=1e-5):
    """Layers built on the CPU and moved to ``device``, data drawn on the CPU: the same numbers on every device."""
    torch.manual_seed(0)
    reference, fused = make("reference").to(device, dtype), make("fused").to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for layer in (reference, fused):
            if getattr(layer, "weight", None) is not None:
                layer.weight.copy_(torch.linspace(0.5, 1.5, layer.weight.numel()))
                layer.bias.copy_(torch.linspace(-0.3, 0.3, layer.bias.numel()))
    for step in range(steps):
        x = (torch.randn(shape, dtype=dtype) * (1 + 0.2 * step) + 0.3).to(device).contiguous(memory_format=memory_format)
        dy = torch.randn(shape, dtype=dtype).to(device).contiguous(memory_format=memory_format)
        outs = []
        for layer in (reference, fused):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), *outs):
            _close(b, a, rtol, msg=lambda m: f"step {step}: {name}: {m}")
        for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
            if a.is_floating_point():
                _close(b, a, rtol, msg=lambda m: f"step {step}: buffer {name}: {m}")
            else:
                assert torch.equal(a, b), f"step {step}: buffer {name}"
    return outs


@pytest.mark.parametrize("case", list(MABN_CASES))
def test_fused_equals_reference_float32(case, device):
    _compare(MABN_CASES[case], SHAPES.get(case, (8, 8, 6, 5)), device)


@pytest.mark.parametrize("case", ["formal-b=2", "full-statistics-b=2", "brn-b=2"])
def test_fused_equals_reference_float64(case, device):
    _compare(MABN_CASES[case], (8, 8, 6, 5), device, dtype=torch.float64, rtol=1e-10)


@pytest.mark.parametrize("case", ["formal-b=2", "bn-b=2"])
def test_fused_channels_last(case, device):
    y, dx, _, _ = _compare(MABN_CASES[case], (8, 8, 6, 5), device, memory_format=torch.channels_last)[1]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_under_autocast_matches_reference(dtype, device):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    layers = {name: MABN2d(8, buffer_size=2, warmup_iters=1, renorm_warmup_iters=1, norm_batch_size=2, backend=name).to(device)
              for name in ("reference", "fused")}
    x = torch.randn(4, 3, 6, 6).to(device)
    outputs = {}
    for name, layer in layers.items():
        with torch.autocast(device.type, dtype=dtype):
            h = conv(x)
            y = layer(h)
        assert y.dtype == dtype and layer.running_var.dtype == torch.float32
        outputs[name] = y.float()
    torch.testing.assert_close(outputs["fused"], outputs["reference"], rtol=1e-2, atol=1e-2)


def test_fused_path_never_synchronizes_with_the_host(monkeypatch, device):
    """No .item() / bool() / tolist() on tensors in the training forward and backward (compiled kernels warm).

    On the CPU the non-finite rule reads its flags, which are in host memory, to run one branch only
    (functional.branches_on_flags); there the test runs the policy of an accelerator, whose code it checks."""
    if device.type == "cpu":
        monkeypatch.setattr(functional, "branches_on_flags", lambda device: False)
    layer = MABN2d(8, buffer_size=3, warmup_iters=1, renorm_warmup_iters=1, norm_batch_size=2, backend="fused").to(device)
    warm = torch.randn(8, 8, 5, 5, device=device, requires_grad=True)
    layer(warm).sum().backward()

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronization in the MABN hot path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(3):
        layer(torch.randn(8, 8, 5, 5, device=device, requires_grad=True)).sum().backward()
    monkeypatch.undo()
    assert layer.num_steps.item() == 4


def test_backend_selection_and_errors(monkeypatch):
    assert backends.select("reference", torch.device("cpu")) is REFERENCE
    assert backends.select("fused", torch.device("cpu")) is backends.FUSED
    monkeypatch.setenv("MABN_BACKEND", "reference")
    assert backends.select("auto", torch.device("cpu")) is REFERENCE
    monkeypatch.setenv("MABN_BACKEND", "fast")
    with pytest.raises(ValueError, match="MABN_BACKEND must be one of"):
        backends.select("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="MABN2d: backend must be one of"):
        MABN2d(4, backend="triton")


def test_fused_falls_back_to_reference_when_compilation_fails(monkeypatch):
    monkeypatch.delenv("MABN_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_fused_works", {})

    def broken(device):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(backends, "_run_probe", broken)
    with pytest.warns(UserWarning, match=r"fused kernels unavailable on cpu \(RuntimeError: no compiler\)"):
        assert backends.select("auto", torch.device("cpu")) is REFERENCE
    assert backends.select("auto", torch.device("cpu")) is REFERENCE  # probed once per device type


def test_deepcopy_of_a_fused_layer_keeps_working():
    layer = MABN2d(4, norm_batch_size=2, backend="fused")
    clone = copy.deepcopy(layer)
    clone(torch.randn(4, 4, 3, 3, requires_grad=True)).sum().backward()


class _RefuseAll:
    def check(self, frame_locals):
        return False


def test_warm_variants_run_without_torch_compile_wrapper_and_what_no_guard_accepts_goes_through_it(monkeypatch):
    """Compiled variants run straight from dynamo's cache, picked by their own guards (here a float32 and a
    float64 variant taking turns, each against the reference); arguments no variant's guards accept go through
    torch.compile's wrapper, which compiles what is missing."""
    graph = backends._compiled(backends._forward)
    calls = []
    compiled = graph._compiled
    monkeypatch.setattr(graph, "_compiled", lambda *args: calls.append(1) or compiled(*args))
    make = MABN_CASES["formal-b=2"]  # compiled in both precisions by the tests above
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        _compare(make, (8, 8, 6, 5), torch.device("cpu"), steps=2, dtype=dtype, rtol=rtol)
    warm = len(calls)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10), (torch.float32, 1e-5)):
        _compare(make, (8, 8, 6, 5), torch.device("cpu"), steps=2, dtype=dtype, rtol=rtol)
    assert len(calls) == warm
    monkeypatch.setattr(graph, "_variants", [(_RefuseAll(), run) for _, run in graph._variants])
    _compare(make, (8, 8, 6, 5), torch.device("cpu"), steps=2)
    assert len(calls) == warm + 1  # once through the wrapper; then its variants are known again


def test_warm_variants_call_the_functions_behind_dynamo_disable_wrappers():
    """Dynamo's bytecode calls the compiled graph and its size helpers through ``disable`` wrappers, which do
    nothing where the warm variants run (no frame interception set) but switch it off and on again; the
    variants' globals hold the functions behind them instead, and nothing else changes."""
    import functools

    def f(x):
        return x

    codes = backends._disable_wrapper_codes()
    assert backends._undisabled(torch._dynamo.disable(f), codes) is f
    assert backends._undisabled(torch._disable_dynamo(f), codes) is f
    plain_wrapper = functools.wraps(f)(lambda x: f(x))
    assert backends._undisabled(plain_wrapper, codes) is plain_wrapper

    _compare(MABN_CASES["formal-b=2"], (8, 8, 6, 5), torch.device("cpu"), steps=2)
    unwrapped = 0
    for fn in (backends._forward, backends._backward):
        for _, run in backends._compiled(fn)._variants:
            for name in run.__code__.co_names:
                value, original = run.__globals__.get(name), fn.__globals__.get(name)
                objects = [(value, original)]
                if isinstance(value, type(torch)):
                    objects = [(getattr(value, a), getattr(original, a)) for a in run.__code__.co_names if hasattr(value, a)]
                for now, before in objects:
                    assert getattr(now, "__code__", None) not in codes, name
                    unwrapped += now is not before
    assert unwrapped >= 4  # at least each direction's graph and size helper


def test_graphs_with_the_rules_branches_are_loaded_from_inductors_caches(monkeypatch):
    """On the CPU the non-finite rule's branches are ``torch.cond`` subgraphs, which inductor and AOTAutograd
    cache only when marked cacheable; marked while the graphs here compile, a new process (here: the same one
    after a reset of dynamo) loads them from the on-disk caches instead of compiling them again, and the
    loaded graphs compute what the reference does."""
    from torch._dynamo.utils import counters

    make = MABN_CASES["formal-b=2"]
    monkeypatch.setattr(backends, "_GRAPHS", {})
    # twice from a reset: what a fresh process compiles first may differ from the variants the tests before
    # this one compiled as recompilations; the first round puts it in the caches, the second loads it
    for _ in range(2):
        backends._GRAPHS.clear()
        torch._dynamo.reset()
        counters.clear()
        _compare(make, (8, 8, 6, 5), torch.device("cpu"), steps=3)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2, dict(counters["inductor"])
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 2, dict(counters["aot_autograd"])
    assert not counters["inductor"]["fxgraph_cache_bypass"]


def _refuse_to_run(*args):
    raise AssertionError("a compiled variant ran")


def test_threads_compile_one_at_a_time_and_leave_the_configs_as_they_were():
    """Two threads reaching a graph's first call together (nn.DataParallel replicas): the second waits until
    the first has compiled, so the config patches around each compile are undone in order (on a torch whose
    patches are process-wide, interleaved ones would leave ``specialize_float`` on for the user's compiles)."""
    import threading

    inside, most = [0], [0]
    entered, release = threading.Event(), threading.Event()

    def compiling(t):  # stands in for torch.compile's wrapper on the slow path
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        entered.set()
        release.wait(10)
        inside[0] -= 1
        return t

    before = torch._dynamo.config.specialize_float
    graph = backends._Graph(lambda t: t + 1)
    graph._compiled = compiling
    first, second = (threading.Thread(target=graph, args=(torch.ones(1),)) for _ in range(2))
    first.start()
    assert entered.wait(10)
    second.start()
    second.join(0.5)  # time enough to enter the compile, were it not locked
    release.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert most[0] == 1
    assert torch._dynamo.config.specialize_float == before


def test_a_compile_stance_set_by_the_user_is_obeyed(monkeypatch):
    """``torch.compiler.set_stance("force_eager")`` runs the fused step's Python eagerly, not its compiled
    variants, and computes the same numbers; back at the default stance the variants run again."""
    make, shape = MABN_CASES["formal-b=2"], (8, 8, 6, 5)
    _compare(make, shape, torch.device("cpu"), steps=2)
    graphs = [backends._compiled(fn) for fn in (backends._forward, backends._backward)]
    warm = [graph._variants for graph in graphs]
    for graph in graphs:
        monkeypatch.setattr(graph, "_variants", [(guards, _refuse_to_run) for guards, _ in graph._variants])
    with torch.compiler.set_stance("force_eager"):
        _compare(make, shape, torch.device("cpu"), steps=2)
    for graph, variants in zip(graphs, warm):
        graph._variants = [(guards, _refuse_to_run) for guards, _ in variants]
    with pytest.raises(AssertionError, match="a compiled variant ran"):
        _compare(make, shape, torch.device("cpu"), steps=1)
