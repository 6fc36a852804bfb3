"""The fused backend: a training step in two compiled graphs, as fast as BatchNorm's own kernels, and the switch
that picks it.

The reference backend (:mod:`mabn.layers.functional`) applies the formulas one tensor operation at a time: several
passes over the activations, as many temporaries, and dozens of small eager operations for the
estimator. Here each direction of a training step is one ``torch.compile`` graph (C++/OpenMP on the
CPU, Triton on CUDA; dynamic shapes, so every layer and batch size shares it) whose heavy part is two
memory-bound passes, as in BatchNorm itself, and whose estimator arithmetic on ``(G, C)`` tensors is
fused around them:

* forward:  per (sample, channel) sums of x^2 (or mean and centred second moment) -> estimator ->
  ``y = x * A + B``;
* backward: per (sample, channel) sums of dy and dy * (x - mean) -> estimator -> ``dx = dy * a + x * b + c``.

With ``k = weight * r / std`` and M values per normalization batch, the reference backward rearranges to

    Psi = k * sum(dy * (x - mean)) / M        g = weight * r * sum(dy) / M
    dx  = k * dy - Psi_bar / std^2 * (x - mean) - g_bar / std

``tests/test_fused.py`` holds the two backends together (docs/algorithm.md, section 11).

Which backend a layer runs is its ``backend`` option: ``'reference'``, ``'fused'``, or ``'auto'`` (the default
of every layer): fused wherever ``torch.compile`` works on the input's device, else the reference with a
warning. The environment variable ``MABN_BACKEND`` overrides ``'auto'`` for a whole process.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import types
import warnings
from typing import Optional

import torch

from .functional import REFERENCE, Backend, BatchStatistics, Plan, accumulation_dtype, split_groups, train_step

# Each graph is specialized per estimator, configuration, input rank, dtype and memory format (a few dozen
# variants in a process mixing 1d/2d/3d layers and precisions); dynamo's default of 8 per function is too low.
_RECOMPILE_LIMIT = 64
_GRAPHS: dict = {}


_LOG = logging.getLogger("mabn")
FIRST_COMPILE_MESSAGE = (
    "mabn: compiling the fused normalization kernels with torch.compile (once per process and layer configuration; "
    "the first training step takes about 15-40 s longer, the first channels_last input as long again; a few seconds "
    "in later processes, which load the kernels from torch's on-disk caches). "
    "MABN_BACKEND=reference (or backend='reference') runs the uncompiled reference path instead."
)


class _NoCudaRuntimeNotice(logging.Filter):
    """torch.utils.cpp_extension, which torch.compile imports, logs "No CUDA runtime is found, using CUDA_HOME=..."
    on every CPU machine that has a CUDA toolkit installed: noise for code that compiles no CUDA extension."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _announce_first_compile() -> None:
    if not _GRAPHS:
        _LOG.warning(FIRST_COMPILE_MESSAGE)
        logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())


