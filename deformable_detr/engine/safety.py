"""Guards that keep a user's results and time safe, all run before any work is spent: no output file is replaced
without ``--overwrite``, a resumed run refuses flags it cannot honour, output names never collide."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

# What ``train`` writes into ``--output-dir``.
RUN_FILES = ("checkpoint.pth", "log.jsonl", "eval.json", "loss.png")

# Flags a resumed run cannot honour, as (TrainConfig field, flag): the model is rebuilt from the checkpoint, and
# the optimizer and lr schedule are restored from it (so their learning rates, weight decay and step size too).
RESUME_FIXED = (
    ("model", "--model"),
    ("backbone_weights", "--backbone-weights"),
    ("lr", "--lr"),
    ("lr_backbone_mult", "--lr-backbone-mult"),
    ("lr_linear_proj_mult", "--lr-linear-proj-mult"),
    ("weight_decay", "--weight-decay"),
    ("lr_drop", "--lr-drop"),
)


class OutputExistsError(FileExistsError):
    """An output file exists and ``--overwrite`` was not given."""


def refuse_existing(path: str | os.PathLike, command: str, what: str = "") -> None:
    """Raise :class:`OutputExistsError` (one line naming ``path``) when ``path`` exists."""
    path = Path(path)
    if path.exists():
        raise OutputExistsError(
            f"{command}: {path} already exists{what}; pass --overwrite to replace it, or choose another output"
        )


def check_train_output(output_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> None:
    """A fresh run must not replace another run's files; a resumed run may only continue its own folder (the one
    holding the checkpoint it resumes from)."""
    if overwrite:
        return
    out = Path(output_dir)
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return
    if resume is not None and (out / "checkpoint.pth").exists():
        try:
            if (out / "checkpoint.pth").samefile(resume):
                return  # continuing this run: its checkpoint and log grow
        except OSError:
            pass
    how = "--resume it, " if resume is None and "checkpoint.pth" in present else ""
    raise OutputExistsError(
        f"train: {out / present[0]} already exists (--output-dir {out} holds a training run); {how}pass --overwrite "
        "to replace it, or choose another --output-dir"
    )


def check_resume_flags(saved: dict, given: dict, saved_model_config: dict | None = None) -> None:
    """``saved``: the checkpoint's TrainConfig dict; ``given``: the flags given with ``--resume`` (field -> value,
    ``model_overrides`` for ``--num-queries`` / ``--set``). Raise ValueError listing every flag whose value differs
    from the checkpoint's and that the resumed run therefore could not honour."""
    conflicts = []
    for name, flag in RESUME_FIXED:
        if name in given and given[name] != saved.get(name):
            conflicts.append(f"{flag} {given[name]} (the checkpoint has {saved.get(name)})")
    model_config = saved_model_config or {}
    for key, value in given.get("model_overrides", {}).items():
        if key in model_config and model_config[key] == value:
            continue
        flag = f"--num-queries {value}" if key == "num_queries" else f"--set {key}={value!r}"
        conflicts.append(f"{flag} (the checkpoint has {model_config.get(key, 'no such field')})")
    if conflicts:
        raise ValueError(
            "train --resume: a resumed run keeps the checkpoint's model, optimizer and lr schedule, so it cannot "
            f"honour {'; '.join(conflicts)}; start a new run (--data, --output-dir) to change them"
        )


def unique_stems(paths: list[Path]) -> list[str]:
    """Output stems for input images, one per path and never two alike: the file stem, and where stems collide
    (``a/0.png``, ``b/0.png``) the parent folders too, joined by ``_`` (``a_0``, ``b_0``), with a counter as the last
    resort."""
    stems = [p.stem for p in paths]
    depth = 1
    while True:
        counts = Counter(stems)
        clashes = {s for s, n in counts.items() if n > 1}
        if not clashes or depth > 8:
            break
        stems = [
            "_".join([*Path(os.path.abspath(p)).parent.parts[-depth:], p.stem]).lstrip("/_") if s in clashes else s
            for s, p in zip(stems, paths)
        ]
        depth += 1
    seen: Counter = Counter()
    out = []
    for s in stems:
        seen[s] += 1
        out.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return out
