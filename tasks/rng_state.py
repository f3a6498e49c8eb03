"""The random-number state of every process (torch, CUDA, NumPy, Python), stored in checkpoints so that a resumed
run continues with the same draws (stochastic depth draws from torch's global generator). Plain lists and tensors:
loadable with ``weights_only=True``."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from utils.distributed import is_distributed, rank_and_world

__all__ = ["gather_rng_states", "restore_rng_state"]


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Each process's random state, in rank order (every process calls this while a checkpoint is dumped)."""
    state = _rng_state()
    if not is_distributed():
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_state(states: list[dict[str, Any]] | None) -> None:
    """Set this process's random state from :func:`gather_rng_states`' list, when it holds one for this rank."""
    if states:
        rank, _ = rank_and_world()
        if rank < len(states):
            _set_rng_state(states[rank])