class _Graph:
    """``torch.compile(fn)``, called without dynamo's per-call machinery once a variant is compiled.

    A call through ``torch.compile``'s wrapper costs ~25 us of Python before the compiled code runs (the
    wrapper's context managers and config patches, the frame interception), more than the arithmetic
    of a small layer. Dynamo keeps each compiled variant of ``fn`` as a cache entry: its guards (the
    conditions under which the variant is valid: tensor metadata, constants, global state such as grad
    mode and autocast) and the bytecode that runs it. Here the guards of the known entries are checked
    directly, most recently used first, and the bytecode of the first that accepts the arguments runs as
    a plain function: what dynamo would run, chosen by dynamo's own guards, less the ``disable`` wrappers
    that only matter while dynamo intercepts frames (:func:`_without_dynamo_disable`). Anything else (no entry
    fits, or dynamo is active around this call: tracing an enclosing model or intercepting frames) goes
    through ``torch.compile``'s wrapper, which compiles a new variant if needed; so does every call under
    a stance other than the default (``torch.compiler.set_stance``), which that wrapper obeys. (Dynamo drops an entry
    whose guards match an object by identity once that object dies; the graphs here take tensors,
    constants and module-level classes only, so no entry kept here can outlive what its guards name.)"""

    def __init__(self, fn):
        import torch._dynamo
        import torch._dynamo.eval_frame

        _announce_first_compile()

        self._eval_frame = torch._dynamo.eval_frame  # holds the stance set by torch.compiler.set_stance

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        self._fn = fn
        self._compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        self._arg_names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        self._variants: list = []  # (guard manager, compiled bytecode as a function), most recently used first
        self._runs: dict = {}  # compiled bytecode -> the function built from it, for the entries dynamo keeps

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # dynamo is tracing an enclosing function: let it inline fn
            return self._compiled(*args)
        # torch.compiler.set_stance (force_eager, fail_on_recompile...) is torch.compile's wrapper's to honour
        if _eval_frame_callback() is None and getattr(self._eval_frame, "_stance", _DEFAULT_STANCE).stance == "default":
            frame_locals = dict(zip(self._arg_names, args))
            variants = self._variants
            for i, (guards, run) in enumerate(variants):
                if guards.check(frame_locals):
                    if i:  # a new list, not an edit in place: layers may run in several threads (DataParallel)
                        self._variants = [variants[i], *variants[:i], *variants[i + 1:]]
                    return run(*args)
        # Floats (eps, momentum) as constants of the graph, not inputs: dynamo would otherwise wrap each in a
        # tensor on every call. A layer's floats are fixed, so this costs one variant per distinct value.
        # One thread at a time: on an older torch (2.9) these patches are process-wide, not per thread, and two
        # threads compiling at once (nn.DataParallel replicas on their first step) would restore them out of
        # order, leaving them on for the user's own compiles. Dynamo compiles one frame at a time anyway.
        with _COMPILING, torch._dynamo.config.patch(specialize_float=True), _cond_cacheable():
            out = self._compiled(*args)
            self._variants = self._known_variants()
        return out

    def _known_variants(self) -> list:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        fn = self._fn
        variants, runs = [], {}
        for entry in _debug_get_cache_entry_list(fn.__code__):
            # built once per entry (a copy of the module's globals, the wrappers looked up: ~40 us), not on
            # every call that comes this way (under a stance, or inside an enclosing compile: each call does)
            run = self._runs.get(entry.code)
            if run is None:
                # The bytecode reads the compiled graph from fn's module globals; a snapshot keeps it alive even
                # if dynamo's caches are reset later.
                scope = _without_dynamo_disable(dict(fn.__globals__), entry.code.co_names)
                run = types.FunctionType(entry.code, scope, fn.__name__, fn.__defaults__, fn.__closure__)
            runs[entry.code] = run
            variants.append((entry.guard_manager, run))
        self._runs = runs  # the entries dynamo dropped go here too
        return variants


_COMPILING = threading.RLock()  # re-entrant: a call back into the slow path from the same thread cannot deadlock
_COND = "torch.ops.higher_order.cond"
_DEFAULT_STANCE = types.SimpleNamespace(stance="default")  # for a torch without torch.compiler.set_stance


def _cond_cacheable():
    """While compiling the graphs here: graphs with ``torch.cond`` are kept in inductor's on-disk caches.

    Inductor and AOTAutograd cache no graph holding a higher-order operator unless it is marked cacheable
    (``unsafe_marked_cacheable_functions``: an operator that reads something outside the graph would be
    looked up by a key that does not see it). ``cond`` reads nothing but its operands and its two branch
    subgraphs, and the cache keys hash the branches' code with the graph's. Unmarked, every process
    compiled the CPU graphs of the non-finite rule (functional._unless_skipped) afresh: 4-6 s more per
    pair of forward and backward graphs on its first step, on every rank of every run, even with warm
    caches. The mark holds for these compiles only, not for the user's own."""
    import torch._inductor.config as inductor_config

    marked = getattr(inductor_config, "unsafe_marked_cacheable_functions", None)
    if marked is None or _COND in marked:  # a torch without the option; or the user marked it already
        return contextlib.nullcontext()
    return inductor_config.patch(unsafe_marked_cacheable_functions={**marked, _COND: torch.__version__})


@functools.lru_cache(maxsize=None)
def _disable_wrapper_codes() -> tuple:
    """The code objects of the wrappers that ``torch._dynamo.disable`` and ``torch._disable_dynamo`` put around a
    function (empty where this version of torch has neither)."""
    probe = lambda: None  # noqa: E731
    codes = []
    for disable in (getattr(torch, "_disable_dynamo", None), getattr(torch._dynamo, "disable", None)):
        try:
            codes.append(disable(probe).__code__)
        except Exception:
            pass
    return tuple(codes)


def _undisabled(obj, wrapper_codes: tuple):
    """The function behind dynamo's disable wrappers around ``obj`` (``obj`` itself if it has none)."""
    while getattr(obj, "__code__", None) in wrapper_codes:
        inner = getattr(obj, "_torchdynamo_orig_callable", None) or getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    return obj


