"""Uses of the MABN layers that would run, but wrongly or not at all, detected where the layers can see them.

* DDP's buffer broadcast (``broadcast_buffers=True``, torch's default) copies rank 0's buffers into every rank
  before each forward: MABN's SMA windows and counters are per-rank state (docs/algorithm.md), so every rank
  would silently train on rank 0's statistics. The layer checks once, in its first training forward, whether
  a ``DistributedDataParallel`` that broadcasts buffers is running it: that sees the user's own wrap too,
  not only the trainers' (``mabn.engine.distributed.wrap_ddp`` passes ``broadcast_buffers=False``).
* TorchScript cannot compile the training steps (Python around autograd functions and compiled graphs):
  :class:`NotScriptable` makes ``torch.jit.script`` of a model holding such a layer say what works instead.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn


def not_scriptable(layer: str) -> str:
    return (
        f"{layer} cannot be compiled by torch.jit.script (its training step is Python that TorchScript cannot compile). "
        "For inference, fold the model first (mabn.fold_model(model) leaves only torch modules, which script), "
        "or export it with torch.export.export(model.eval(), (example_input,))."
    )


class NotScriptable:
    """Mixin: ``torch.jit.script`` calls ``__prepare_scriptable__`` on every submodule before compiling; fail there
    with a way out instead of a TorchScript error deep in the training step."""

    def __prepare_scriptable__(self):
        raise RuntimeError(not_scriptable(type(self).__name__))


def _running_ddp(layer: nn.Module):
    """The DistributedDataParallel whose forward is running ``layer`` now, if any (found on the call stack)."""
    ddp_type = nn.parallel.DistributedDataParallel
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ddp_type) and any(m is layer for m in candidate.module.modules()):
            return candidate
        frame = frame.f_back
    return None


def warn_if_buffers_broadcast(layer: nn.Module) -> None:
    """Warn when ``layer`` (a norm with per-rank SMA windows) runs inside a DDP that broadcasts buffers."""
    if torch.compiler.is_compiling() or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    ddp = _running_ddp(layer)
    if ddp is not None and getattr(ddp, "broadcast_buffers", False):
        warnings.warn(
            f"{type(layer).__name__} runs inside DistributedDataParallel with broadcast_buffers=True: every forward "
            "overwrites each rank's SMA windows and counters with rank 0's, so the ranks do not keep their own "
            "statistics. Wrap the model with DistributedDataParallel(model, broadcast_buffers=False) (as "
            "mabn.engine.distributed.wrap_ddp does) and average the inference statistics before evaluating.",
            stacklevel=3,
        )
