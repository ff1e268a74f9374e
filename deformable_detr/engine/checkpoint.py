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


def load_checkpoint_file(path: str | os.PathLike, purpose: str = "checkpoint") -> dict:
    """Read a checkpoint written by ``train``, or an official Deformable DETR / DETR checkpoint (original or HF
    layout; returned in the same form, with ``foreign`` set to what it is and no training ``config``). Anything
    else, and a foreign checkpoint for ``purpose="train --resume"``, is a ValueError saying in one line what the
    file holds. ``purpose`` names the command in messages; the plain reader (``"checkpoint"``) returns any dict
    with a ``model`` entry as it is."""
    path = Path(path)
    if path.is_dir():
        hint = " (it holds a checkpoint.pth: pass that file)" if (path / "checkpoint.pth").is_file() else ""
        raise IsADirectoryError(f"{purpose}: {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{purpose}: {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{purpose}: {path} is empty (0 bytes)")
    # Our checkpoints hold numpy RNG state and plain dicts, which the weights_only unpickler rejects; they are
    # files this package wrote, loaded on the user's request.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{purpose}: {path} could not be read ({reason}); is it a complete checkpoint.pth written by train "
            "(a copy cut short is the usual cause)?"
        ) from None
    if isinstance(ckpt, dict) and "model" in ckpt and ("model_config" in ckpt or purpose == "checkpoint"):
        return ckpt  # train's (the plain reader, purpose "checkpoint", takes any dict with weights)
    from deformable_detr.models.checkpoint import describe_state, official_model_config

    try:
        official = official_model_config(ckpt)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        official = None
    if official is None:
        raise ValueError(
            f"{purpose}: {path} is not a checkpoint written by train, nor an official Deformable DETR / DETR one "
            f"(found {describe_state(ckpt)}; train's have 'model' and 'model_config')"
        )
    model_name, model_config, description = official
    if purpose == "train --resume":
        raise ValueError(
            f"train --resume: {path} is {description}: weights without this package's training state (optimizer, "
            "schedule, data, config); evaluate and predict load it, --resume needs a checkpoint.pth written by train"
        )
    num_classes = model_config["num_classes"]
    return {
        "model": ckpt,  # loaded with models.load_checkpoint, which knows the original and HF layouts
        "model_name": model_name,
        "model_config": model_config,
        # The originals keep COCO's category ids as labels.
        "config": {"model": model_name, "data": None, "label_map": "category_id", "image_size": 800},
        "label_to_category": list(range(num_classes)),
        "foreign": description,
    }


def load_model_weights(model: torch.nn.Module, checkpoint: dict) -> None:
    """The weights of a checkpoint from :func:`load_checkpoint_file` into ``model`` (strict)."""
    if checkpoint.get("foreign"):
        from deformable_detr.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint["model"])
    else:
        model.load_state_dict(checkpoint["model"])
