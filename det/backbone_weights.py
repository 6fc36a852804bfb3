"""ImageNet ResNet-50 weights onto the body of a detection model built by :func:`det.model.build_mask_rcnn`.

    report = load_backbone_weights(model, "resnet50_mabn.pth")
    print(f"loaded {len(report['loaded'])} body tensors; new: {len(report['new'])} (FPN, RPN, heads)")

Accepted sources: a torchvision-format ResNet-50 ``state_dict`` (``conv1.weight``, ``bn1.running_mean``,
``layer1.0.conv1.weight``, ..., ``fc.*``) or a checkpoint of the classification trainer
``{'model': state_dict, ...}``, possibly saved from DistributedDataParallel (``module.`` prefix), with
BN-format norms or MABN-format ones (``running_var``, ``num_steps``, ``num_norm_batches``, windows).

Each norm of the body takes what its type can use:

* MABN from BN statistics: gamma, beta and the second moment ``running_var = var + mean^2`` (reduced
  statistics; full ones keep mean and variance), the translation ``mabn.convert_model`` applies;
* MABN from MABN: gamma, beta and the inference statistics;
* BN, SyncBN, BRN, FrozenBN from BN statistics: as they are;
* GN / LN / IN: gamma and beta only.

Training-progress state (MABN's ``num_steps``, ``num_norm_batches`` and SMA windows, BN / BRN's
``num_batches_tracked``) is reset by default, so that MABN's warm-up (and BRN's r/d ramp) reruns on
detection data; ``reset_norm_state=False`` carries it over where source and target formats agree.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import mabn
from mabn.layers.registry import has_running_statistics, is_norm

BODY_PREFIX = "backbone.body."
CLASSIFIER_PREFIX = "fc."  # the ImageNet classifier has no counterpart in a detector

# Buffers that count training progress rather than describe the learned function.
PROGRESS_BUFFERS = ("num_batches_tracked", "num_steps", "num_norm_batches", "window_var", "window_mean", "window_psi", "window_grad_mean")
# Buffers only MABN has: their presence marks a MABN-format source layer.
MABN_MARKERS = ("num_steps", "num_norm_batches", "window_var", "window_psi")
NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var") + PROGRESS_BUFFERS

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def load_backbone_weights(model: nn.Module, checkpoint_or_state_dict: Source, reset_norm_state: bool = True) -> dict:
    """Copy a ResNet-50 ``state_dict`` (or a path / classification checkpoint holding one) into
    ``model.backbone.body``.

    Returns ``{'loaded': [...], 'new': [...], 'reset': [...]}``: the model keys taken from the checkpoint,
    the model keys it does not cover by design (FPN, RPN, box and mask heads), and the progress buffers of
    the body's norms left at their initial values. Raises ``ValueError`` listing every checkpoint key that
    has no place in the body (unknown module, shape mismatch, incompatible norm) and every body key the
    checkpoint does not provide; the classifier (``fc.*``) is dropped silently.
    """
    origin = str(checkpoint_or_state_dict) if isinstance(checkpoint_or_state_dict, (str, os.PathLike)) else "the given state_dict"
    source = _read_state_dict(checkpoint_or_state_dict, origin)
    body = _body_of(model)
    modules = dict(body.named_modules())
    target = body.state_dict()

    entries_by_module = defaultdict(dict)
    for key, value in source.items():
        module_name, _, entry = key.rpartition(".")
        entries_by_module[module_name][entry] = value

    new_state, fresh, problems = {}, [], []
    refused_modules = set()  # their keys are reported once, as unmappable, not again as missing
    for module_name, entries in entries_by_module.items():
        module = modules.get(module_name) if module_name else None
        if module is None:
            problems += [f"{module_name}.{entry} (no module named {module_name!r} in the ResNet body)" for entry in entries]
            continue
        translated, refused = _translate(module_name, module, entries, reset_norm_state)
        for entry, value in translated.items():
            key = f"{module_name}.{entry}"
            if key not in target:
                refused.append(f"{key} (no such parameter or buffer in {type(module).__name__})")
            elif value.shape != target[key].shape:
                refused.append(f"{key} (checkpoint shape {tuple(value.shape)}, model {tuple(target[key].shape)})")
            else:
                new_state[key] = value
        if refused:
            problems += refused
            refused_modules.add(module_name)

    for module_name, module in modules.items():
        if is_norm(module):
            for entry, value in _fresh_progress(module).items():
                key = f"{module_name}.{entry}"
                if key not in new_state:
                    new_state[key] = value
                    fresh.append(key)
    missing = [key for key in target if key not in new_state and key.rpartition(".")[0] not in refused_modules]
    if problems or missing:
        lines = [f"cannot load backbone weights from {origin} into the ResNet body:"]
        if problems:
            lines.append(f"  {len(problems)} checkpoint key(s) cannot be mapped: " + ", ".join(problems))
        if missing:
            lines.append(f"  {len(missing)} body key(s) missing from the checkpoint: " + ", ".join(missing))
        raise ValueError("\n".join(lines))

    body.load_state_dict(new_state)
    fresh_set = set(fresh)
    return {
        "loaded": [BODY_PREFIX + key for key in target if key not in fresh_set],
        "new": [key for key in model.state_dict() if not key.startswith(BODY_PREFIX)],
        "reset": [BODY_PREFIX + key for key in fresh],
    }


def _read_state_dict(source: Source, origin: str) -> dict:
    """A flat ``{key: tensor}`` with any ``module.`` prefix and the classifier removed."""
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # missing, truncated, not a torch file, or pickled objects beyond tensors
            raise RuntimeError(f"cannot read backbone checkpoint {origin}: {type(exc).__name__}: {exc}") from exc
    if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping):
        source = source["model"]  # a checkpoint of the classification trainer
    if not isinstance(source, Mapping) or not source or not all(isinstance(v, torch.Tensor) for v in source.values()):
        found = sorted(source)[:8] if isinstance(source, Mapping) else type(source).__name__
        raise ValueError(
            f"{origin} holds no ResNet-50 state_dict: expected {{name: tensor}} or a checkpoint "
            f"{{'model': state_dict, ...}}, found {found}"
        )
    state = dict(source)
    consume_prefix_in_state_dict_if_present(state, "module.")  # saved from DistributedDataParallel
    return {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIX)}


def _body_of(model: nn.Module) -> nn.Module:
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None:
        raise TypeError(
            f"load_backbone_weights needs a detection model with backbone.body (build_mask_rcnn's), got "
            f"{type(model).__name__}; unwrap DistributedDataParallel first"
        )
    return body


def _translate(name: str, module: nn.Module, entries: dict, reset: bool) -> tuple[dict, list]:
    """``(entries for the module's state_dict, problems)``: a norm gets the checkpoint layer's parameters
    and statistics in its own format; any other module takes the entries unchanged."""
    if not is_norm(module):
        return entries, []
    unknown = [f"{name}.{entry} (not a norm parameter or buffer)" for entry in entries if entry not in NORM_ENTRIES]
    if unknown:
        return {}, unknown
    source_is_mabn = any(marker in entries for marker in MABN_MARKERS)
    # Counters the target does not keep (FrozenBN has no num_batches_tracked) are dropped, not errors.
    own_buffers = set(module.state_dict())
    progress = {} if reset else {k: v for k, v in entries.items() if k in PROGRESS_BUFFERS and k in own_buffers}
    affine = {k: entries[k] for k in ("weight", "bias") if k in entries}
    statistics = {k: entries[k] for k in ("running_mean", "running_var") if k in entries}
    if not has_running_statistics(module):  # GN / LN / IN keep no statistics
        return affine, []
    if isinstance(module, mabn.MovingAverageBatchNorm):
        if not source_is_mabn:
            statistics = _mabn_statistics_from_bn(module, statistics)
        return {**affine, **statistics, **progress}, []
    if source_is_mabn:
        return {}, [
            f"{name}.* (a MABN layer in the checkpoint, {type(module).__name__} in the model: its statistics and "
            "centered convs only fit a model built with norm='mabn')"
        ]
    return {**affine, **statistics, **progress}, []


def _mabn_statistics_from_bn(module: nn.Module, statistics: dict) -> dict:
    if "running_mean" not in statistics or "running_var" not in statistics:
        return {}  # reported as missing statistics
    mean, var = statistics["running_mean"], statistics["running_var"]
    if module.running_mean is not None:  # full statistics: mean and variance as BN keeps them
        return {"running_mean": mean, "running_var": var}
    return {"running_var": var + mean * mean}  # reduced statistic: the second moment around zero


@torch.no_grad()
def _fresh_progress(module: nn.Module) -> dict:
    """The module's progress buffers as a newly built layer holds them."""
    if isinstance(module, mabn.MovingAverageBatchNorm):
        # A fresh layer with the same window layout, so that the seeding (zeros or, for the classification
        # warm-up, ones) stays MABN's own business.
        fresh = type(module)(module.num_features, buffer_size=module.buffer_size, warmup=module.warmup, reduced_stats=module.reduced_stats)
        state = fresh.state_dict()
    else:
        state = {key: torch.zeros_like(value) for key, value in module.state_dict().items()}
    return {key: value for key, value in state.items() if key in PROGRESS_BUFFERS}
