"""Checkpoints that survive being killed mid-save and load without executing pickled code.

A checkpoint is a plain dict of tensors and Python primitives (model, optimizer, scheduler and scaler
state, counters, RNG states, the resolved config as YAML), so ``torch.load(weights_only=True)`` reads
it. It is written to a temporary file in the same directory and renamed over the old one: the rename
is atomic, so a kill at any moment leaves either the previous checkpoint or the new one.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what is needed; the message names the file."""


def save_checkpoint(state: dict, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    from .distributed import all_gather_objects

    return all_gather_objects(rank_state(model))


def own_rank_state(state: dict, rank: int, world_size: int) -> Optional[dict]:
    """This rank's entry of a checkpoint's ``ranks``, or None when it was saved by another number of processes."""
    ranks = state.get("ranks", [])
    return ranks[rank] if len(ranks) == world_size else None
