"""Checkpoints that survive being killed mid-save and load without executing pickled code.

A checkpoint is a plain dict of tensors and Python primitives (model, optimizer, scheduler and scaler
state, counters, RNG states, the resolved config as YAML), so ``torch.load(weights_only=True)`` reads
it. It is written to a temporary file in the same directory and renamed over the old one: the rename
is atomic, so a kill at any moment leaves either the previous checkpoint or the new one.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from torch import nn

from ..transfer import IncompatibleStateDictError, TransferReport, transfer_state_dict
from .config import ConfigError
from .distributed import all_finite, all_gather_objects, average_norm_statistics, barrier
from .launch import NonFiniteLossError
from .output_dir import FINAL_MODEL, write_file_atomically


class NonFiniteModelError(NonFiniteLossError):
    """The model holds NaN/Inf parameters or buffers at a save: not saved; the message names the checkpoint kept."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what is needed; the message names the file."""


class _RecordedWrites:
    """A file whose first failed write is kept: torch.save reports it as ``inline_container.cc ... unexpected pos``
    and loses the cause (a full disk), which is what the user needs to hear."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


def save_checkpoint(state: dict, path: str) -> str:
    """Write ``state`` to ``path`` atomically; a failure (a full disk) is an :class:`OutputError` naming the file and
    the cause, and leaves the previous ``path`` as it was."""
    kept = f"the previous {os.path.basename(path)} is kept" if os.path.isfile(path) else ""

    def write(f):
        recorded = _RecordedWrites(f)
        try:
            torch.save(state, recorded)
        except RuntimeError:
            if recorded.error is None:
                raise
            raise recorded.error from None

    return write_file_atomically(path, write, binary=True, kept=kept)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def model_state_dict(state: dict, path: str = "<checkpoint>") -> dict:
    """The model weights of a trainer checkpoint or of a bare ``state_dict``, without a DDP ``module.`` prefix."""
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} holds neither a trainer checkpoint ('model' entry) nor a state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in weights.items()}


def _read_weights(path: str, key: str) -> dict:
    try:
        return model_state_dict(load_checkpoint(path), path)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(f"{key}: {e}") from None


def load_weights(model: nn.Module, path: str, key: str, must_match: str = "") -> None:
    """Model weights of a trainer checkpoint or a bare ``state_dict`` into ``model``, exactly (what is evaluated).
    Errors are config errors (exit code 2) that name ``key``, where the path came from (``MODEL.WEIGHTS``,
    ``--checkpoint``), and the file; ``must_match`` says which settings must agree with the run that saved it."""
    weights = _read_weights(path, key)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        hint = f" ({must_match} must match the run that saved it)" if must_match else ""
        raise ConfigError(f"{key}: cannot load {path} into this {type(model).__name__}{hint}: {e}") from None


def load_pretrained(model: nn.Module, path: str, key: str, required: Callable[[str], bool], must_match: str, log) -> TransferReport:
    """Weights to start training from (``MODEL.WEIGHTS``): a trainer checkpoint or a bare ``state_dict``, saved with
    any norm and possibly another head, through :func:`mabn.transfer_state_dict`. The keys for which ``required``
    holds must load (else a config error naming ``key``, the file and ``must_match``); what was loaded,
    translated, restarted, left new and skipped goes to the log."""
    weights = _read_weights(path, key)
    try:
        report = transfer_state_dict(model, weights, strict=required, model_name=f"this {type(model).__name__}")
    except IncompatibleStateDictError as e:
        raise ConfigError(f"{key}: cannot load {path} into this {type(model).__name__} ({must_match}):\n"
                          + "\n".join(e.problems)) from None
    log.info(f"{key} {path}: {report.summary()}")
    return report


def rng_states() -> dict:
    """Every random generator a training step draws from, as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(model: nn.Module) -> dict:
    """What differs between ranks and must come back on resume: RNG states and the model's buffers (MABN's
    per-rank SMA windows and counters, statistics not averaged across ranks)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {"rng": rng_states(), "buffers": {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in parameters}}


def gather_rank_states(model: nn.Module) -> list[dict]:
    """Every rank's :func:`rank_state`, in rank order (a collective: call it on every rank)."""
    return all_gather_objects(rank_state(model))


def own_rank_state(state: dict, rank: int, world_size: int) -> Optional[dict]:
    """This rank's entry of a checkpoint's ``ranks``, or None when it was saved by another number of processes."""
    ranks = state.get("ranks", [])
    return ranks[rank] if len(ranks) == world_size else None