def _without_dynamo_disable(scope: dict, names: tuple) -> dict:
    """``scope`` with dynamo's disable wrappers taken off what compiled bytecode reading ``names`` calls.

    Dynamo's bytecode calls the compiled graph, and its helpers that read the inputs' sizes and mark the
    bytecode for the profiler (``call_size``, ``record_pregraph_bytecode_enter/exit``), through ``disable``
    wrappers: each switches dynamo's frame interception off for the call and back on after it (0.5-1 us on
    an idle machine, several times that under load; 12 calls per MABN step). :class:`_Graph` runs the
    bytecode only where no interception is set, so there each wrapper does nothing but cost; the functions
    behind them are called directly instead. The
    helpers are attributes of modules the bytecode imports (``torch._dynamo.utils``): such a module is
    replaced, for this bytecode only, by a module holding the attributes it reads."""
    codes = _disable_wrapper_codes()
    for name in names:
        value = scope.get(name)
        if isinstance(value, types.ModuleType):
            attributes = {attr: getattr(value, attr) for attr in names if hasattr(value, attr)}
            undisabled = {attr: _undisabled(v, codes) for attr, v in attributes.items()}
            if any(undisabled[attr] is not attributes[attr] for attr in attributes):
                module = types.ModuleType(value.__name__)
                module.__dict__.update(undisabled)
                scope[name] = module
        elif value is not None:
            scope[name] = _undisabled(value, codes)
    return scope


def _eval_frame_callback():
    return torch._C._dynamo.eval_frame.get_eval_frame_callback()


