"""Training checkpoints: everything needed to continue bit-exactly (model, optimizer, scheduler, AMP scaler,
epoch, config, RNG states) in one file, written atomically so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **contents) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(contents, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``train``; a clear error for a missing file or a foreign checkpoint."""
    path = Path(path)
    if path.is_dir():
        hint = " (it holds a checkpoint.pth: pass that file)" if (path / "checkpoint.pth").is_file() else ""
        raise IsADirectoryError(f"checkpoint: {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint: {path} is empty (0 bytes)")
    # Our checkpoints hold numpy RNG state and plain dicts, which the weights_only unpickler rejects; they are
    # files this package wrote, loaded on the user's request.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint: {path} could not be read ({reason}); is it a complete checkpoint.pth written by train "
            "(a copy cut short is the usual cause)?"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint: {path} has no 'model' entry; is it a deformable_detr training checkpoint?")
    return ckpt