# ----------------------------------------------------------------------------- a training run's checkpoint
RUN_STATE = ("model", "optimizer", "scheduler", "scaler", "rng")


def save_training_checkpoint(path: str, is_main: bool, model: nn.Module, optimizer, scheduler, scaler,
                             counters: dict, config: str, metrics: dict) -> None:
    """Write the checkpoint a run resumes from (a collective: every rank calls it, rank 0 writes).

    Parameters and optimizer, scheduler and scaler states are the same on every rank; buffers (MABN's
    windows) and RNG states are not, so each rank's are kept under ``ranks``.
    """
    ranks = gather_rank_states(model)
    if is_main:
        save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": ranks[0]["rng"], "ranks": ranks, "config": config, "metrics": metrics,
            **counters,
        }, path)
    barrier()


@dataclass
class Resumed:
    counters: dict  # the trainer's progress counters, as saved
    metrics: dict
    saved_by: int  # processes that saved the checkpoint
    config: str  # the resolved config of the run that saved it (YAML)
    exact: bool  # False when saved by another number of processes: rank 0's buffers and RNG state for all

    def inexact_note(self, world_size: int) -> str:
        return (f"the checkpoint was saved by {self.saved_by} process(es), this run has {world_size}: every rank "
                "starts from rank 0's random state and norm buffers (not an exact resume)")


