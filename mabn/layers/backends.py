"""Which implementation of the training step a layer runs: the reference or the fused one.

Both compute the same numbers (``tests/test_fused.py``). ``'reference'`` is the spec written out, kept as
the oracle; ``'fused'`` is :mod:`mabn.layers.fused`; ``'auto'`` (the default of every layer) is fused
wherever ``torch.compile`` works on the input's device, else the reference with a warning. The
environment variable ``MABN_BACKEND`` overrides ``'auto'`` for a whole process.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import fused, normalize
from .estimators import BatchStatistics

BACKENDS = ("auto", "reference", "fused")


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable  # (estimator, x, weight, bias, state, cfg, groups) -> (y, plan)
    apply: Callable  # (x, weight, bias, plan, groups) -> y
    backward: Callable  # (estimator, dy, x, weight, plan, state, cfg, groups, needs_grad, bias_dtype) -> (dx, dw, db)


REFERENCE = Backend("reference", normalize.reference_forward, normalize.reference_apply, normalize.reference_backward)
FUSED = Backend("fused", fused.forward, fused.apply, fused.backward)

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
    state = BatchStatistics.State(None, None, None)
    y, _ = normalize.train_step(x, None, None, FUSED, BatchStatistics, state, BatchStatistics.Config(1e-5, 0.1), 2)
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
    if name == "auto":
        name = os.environ.get("MABN_BACKEND", "auto")
        if name not in BACKENDS:
            raise ValueError(f"environment variable MABN_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return REFERENCE
    if name == "fused" or _probe(device):
        return FUSED
    return REFERENCE
