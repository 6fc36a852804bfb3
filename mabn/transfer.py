"""Weights saved with one normalization, loaded into a model built with another.

    weights = torchvision.models.resnet50().state_dict()             # BN, 1000 classes
    model = mabn.convert_model(torchvision.models.resnet50(num_classes=10), norm="mabn", conv="cen")
    report = mabn.transfer_state_dict(model, weights)
    print(report.summary())
    # 159 tensors loaded, 53 norm statistics translated to the model's norms, 212 norm progress buffers restarted, ...;
    # new (initialized here): fc.* (2 keys); not loaded: fc.weight (checkpoint shape (1000, 2048), model (10, 2048)), ...

Tensors are matched by name and shape, as ``load_state_dict`` matches them. Each norm layer of the model
takes from the checkpoint's layer of the same name what its own type can use:

* the affine parameters (gamma, beta), from any norm;
* the inference statistics, in its own form: BN, BRN, SyncBN and frozen BN keep a mean and a variance, MABN
  with reduced statistics the second moment around zero, so BN's ``mean, var`` become ``var + mean^2`` and
  MABN's second moment becomes mean 0 with that variance (the same map at inference); GN, LN and IN keep none;
* the training progress (BN's ``num_batches_tracked``, MABN's counters and SMA windows): restarted by
  default, so that warm-ups (MABN's, BRN's r/d ramp) run again on the new data; ``reset_progress=False``
  carries it over where checkpoint and model keep it in the same form.

A MABN layer of the checkpoint does not go into a BN-type layer: its statistics belong with the weight-centered
convolutions of a MABN model, which a model built for BN does not have.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .layers.moving_average_bn import MovingAverageBatchNorm
from .layers.registry import has_running_statistics, is_norm

AFFINE = ("weight", "bias")
STATISTICS = ("running_mean", "running_var")
# Buffers that count training progress rather than describe the learned function.
PROGRESS_BUFFERS = ("num_batches_tracked", "num_steps", "num_norm_batches", "window_var", "window_mean", "window_psi",
                    "window_grad_mean")
# Buffers only MABN has: their presence marks a MABN layer in a checkpoint.
MABN_MARKERS = ("num_steps", "num_norm_batches", "window_var", "window_psi")
# Entries that error messages list one by one before they say how many more there are.
LISTED = 12

Strict = Union[bool, Callable[[str], bool]]


class IncompatibleStateDictError(ValueError):
    """Keys that ``strict`` requires could not be loaded; nothing was loaded. ``problems``: one line per kind."""

    def __init__(self, message: str, problems: list[str], report: "TransferReport"):
        super().__init__(message)
        self.problems, self.report = problems, report


@dataclass
class TransferReport:
    """What :func:`transfer_state_dict` did: model keys in the model's order, checkpoint keys in the checkpoint's."""

    loaded: list[str]  # model keys taken from the checkpoint as they are
    translated: list[str]  # model keys computed from another norm's statistics
    reset: list[str]  # norm progress buffers restarted
    new: list[str]  # model keys the checkpoint does not provide, left as they were
    dropped: dict[str, str]  # checkpoint key -> why the model's norm has no use for it
    skipped: dict[str, str]  # checkpoint key -> why it has no place in the model
    # checkpoint key -> (module prefix, reason) for keys that are listed together, as "prefix.* (reason)"
    skipped_groups: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    model_keys: list[str] = field(default_factory=list, repr=False)

    def skipped_lines(self, keys: Optional[list[str]] = None) -> list[str]:
        """``key (reason)`` for each skipped key, or ``module.* (reason)`` for keys skipped together."""
        keys = list(self.skipped) if keys is None else keys
        counts = Counter(self.skipped_groups[k] for k in keys if k in self.skipped_groups)
        lines, shown = [], set()
        for key in keys:
            group = self.skipped_groups.get(key)
            if group is not None and counts[group] > 1:
                if group not in shown:
                    shown.add(group)
                    lines.append(f"{group[0]}.* ({group[1]})")
            else:
                lines.append(f"{key} ({self.skipped[key]})")
        return lines

    def new_lines(self, keys: Optional[list[str]] = None) -> list[str]:
        """The new model keys, a module whose every key is new written ``module.* (N keys)``."""
        return compact_keys(self.new if keys is None else keys, self.model_keys)

    def summary(self) -> str:
        """One line for a log: how much was loaded and translated, what is new and what was left out."""
        counts = [f"{len(self.loaded)} tensors loaded"]
        if self.translated:
            counts.append(f"{len(self.translated)} norm statistics translated to the model's norms")
        if self.reset:
            counts.append(f"{len(self.reset)} norm progress buffers restarted")
        if self.dropped:
            counts.append(f"{len(self.dropped)} checkpoint tensors left unused by the model's norms")
        text = ", ".join(counts)
        if self.new:
            text += "; new (initialized here): " + ", ".join(self.new_lines())
        if self.skipped:
            text += "; not loaded: " + ", ".join(self.skipped_lines())
        return text


def transfer_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: Strict = False,
    reset_progress: bool = True,
    model_name: Optional[str] = None,
) -> TransferReport:
    """Load ``state_dict`` into ``model`` by name and shape, each norm layer taking what its type can use
    (see the module's docstring); returns the :class:`TransferReport`.

    ``strict``: which keys must load: ``False`` none (best effort, like ``load_state_dict(strict=False)``),
    ``True`` all, or a predicate on key names, e.g. ``lambda key: not key.startswith("fc.")`` for a
    classifier with another number of classes. Where a required checkpoint key has no place in the model or a
    required model key is missing from the checkpoint, nothing is loaded and
    :class:`IncompatibleStateDictError` lists them. ``model_name`` names the model in messages.
    """
    required = strict if callable(strict) else (lambda key: bool(strict))
    name = model_name or f"the {type(model).__name__}"
    target = model.state_dict()
    modules = dict(model.named_modules())
    entries_by_module: dict[str, dict] = defaultdict(dict)
    for key, value in state_dict.items():
        module_name, _, entry = key.rpartition(".")
        entries_by_module[module_name][entry] = value

    new_state, translated, dropped, skipped, groups = {}, set(), {}, {}, {}
    receiving_norms = []  # norm layers that take something from the checkpoint: their progress restarts
    for module_name, entries in entries_by_module.items():
        prefix = f"{module_name}." if module_name else ""
        module = modules.get(module_name)
        if module is None:
            absent = _outermost_absent(module_name, modules)
            for entry in entries:
                skipped[prefix + entry] = f"no module named {module_name!r} in {name}"
                groups[prefix + entry] = (absent, f"no module named {absent!r} in {name}")
            continue
        plan = _NormPlan.of(module, entries, reset_progress) if is_norm(module) else _NormPlan.unchanged(entries)
        for entry, reason in plan.refused.items():
            skipped[prefix + entry] = reason
            if plan.whole_layer:
                groups[prefix + entry] = (module_name, reason)
        dropped.update({prefix + entry: reason for entry, reason in plan.dropped.items()})
        for entry, value in plan.values.items():
            key = prefix + entry
            if not isinstance(value, torch.Tensor):
                skipped[key] = f"not a tensor but {type(value).__name__}"
            elif key not in target:
                skipped[key] = f"no such parameter or buffer in {type(module).__name__}"
            elif value.shape != target[key].shape:
                skipped[key] = f"checkpoint shape {tuple(value.shape)}, model {tuple(target[key].shape)}"
            else:
                new_state[key] = value
                if entry in plan.translated:
                    translated.add(key)
        if is_norm(module) and any(prefix + entry in new_state for entry in plan.values):
            receiving_norms.append((prefix, module))

    reset = set()
    for prefix, module in receiving_norms:
        for entry, value in _fresh_progress(module).items():
            if prefix + entry not in new_state:
                new_state[prefix + entry] = value
                reset.add(prefix + entry)

    report = TransferReport(
        loaded=[k for k in target if k in new_state and k not in translated and k not in reset],
        translated=[k for k in target if k in translated],
        reset=[k for k in target if k in reset],
        new=[k for k in target if k not in new_state],
        dropped=dropped, skipped=skipped, skipped_groups=groups, model_keys=list(target),
    )
    _check_required(report, required, name)
    model.load_state_dict(new_state, strict=False)
    return report


def _check_required(report: TransferReport, required: Callable[[str], bool], name: str) -> None:
    refused_modules = {key.rpartition(".")[0] for key in report.skipped}  # their keys are reported once, as unmapped
    unmapped = [key for key in report.skipped if required(key)]
    missing = [key for key in report.new if required(key) and key.rpartition(".")[0] not in refused_modules]
    problems = []
    if unmapped:
        problems.append(f"  {len(unmapped)} checkpoint key(s) cannot be mapped: " + _listing(report.skipped_lines(unmapped)))
    if missing:
        problems.append(f"  {len(missing)} key(s) of {name} missing from the checkpoint: " + _listing(report.new_lines(missing)))
    if problems:
        raise IncompatibleStateDictError(f"cannot load the state_dict into {name}:\n" + "\n".join(problems), problems, report)


def _listing(lines: list[str]) -> str:
    more = f", ... and {len(lines) - LISTED} more" if len(lines) > LISTED else ""
    return ", ".join(lines[:LISTED]) + more


def _outermost_absent(module_name: str, modules: Mapping[str, nn.Module]) -> str:
    """The shortest prefix of ``module_name`` that names no module (``layer5`` for ``layer5.0.conv1``)."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in modules:
            return prefix
    return module_name


def compact_keys(keys: list[str], universe: list[str]) -> list[str]:
    """``keys``, each run of keys that covers every key of ``universe`` under a module written ``module.* (N keys)``
    (the outermost such module), so that a listing of a detector's new FPN reads ``backbone.fpn.* (20 keys)``."""
    chosen = set(keys)
    total, covered = Counter(), Counter()
    for key in universe:
        for prefix in _prefixes(key):
            total[prefix] += 1
            covered[prefix] += key in chosen
    lines, shown = [], set()
    for key in keys:
        for prefix in _prefixes(key):
            if covered[prefix] == total[prefix] > 1:
                if prefix not in shown:
                    shown.add(prefix)
                    lines.append(f"{prefix}.* ({total[prefix]} keys)")
                break
        else:
            lines.append(key)
    return lines


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _translate_statistics(target: nn.Module, statistics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A norm layer's inference statistics in the form ``target`` keeps them.

    ``statistics`` holds ``running_var`` and ``running_mean`` (BN's form), or ``running_var`` alone: MABN's
    reduced statistic, the second moment around zero. Returns ``{}`` for a layer that keeps no statistics.
    """
    if not has_running_statistics(target):
        return {}
    var, mean = statistics["running_var"], statistics.get("running_mean")
    if isinstance(target, MovingAverageBatchNorm) and target.running_mean is None:
        return {"running_var": var if mean is None else var + mean * mean}
    if mean is None:  # mean 0 with the second moment as variance: the same map at inference
        mean = torch.zeros_like(var)
    return {"running_mean": mean, "running_var": var}


def _keeps_second_moment(module: nn.Module) -> bool:
    return isinstance(module, MovingAverageBatchNorm) and module.running_mean is None


@dataclass
class _NormPlan:
    """What one layer of the model takes from the checkpoint's layer of the same name."""

    values: dict  # entry -> tensor for the model's layer
    translated: set = field(default_factory=set)  # entries computed from another form of the statistics
    dropped: dict = field(default_factory=dict)  # entry -> why the layer has no use for it
    refused: dict = field(default_factory=dict)  # entry -> why it cannot go into the layer
    whole_layer: bool = False  # the layer as a whole was refused

    @classmethod
    def unchanged(cls, entries: dict) -> "_NormPlan":
        return cls(dict(entries))

    @classmethod
    def of(cls, module: nn.Module, entries: dict, reset_progress: bool) -> "_NormPlan":
        kind = type(module).__name__
        from_mabn = any(marker in entries for marker in MABN_MARKERS)
        if from_mabn and has_running_statistics(module) and not isinstance(module, MovingAverageBatchNorm):
            reason = (f"a MABN layer in the checkpoint, {kind} in the model: its statistics and centered convs only fit a "
                      "model built with norm='mabn'")
            return cls({}, refused={entry: reason for entry in entries}, whole_layer=True)
        plan = cls({entry: entries[entry] for entry in AFFINE if entry in entries})
        plan.refused = {entry: "not a norm parameter or buffer" for entry in entries
                        if entry not in AFFINE + STATISTICS + PROGRESS_BUFFERS}
        statistics = {entry: entries[entry] for entry in STATISTICS if entry in entries}
        if statistics and not has_running_statistics(module):
            plan.dropped.update({entry: f"{kind} keeps no running statistics" for entry in statistics})
        elif "running_var" in statistics:
            plan.values.update(_translate_statistics(module, statistics))
            source_second_moment = "running_mean" not in statistics
            if source_second_moment != _keeps_second_moment(module):
                plan.translated.update(STATISTICS)
        else:
            plan.values.update(statistics)  # a mean alone: the model reports the variance it lacks
        same_form = from_mabn == isinstance(module, MovingAverageBatchNorm) and (
            "running_mean" in entries) == (getattr(module, "running_mean", None) is not None)
        own_buffers = dict(module.named_buffers(recurse=False))
        for entry in PROGRESS_BUFFERS:
            if entry not in entries:
                continue
            if reset_progress:
                plan.dropped[entry] = "training progress, restarted"
            elif entry not in own_buffers:
                plan.dropped[entry] = f"{kind} keeps no {entry}"
            elif not same_form:
                plan.dropped[entry] = "training progress of another form of statistics, restarted"
            else:
                plan.values[entry] = entries[entry]
        return plan


@torch.no_grad()
def _fresh_progress(module: nn.Module) -> dict:
    """The layer's progress buffers as a newly built layer holds them."""
    if isinstance(module, MovingAverageBatchNorm):
        # A fresh layer with the same window layout, so that the seeding (zeros or, for the classification
        # warm-up, ones) stays MABN's own business.
        fresh = type(module)(module.num_features, buffer_size=module.buffer_size, warmup=module.warmup,
                             reduced_stats=module.reduced_stats)
        state = fresh.state_dict()
    else:
        state = {key: torch.zeros_like(value) for key, value in module.state_dict().items()}
    return {key: value for key, value in state.items() if key in PROGRESS_BUFFERS}
