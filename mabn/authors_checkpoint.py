"""Loading ``state_dict``s saved by the authors' released MABN code into this package's layers.

The authors released two MABN layers with different buffers:

* formal (detection) layer: ``running_var`` (1, C, 1, 1), ``iters`` (long, shape (1,)), ``buffer_x2`` and
  ``buffer_gz`` (m, C), ring buffers written at slot ``iters % m``;
* classification layer: ``running_var`` (C,), ``iters`` (float, shape (1,)), ``pre_x2`` / ``pre_gz`` (m, C),
  the previous step's m groups in order, and ``sta_matrix`` (m, 2m), the constant band matrix of the
  sliding mean.

Here both become ``running_var`` (C,), ``num_steps``, ``num_norm_batches`` and the windows
``window_var`` / ``window_psi`` (m, C), oldest first. Everything else in the ``state_dict`` (convs, fc,
other norms) is passed through unchanged, after stripping a DataParallel ``module.`` prefix.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .layers.moving_average_bn import MovingAverageBatchNorm

FORMAL_KEYS = {"weight", "bias", "running_var", "iters", "buffer_x2", "buffer_gz"}
CLASSIFICATION_KEYS = {"weight", "bias", "running_var", "iters", "pre_x2", "pre_gz", "sta_matrix"}


def _sliding_mean_matrix(m: int) -> torch.Tensor:
    """The authors' ``sta_matrix``: row i averages the m values ending with this step's group i."""
    matrix = torch.zeros(m, 2 * m)
    for i in range(m):
        matrix[i, i + 1:m + i + 1] = 1.0 / m
    return matrix


def _convert_layer(name: str, layer: MovingAverageBatchNorm, entries: dict) -> dict:
    keys = set(entries)
    m, channels = layer.buffer_size, layer.num_features
    if not layer.reduced_stats:
        raise ValueError(f"{name}: the authors' MABN uses reduced statistics; this layer has reduced_stats=False")
    if keys == FORMAL_KEYS:
        ring_x2, ring_gz = entries["buffer_x2"], entries["buffer_gz"]
        kind = "formal"
    elif keys == CLASSIFICATION_KEYS:
        ring_x2, ring_gz = entries["pre_x2"], entries["pre_gz"]
        kind = "classification"
    else:
        raise ValueError(
            f"{name}: cannot map keys {sorted(keys)} onto MABN; expected the formal layer's {sorted(FORMAL_KEYS)} "
            f"or the classification layer's {sorted(CLASSIFICATION_KEYS)}"
        )
    if tuple(ring_x2.shape) != (m, channels) or tuple(ring_gz.shape) != (m, channels):
        raise ValueError(
            f"{name}: checkpoint windows have shape {tuple(ring_x2.shape)}, this layer needs (buffer_size={m}, "
            f"channels={channels}); build the layer with the checkpoint's window size"
        )
    running_var = entries["running_var"].reshape(-1)
    if running_var.numel() != channels:
        raise ValueError(f"{name}: running_var has {running_var.numel()} values, the layer has {channels} channels")
    steps = int(round(float(entries["iters"].reshape(-1)[0])))
    if kind == "formal":
        # ring slot of step t is t % m: the oldest of the last m steps sits at (t + 1) % m.
        shift = -((steps + 1) % m)
        window_var, window_psi = ring_x2.roll(shift, 0), ring_gz.roll(shift, 0)
        norm_batches = steps
    else:
        expected = _sliding_mean_matrix(m).to(entries["sta_matrix"].dtype)
        if entries["sta_matrix"].shape != expected.shape or not torch.allclose(entries["sta_matrix"], expected):
            raise ValueError(f"{name}: sta_matrix is not the authors' (m, 2m) sliding-mean matrix for m={m}")
        window_var, window_psi = ring_x2, ring_gz
        norm_batches = steps * m  # their classification layer normalizes m groups per step
    return {
        "weight": entries["weight"],
        "bias": entries["bias"],
        "running_var": running_var,
        "num_steps": torch.tensor(steps, dtype=torch.long),
        "num_norm_batches": torch.tensor(norm_batches, dtype=torch.long),
        "window_var": window_var,
        "window_psi": window_psi,
    }


def load_authors_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a ``state_dict`` from the authors' MABN code into ``model`` (whose MABN layers are ours).

    Raises ``ValueError`` naming every key it cannot map (and, with ``strict``, every key of ``model`` the
    checkpoint does not provide). Returns ``model.load_state_dict``'s result.
    """
    source = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, MovingAverageBatchNorm):
            continue
        prefix = f"{name}." if name else ""
        entries = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not entries:
            continue
        for key, value in _convert_layer(name or "<root>", layer, entries).items():
            converted[prefix + key] = value
        claimed.update(prefix + k for k in entries)
    converted.update({k: v for k, v in source.items() if k not in claimed})

    expected = model.state_dict()
    unexpected = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted)) if strict else []
    if unexpected or missing:
        raise ValueError(
            "cannot load the authors' state_dict: "
            + (f"keys with no place in the model: {unexpected}" if unexpected else "")
            + ("; " if unexpected and missing else "")
            + (f"model keys the checkpoint lacks: {missing}" if missing else "")
        )
    for key, value in converted.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"cannot load the authors' state_dict: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    return model.load_state_dict(converted, strict=strict)
