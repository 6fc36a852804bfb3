"""What a norm layer tells about the non-finite statistics it kept out of its state.

The estimators of :mod:`mabn.layers.functional` never let a NaN or an infinity (an fp16 overflow under a
GradScaler, a NaN in an input) into an SMA window, an EMA or a running average: that normalization batch is
skipped, per channel, and counted in the layer's ``num_nonfinite_skipped`` (a buffer that follows the layer's
device but is not part of its ``state_dict``, so checkpoints keep their keys). The first time the count is
non-zero the layer warns, once, naming itself: by its place in the model whose forward runs it (``layer1.0.bn1``,
found on the call stack when it warns) and its kind.

The training step never waits for the device (``tests/test_fused.py`` holds it to that): the count is read
from a host copy, which on an accelerator is refreshed asynchronously and looked at only once the copy has
landed, so the warning can come a few steps after the skip.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn

COUNTER = "num_nonfinite_skipped"

# On an accelerator, how many training forwards pass between two asynchronous reads of a layer's count.
_READ_EVERY = 16


def register_counter(layer: nn.Module, device=None) -> None:
    """Give ``layer`` its count of skipped statistics (non-persistent: a state_dict does not change)."""
    layer.register_buffer(COUNTER, torch.zeros((), dtype=torch.long, device=device), persistent=False)


class SkipWarning:
    """Warns once per layer, after its training forwards, when its count of skipped statistics is non-zero."""

    def __init__(self):
        self.warned = False
        self._calls = 0
        self._host: Optional[torch.Tensor] = None  # pinned host copy of an accelerator's count
        self._landed: Optional[torch.cuda.Event] = None

    def __reduce__(self):
        # events and pinned memory belong to this process and device: a copy of the layer starts afresh
        return type(self), ()

    def after_training_forward(self, layer: nn.Module, label: str) -> None:
        count = layer._buffers[COUNTER]  # not nn.Module.__getattr__'s slow path: this runs on every training step
        if self.warned or torch.compiler.is_compiling():
            return
        skipped = self._read(count)
        if skipped:
            self.warned = True
            name = qualified_name(layer)
            where = f" at {name!r}" if name else ""
            warnings.warn(
                f"{label}{where}: {skipped} non-finite normalization statistic(s) (NaN or Inf: an fp16 overflow, a NaN "
                "in the input) were kept out of its moving averages and running statistics, which keep their previous "
                f"values; `{COUNTER}` counts them. This warning is given once per layer.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _read(self, count: torch.Tensor) -> int:
        if count.device.type == "cpu":
            return int(count.numpy())  # host memory: reading it waits for nothing
        if count.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return 0
        skipped = 0
        if self._landed is not None and self._landed.query():
            skipped, self._landed = int(self._host.numpy()), None
        self._calls += 1
        if self._landed is None and self._calls % _READ_EVERY == 1:
            if self._host is None:
                self._host = torch.zeros((), dtype=torch.long, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record()
        return skipped


def qualified_name(layer: nn.Module) -> str:
    """``layer``'s dotted name in the outermost module whose forward is running it ('' if none is).

    A module does not know its parents; the forwards of its ancestors are on the call stack, each frame's
    ``self`` the parent of the one below. Walked only when a layer warns, never in the training step."""
    names, target = [], layer
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and owner is not target:
            child_name = next((name for name, child in owner.named_children() if child is target), None)
            if child_name is not None:
                names.append(child_name)
                target = owner
        frame = frame.f_back
    return ".".join(reversed(names))