def load_training_checkpoint(path: str, rank: int, world_size: int, model: nn.Module, optimizer, scheduler, scaler,
                             counters: tuple[str, ...], map_location: Any = "cpu") -> Resumed:
    """Restore what :func:`save_training_checkpoint` wrote, this rank's own buffers and RNG states included.
    Raises FileNotFoundError / CheckpointError naming the file when it is absent, unreadable, or not a
    checkpoint of a training run with these ``counters``."""
    state = load_checkpoint(path, map_location=map_location)
    missing = [k for k in (*RUN_STATE, *counters) if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (missing {missing}); use MODEL.WEIGHTS to start from weights")
    own = own_rank_state(state, rank, world_size)
    try:
        model.load_state_dict({**state["model"], **(own["buffers"] if own else {})})
    except RuntimeError as e:  # missing / unexpected keys or other shapes: a model of another config
        raise CheckpointError(f"{path} does not fit this model: it was written by a run with another model (MODEL.NORM, "
                              f"its options, the architecture or the classes differ):\n{e}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(own["rng"] if own else state["rng"])
    return Resumed({k: state[k] for k in counters}, state.get("metrics", {}), len(state.get("ranks", [])),
                   state.get("config", ""), own is not None)


def resume_path(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """What a run resumes from: ``--resume PATH``; with ``--resume`` alone, or when an interrupted run left one in
    ``output_dir``, its ``checkpoint.pth``; else nothing."""
    path = os.path.join(output_dir, "checkpoint.pth")
    if resume == "" or (resume is None and os.path.isfile(path)):
        return path
    return resume


ACCEPT_CHANGED_KEY = "CHECKPOINT.RESUME_CHANGED_CONFIG"  # resume even where the keys that give it meaning changed


_ABSENT = object()


def _at(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _ABSENT
        values = values[part]
    return values


def changed_keys(saved_config: str, cfg, keys: tuple[str, ...]) -> list[str]:
    """``KEY: saved -> now`` for each of ``keys`` (a whole section, such as MODEL.NORM_OPTIONS, compares as one value)
    whose value differs between the saved YAML config and ``cfg``; keys the saved config lacks (an older trainer)
    are not compared."""
    saved = (yaml.safe_load(saved_config) or {}) if saved_config else {}
    now = cfg.to_dict()
    return [f"{key}: {_at(saved, key)!r} -> {_at(now, key)!r}" for key in keys
            if _at(saved, key) is not _ABSENT and _at(saved, key) != _at(now, key)]


class Checkpointer:
    """Saves and restores the training state of one run, as detectron2's ``Checkpointer`` does: it is given the
    objects it keeps (model, optimizer, scheduler, scaler) and reads nothing else of the trainer.

    Counters (the trainer's progress: step, epoch, ...) and metrics are passed to :meth:`save` and returned by
    :meth:`resume` as dicts, so that each trainer keeps its own names for them. ``must_match``: the config keys that
    change what a checkpoint means (model, norm, b, batch size, schedule); a resume where one of them, or the number
    of processes, changed is refused unless ``CHECKPOINT.RESUME_CHANGED_CONFIG`` is set.
    """

    def __init__(self, cfg, info, log, model: nn.Module, optimizer, scheduler, scaler, counters: tuple[str, ...],
                 must_match: tuple[str, ...] = ()):
        self.cfg, self.info, self.log = cfg, info, log
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.counters, self.must_match = counters, must_match
        self.path = os.path.join(cfg.OUTPUT_DIR, "checkpoint.pth")
        self.saved: Optional[dict] = None  # the counters of the checkpoint at self.path, once saved or resumed

    def resume(self, path: str) -> tuple[dict, dict]:
        """Restore everything from ``path``; returns ``(counters, metrics)``. Errors are config errors naming ``--resume``."""
        try:
            resumed = load_training_checkpoint(path, self.info.rank, self.info.world_size, self.model, self.optimizer,
                                               self.scheduler, self.scaler, self.counters, self.info.device)
        except (FileNotFoundError, CheckpointError) as e:
            raise ConfigError(f"--resume: {e}") from None
        changed = changed_keys(resumed.config, self.cfg, self.must_match)
        if resumed.saved_by and resumed.saved_by != self.info.world_size:
            changed.append(f"number of processes: {resumed.saved_by} -> {self.info.world_size}")
        if changed and not self.cfg.CHECKPOINT.RESUME_CHANGED_CONFIG:
            raise ConfigError(f"--resume: {path} was saved by a run with another configuration; changed: "
                              + "; ".join(changed) + f". Use another OUTPUT_DIR, or set {ACCEPT_CHANGED_KEY} True to "
                              "resume anyway")
        if changed:
            self.log.info(f"resuming with a changed configuration ({ACCEPT_CHANGED_KEY}): " + "; ".join(changed))
        self.log.info(f"resumed from {path} at " + ", ".join(f"{k} {v}" for k, v in resumed.counters.items()))
        if not resumed.exact:
            self.log.info(resumed.inexact_note(self.info.world_size))
        if os.path.abspath(path) == os.path.abspath(self.path):
            self.saved = resumed.counters
        return resumed.counters, resumed.metrics

    def accept(self) -> None:
        """The run is accepted (config checked, data found, checkpoint resumed): now, and only now, its resolved
        config replaces ``OUTPUT_DIR/config.yaml``, so that a refused rerun leaves the directory's config as it was."""
        if self.info.is_main:
            write_file_atomically(os.path.join(self.cfg.OUTPUT_DIR, "config.yaml"), lambda f: f.write(self.cfg.dump()))

    def last_good(self) -> str:
        """Which checkpoint a stopped run leaves, for the message that stops it."""
        if self.saved is None:
            return f"No checkpoint was saved yet in {self.cfg.OUTPUT_DIR}"
        return f"The last good checkpoint is {self.path}, from " + ", ".join(f"{k} {v}" for k, v in self.saved.items())

    def non_finite_state(self) -> list[str]:
        """The parameters and buffers of this rank's model that hold NaN or Inf."""
        return [name for name, value in self.model.state_dict().items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())]

    def save(self, counters: dict, metrics: dict) -> None:
        """Write ``OUTPUT_DIR/checkpoint.pth`` (a collective: every rank calls it). A model with a non-finite parameter
        or buffer on any rank is never saved: the previous checkpoint stays, and the run stops (NonFiniteLossError)."""
        if self.cfg.DIST.AVERAGE_NORM_STATS:
            average_norm_statistics(self.model)
        bad = self.non_finite_state()
        if not all_finite(torch.tensor(0.0 if bad else 1.0, device=self.info.device).log()):  # one all-reduce: every rank stops together
            where = ", ".join(f"{k} {v}" for k, v in counters.items())
            shown = f": {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if bad else " on another rank"
            raise NonFiniteModelError(f"the model holds NaN/Inf values at {where}{shown}; not saved, stopping. "
                                     + self.last_good())
        save_training_checkpoint(self.path, self.info.is_main, self.model, self.optimizer, self.scheduler, self.scaler,
                                 counters, self.cfg.dump(), metrics)
        self.saved = dict(counters)

    def save_final(self, metrics: dict) -> Optional[str]:
        """``OUTPUT_DIR/model_final.pth``: the weights, the resolved config and the final metrics (rank 0 writes)."""
        if not self.info.is_main:
            return None
        final = os.path.join(self.cfg.OUTPUT_DIR, FINAL_MODEL)
        save_checkpoint({"model": self.model.state_dict(), "config": self.cfg.dump(), "metrics": metrics}, final)
        self.log.info(f"saved {final}")
        return final