def _compiled(fn) -> _Graph:
    graph = _GRAPHS.get(fn)
    if graph is None:
        graph = _GRAPHS[fn] = _Graph(fn)
    return graph


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) -> (G, b, C, *S), a view; (N, C) inputs (MABN1d on features) become (G, b, C, 1).

    The compiled graphs only ever see grouped views, with their outputs written into grouped views of
    tensors allocated here: reshaping between (N, ...) and (G, b, ...) inside a graph with dynamic shapes
    is a copy (N = G * b is not provable there), and indexing (G, C) coefficients per sample instead costs
    an integer division per vector; either doubled the time of the grouped passes."""
    return split_groups(x.unsqueeze(-1) if x.dim() == 2 else x, groups)


def _per_group(t: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """(G, C) -> (G, 1, C, 1, ...), broadcastable against a grouped tensor."""
    return t.view(t.shape[0], 1, t.shape[1], *([1] * (grouped.dim() - 3)))


def _moments(xg: torch.Tensor, centered: bool):
    """Per-group ``(mean or None, biased second moment, values per group)``, from per-row sums."""
    per_row = xg.numel() // (xg.shape[0] * xg.shape[1] * xg.shape[2])
    count = xg.shape[1] * per_row
    rows = tuple(range(3, xg.dim()))
    xa = _acc(xg)
    if not centered:
        return None, (xa * xa).sum(rows).sum(1) / count, count
    row_mean = xa.mean(rows, keepdim=True)
    centred = xa - row_mean
    row_m2 = (centred * centred).sum(rows)
    means = row_mean.flatten(2)  # (G, b, C)
    mean = means.mean(1)
    # Chan et al.'s pairwise combination of the rows' moments: exact, no E[x^2] - E[x]^2 cancellation.
    m2 = row_m2.sum(1) + per_row * ((means - mean[:, None]) ** 2).sum(1)
    return mean, m2 / count, count


def _scale_and_shift(weight, bias, plan: Plan, acc: torch.dtype):
    """(G, C) coefficients of ``y = x * A + B``."""
    inv_std = 1.0 / plan.std.to(acc)
    k = inv_std if weight is None else weight.to(acc) * inv_std
    if plan.r is not None:
        k = k * plan.r.to(acc)
    shift = -k * plan.mean.to(acc) if plan.mean is not None else torch.zeros_like(k)
    if plan.d is not None:
        shift = shift + (plan.d.to(acc) if weight is None else weight.to(acc) * plan.d.to(acc))
    if bias is not None:
        shift = shift + bias.to(acc)
    return k, shift


def _apply(xg, out, weight, bias, plan: Plan):
    k, shift = _scale_and_shift(weight, bias, plan, accumulation_dtype(xg.dtype))
    out.copy_(_acc(xg) * _per_group(k, xg) + _per_group(shift, xg))


def _forward(estimator, xg, out, weight, bias, state, cfg):
    mean, var, count = _moments(xg, estimator.centered(cfg))
    plan = estimator.forward(mean, var, count, state, cfg)
    _apply(xg, out, weight, bias, plan)
    return plan


def _backward(estimator, dyg, xg, dx, weight, plan: Plan, state, cfg, needs_grad, bias_dtype):
    acc = accumulation_dtype(xg.dtype)
    count = xg.numel() // (xg.shape[0] * xg.shape[2])  # values per normalization batch
    rows = tuple(range(3, xg.dim()))
    d, xa = _acc(dyg), _acc(xg)
    std = plan.std.to(acc)
    center = None if plan.mean is None else plan.mean.to(acc)
    centred = xa if center is None else xa - _per_group(center, xg)
    sdy = d.sum(rows).sum(1)
    sdyz = (d * centred).sum(rows).sum(1)  # sum(dy * (x - mean)) per group
    wr = torch.ones_like(std) if weight is None else weight.to(acc).expand_as(std)
    if plan.r is not None:
        wr = wr * plan.r.to(acc)
    k = wr / std
    psi = k * sdyz / count
    g_mean = wr * sdy / count if center is not None else None
    g_mean, psi = estimator.backward(g_mean, psi, plan, state, cfg)

    dweight = dbias = None
    if dx is not None:
        slope = -psi.to(acc) / (std * std)  # coefficient of x
        out = d * _per_group(k, xg) + xa * _per_group(slope, xg)
        if center is not None:
            out = out + _per_group(-slope * center - g_mean.to(acc) / std, xg)
        dx.copy_(out)
    if weight is not None and needs_grad[1]:
        y_hat_sums = sdyz / std if plan.r is None else plan.r.to(acc) * sdyz / std
        if plan.d is not None:
            y_hat_sums = y_hat_sums + plan.d.to(acc) * sdy
        dweight = y_hat_sums.sum(0).to(weight.dtype)
    if needs_grad[2]:
        dbias = sdy.sum(0).to(bias_dtype)
    return dweight, dbias


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # dynamo gives nn.Parameters static shapes (force_parameter_static_shapes): a parameter passed as is would
    # specialize the graph to its channel count and recompile it for every layer width.
    return None if t is None else t.detach()


def forward(estimator, x, weight, bias, state, cfg, groups):
    y = torch.empty_like(x)
    plan = _compiled(_forward)(estimator, _grouped(x, groups), _grouped(y, groups), _plain(weight), _plain(bias), state, cfg)
    return y, plan


def apply(x, weight, bias, plan: Plan, groups):
    y = torch.empty_like(x)
    _compiled(_apply)(_grouped(x, groups), _grouped(y, groups), _plain(weight), _plain(bias), plan)
    return y


def backward(estimator, dy, x, weight, plan, state, cfg, groups, needs_grad, bias_dtype):
    dx = torch.empty_like(x) if needs_grad[0] else None
    dweight, dbias = _compiled(_backward)(
        estimator, _grouped(dy, groups), _grouped(x, groups), None if dx is None else _grouped(dx, groups),
        _plain(weight), plan, state, cfg, needs_grad, bias_dtype,
    )
    return dx, dweight, dbias


def moments(x: torch.Tensor, groups: int, centered: bool):
    """``(mean or None, var)`` per normalization batch, as the fused forward computes them (for tests)."""
    mean, var, _ = _compiled(_moments)(_grouped(x, groups), centered)
    return mean, var


FUSED = Backend("fused", forward, apply, backward)


# ----------------------------------------------------------------------------- the switch
BACKENDS = ("auto", "reference", "fused")

_fused_works: dict[str, bool] = {}


def check_backend(name: str, layer: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{layer}: backend must be one of {BACKENDS}, got {name!r}")
    return name


def _run_probe(device: torch.device) -> None:
    # A generator of its own: drawing from the global one would shift every later random number of a run
    # by whether (and when) it probed, and a resumed run would no longer match an uninterrupted one.
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=device, generator=generator, requires_grad=True)
    state = BatchStatistics.State(running_mean=None, running_var=None, num_batches_tracked=None)
    y, _ = train_step(x, None, None, FUSED, BatchStatistics, state, BatchStatistics.Config(eps=1e-5, momentum=0.1), 2)
    y.sum().backward()


def _probe(device: torch.device) -> bool:
    """Compile and run the fused step once on a tiny input of ``device``'s type; False if that fails."""
    key = device.type
    if key not in _fused_works:
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                _run_probe(device)
            _fused_works[key] = True
        except Exception as e:  # no C++ compiler, no Triton, an unsupported device...
            warnings.warn(f"mabn: fused kernels unavailable on {key} ({type(e).__name__}: {e}); using the reference path")
            _fused_works[key] = False
    return _fused_works[key]


def select(name: str, device: torch.device) -> Backend:
    """The backend a layer with option ``backend=name`` runs on ``device``."""
    if name == "auto":
        name = os.environ.get("MABN_BACKEND", "auto")
        if name not in BACKENDS:
            raise ValueError(f"environment variable MABN_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return REFERENCE
    if name == "fused" or _probe(device):
        return FUSED
    return REFERENCE
