"""Reproducible randomness: per-sample seeds and the RNG states a checkpoint must carry."""

from __future__ import annotations

import random

import numpy as np
import torch

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` in `epoch` (splitmix64 over the triple).

    Depends on nothing else: not the rank, worker, batch size or world size, so a resumed or
    re-sharded run augments every image exactly as the original run did.
    """
    x = 0
    for part in (seed, epoch, index):
        x = (x + (part & _MASK) + _MIX[0]) & _MASK
        x = ((x ^ (x >> 30)) * _MIX[1]) & _MASK
        x = ((x ^ (x >> 27)) * _MIX[2]) & _MASK
        x ^= x >> 31
    return x >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG this process draws from, as tensors and plain values (weights_only-safe)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), int(state["numpy"]["pos"]),
                         int(state["numpy"]["has_gauss"]), float(state["numpy"]["cached_gaussian"])))
    version, internal, gauss = state["python"]["version"], state["python"]["state"], state["python"]["gauss"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict:
    _, key, pos, has_gauss, cached = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _python_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
