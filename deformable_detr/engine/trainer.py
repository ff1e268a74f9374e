"""Train and evaluate: one process, or one per GPU/CPU under torchrun with DistributedDataParallel.

Determinism: data order, augmentation and dropout of epoch ``e`` depend only on ``(seed, e, rank)``, and a
checkpoint holds the model, optimizer, scheduler, scaler and RNG states, so ``--resume`` continues bit-exactly
at an epoch boundary (same device, same thread count).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from deformable_detr.data import SYNTHETIC_CROWDED, SyntheticSpec, build_dataset, collate
from deformable_detr.engine import distributed as du
from deformable_detr.engine.checkpoint import (
    load_checkpoint_file,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deformable_detr.engine.config import TrainConfig, model_config
from deformable_detr.engine.evaluator import CocoEvaluator
from deformable_detr.engine.modeling import build_components, describe_backend, model_config_from_dict
from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.plotting import plot_losses
from deformable_detr.engine.preflight import check_backbone_weights, check_images, check_packages
from deformable_detr.engine.safety import RESUME_FIXED, check_resume_flags, check_train_output, refuse_existing
from deformable_detr.models.inference import compile_model, optimize_for_inference

EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (2**63 - 1)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def _is_main_term(name: str) -> bool:
    """Loss terms of the last decoder layer (not ``loss_ce_0`` aux or ``loss_ce_enc`` encoder terms)."""
    last = name.rsplit("_", 1)[-1]
    return not last.isdigit() and last != "enc"


def _logged_terms(criterion) -> callable:
    """Which loss terms go into the log: the last decoder layer's, without ``cardinality_error`` for sigmoid
    (focal) models, where "predicted objects" (logits whose argmax is not the last class) means nothing: a sigmoid
    head has no "no object" class."""
    use_focal = getattr(criterion, "use_focal", False)
    return lambda name: _is_main_term(name) and not (use_focal and name.startswith("cardinality_error"))


class StepProgress:
    """How far the current epoch got: read by the Ctrl-C handler to save a checkpoint that resumes mid-epoch."""

    def __init__(self, start_step: int = 0):
        self.done = start_step


def train_one_epoch(
    model,
    criterion,
    loader,
    optimizer,
    device,
    cfg: TrainConfig,
    epoch: int,
    scaler,
    show: bool,
    progress: StepProgress | None = None,
):
    """One epoch; ``progress.done`` (default 0) steps are skipped first (their batches are drawn, not trained on:
    a run resumed after Ctrl-C sees the rest of the epoch's data order), and counts the steps done."""
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    logged = _logged_terms(criterion)
    progress = progress or StepProgress()
    start_step = progress.done
    sums: dict[str, float] = defaultdict(float)
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = tqdm(
        total=steps, initial=start_step, desc=f"epoch {epoch}", disable=not show, leave=False, dynamic_ncols=True
    )
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        if step < start_step:
            continue
        images, targets = _to_device(images, targets, device)
        with autocast_context(device, cfg.amp):
            outputs = model(images)
        # Matching and losses in float32 whatever the forward ran in.
        outputs = _to_float(outputs)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"train: loss is {loss.item()} at epoch {epoch} step {step}; terms: {loss_dict}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        sums["loss"] += loss.item()
        for k, v in loss_dict.items():
            if logged(k):
                sums[k] += float(v.detach())
        progress.done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    stats = {k: v / max(steps - start_step, 1) for k, v in sums.items()}
    return du.all_reduce_mean(stats, device), steps


def _to_float(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


@torch.no_grad()
def evaluate(
    model, postprocess, loader, evaluator: CocoEvaluator, device, amp: str = "none", progress=True, verbose=True
):
    """Run the model over ``loader`` and return COCO metrics (every rank gets the same dict); ``verbose`` prints
    the COCO table."""
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        images, targets = _to_device(images, targets, device)
        with autocast_context(device, amp):
            outputs = model(images)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocess(_to_float(outputs), orig_sizes)
        evaluator.update([int(t["image_id"]) for t in targets], results)
    return evaluator.summarize(verbose=verbose)


def make_loader(dataset, cfg: TrainConfig, info: du.DistInfo, train: bool, epoch: int = 0):
    sampler = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train, seed=cfg.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, info.rank))
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=train and len(dataset) >= cfg.batch_size * info.world_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=generator,
        persistent_workers=False,
    )


def _datasets(cfg: TrainConfig, info: du.DistInfo):
    kwargs = dict(
        image_size=cfg.image_size, max_size=cfg.max_size, label_map=cfg.label_map, synthetic_spec=synthetic_spec(cfg)
    )
    if cfg.data in ("synthetic", SYNTHETIC_CROWDED):
        # One process writes the synthetic folder; the others wait and then read it.
        if info.is_main:
            build_dataset(cfg.data, cfg.train_split, True, augmentation=cfg.augmentation, **kwargs)
        du.barrier()
    train_set = build_dataset(cfg.data, cfg.train_split, True, augmentation=cfg.augmentation, **kwargs)
    val_set = build_dataset(cfg.data, cfg.val_split, False, **kwargs)
    return train_set, val_set


def synthetic_spec(cfg: TrainConfig) -> SyntheticSpec:
    """The synthetic images are generated at the training image size, so no resize blurs them."""
    return SyntheticSpec(image_size=cfg.image_size)


def _log(msg: str, info: du.DistInfo) -> None:
    if info.is_main:
        print(msg, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; write ``checkpoint.pth``, ``log.jsonl``, ``eval.json``, ``loss.png`` to
    ``cfg.output_dir`` (rank 0) and return the final metrics."""
    cfg.validate()
    info = du.env_dist_info()
    device = du.resolve_device(cfg.device, info)
    du.init_distributed(device, info)
    try:
        return _train(cfg, info, device)
    finally:
        du.cleanup_distributed()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: the message says what was saved and the command that resumes."""


def _resume_command(checkpoint: Path) -> str:
    return f"python -m deformable_detr train --resume {checkpoint}"


def _train(cfg: TrainConfig, info: du.DistInfo, device: torch.device) -> dict:
    out_dir = Path(cfg.output_dir)
    show = info.is_main and not cfg.quiet
    # Before any work: the output folder, the checkpoint to resume and the flags it cannot honour, what the last
    # step (evaluation, the plot) needs, and every image of both splits.
    check_train_output(out_dir, cfg.resume, cfg.overwrite)
    resume = load_checkpoint_file(cfg.resume, purpose="train --resume") if cfg.resume else None
    if resume is not None:
        given = {name: getattr(cfg, name) for name, _ in RESUME_FIXED}
        given["model_overrides"] = cfg.model_overrides
        check_resume_flags(resume.get("config", {}), given, resume["model_config"])
    _seed_all(_epoch_seed(cfg.seed, -1, info.rank))
    check_packages("train")
    if cfg.backbone_weights:
        check_backbone_weights(cfg.backbone_weights)
    train_set, val_set = _datasets(cfg, info)
    check_images(train_set, f"train split {cfg.train_split!r}", skip=cfg.skip_bad_images)
    check_images(val_set, f"val split {cfg.val_split!r}", skip=cfg.skip_bad_images)
    if resume is not None:
        mcfg = model_config_from_dict(resume["model_name"], resume["model_config"])
        if mcfg.num_classes != train_set.num_classes:
            raise ValueError(
                f"resume: checkpoint has {mcfg.num_classes} classes, data {cfg.data!r} has {train_set.num_classes}"
            )
    else:
        mcfg = model_config(cfg, train_set.num_classes)
    model, criterion, postprocess = build_components(mcfg, cfg.max_dets)
    model.to(device)
    criterion.to(device)
    optimizer = build_optimizer(
        model, cfg.lr, cfg.lr_backbone, cfg.weight_decay, lr_linear_proj_mult=cfg.lr_linear_proj_mult
    )
    scheduler = build_scheduler(optimizer, cfg.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, start_step = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["lr_scheduler"])
        if "scaler" in resume:
            scaler.load_state_dict(resume["scaler"])
        start_epoch = resume["epoch"] + 1
        start_step = resume.get("interrupted_step", 0)
        rng = resume.get("rng_states", [])
        if info.rank < len(rng):
            set_rng_state(rng[info.rank])
        at = f" step {start_step}" if start_step else ""
        _log(f"resumed from {cfg.resume} at epoch {start_epoch}{at}", info)
    train_model = model
    if info.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = compile_model(train_model, fullgraph=False, dynamic=None)  # padded batches vary in size
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(
        f"{cfg.model}: {n_params / 1e6:.2f}M trainable parameters, {len(train_set)} train / {len(val_set)} val "
        f"images, {info.world_size} process(es) on {device.type}",
        info,
    )
    _log(describe_backend(mcfg, device), info)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_epoch == 0 and start_step == 0:
            (out_dir / "log.jsonl").write_text("")
    evaluator_args = (val_set.annotation_file, val_set.label_to_category, cfg.max_dets)
    val_loader = make_loader(val_set, cfg, info, train=False)
    metrics: dict = {}
    score_threshold = resume.get("score_threshold") if resume is not None else None
    ckpt_path = out_dir / "checkpoint.pth"

    def state(epoch: int, **extra) -> dict:
        checkpoint = dict(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            lr_scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epoch,
            config=cfg.to_dict(),
            model_name=cfg.model,
            model_config=_asdict(mcfg),
            label_to_category=train_set.label_to_category,
            category_names=train_set.category_names,
            # All ranks' RNG states, so every process continues its own stream after a resume.
            rng_states=du.all_gather_objects(rng_state()) if not extra else [rng_state()],
            **extra,
        )
        if score_threshold is not None:
            checkpoint["score_threshold"] = score_threshold
        return checkpoint

    for epoch in range(start_epoch, cfg.epochs):
        start = time.time()
        _seed_all(_epoch_seed(cfg.seed, epoch, info.rank))
        loader = make_loader(train_set, cfg, info, train=True, epoch=epoch)
        progress = StepProgress(start_step if epoch == start_epoch else 0)
        try:
            stats, steps = train_one_epoch(
                train_model, criterion, loader, optimizer, device, cfg, epoch, scaler, show, progress
            )
        except KeyboardInterrupt:
            if info.is_main and progress.done > 0:
                # Mid-epoch: the last completed epoch plus the steps done of this one; resuming skips those steps.
                save_checkpoint(ckpt_path, **state(epoch - 1, interrupted_step=progress.done))
            if progress.done:
                saved = f"saved {ckpt_path} (epoch {epoch}, {progress.done} steps done)"
            else:
                saved = f"{ckpt_path} holds epoch {epoch - 1}" if epoch > 0 else "nothing saved yet"
            resume_hint = f"; resume with: {_resume_command(ckpt_path)}" if epoch > 0 or progress.done else ""
            raise TrainingInterrupted(f"train: interrupted; {saved}{resume_hint}") from None
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {"epoch": epoch, "steps": steps, "lr": lr, **{f"train_{k}": v for k, v in stats.items()}}
        checkpoint = state(epoch)
        # Saved before evaluating, so that a failing evaluation never costs the epoch's training.
        if info.is_main:
            save_checkpoint(ckpt_path, **checkpoint)
        last = epoch == cfg.epochs - 1
        try:
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                evaluator = CocoEvaluator(*evaluator_args)
                # The COCO table once, after the last epoch (every evaluation with --verbose).
                table = show and (last or cfg.verbose)
                metrics = evaluate(model, postprocess, val_loader, evaluator, device, cfg.amp, show, table)
                record.update({f"val_{k}": metrics[k] for k in EVAL_KEYS})
                score_threshold = metrics.get("score_threshold")
                if info.is_main and score_threshold is not None:
                    # predict's default threshold: the F1-optimal one on this evaluation (see CocoEvaluator).
                    checkpoint["score_threshold"] = score_threshold
                    save_checkpoint(ckpt_path, **checkpoint)
        except KeyboardInterrupt:
            more = f"; resume with: {_resume_command(ckpt_path)}" if not last else ""
            raise TrainingInterrupted(
                f"train: interrupted while evaluating; {ckpt_path} holds the finished epoch {epoch}{more}"
            ) from None
        record["time"] = time.time() - start
        # CPU seconds of this process so far: a load-independent cost figure on shared machines.
        record["process_cpu_s"] = time.process_time()
        if info.is_main:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            summary = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
            _log(f"epoch {epoch}: {summary}", info)
        du.barrier()
    _check_replicas_agree(model, device)
    if info.is_main and cfg.epochs > start_epoch:
        if metrics:
            (out_dir / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_losses(out_dir / "log.jsonl", out_dir / "loss.png")
    return metrics


def _check_replicas_agree(model: torch.nn.Module, device: torch.device) -> None:
    """DDP keeps replicas identical by construction; a cheap end-of-training check catches setups that break it
    (a parameter updated outside autograd, a rank-dependent code path)."""
    if not du.is_dist():
        return
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) + float((p.double() ** 2).sum()) for p in model.parameters())
    sums = du.all_gather_objects(checksum)
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"train: model replicas diverged across processes (parameter checksums {sums})")


def _asdict(config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def _data_label(data: str) -> str:
    """A file-name-safe name for ``--data``: the built-in dataset's name, or the folder's name."""
    name = data if data in ("synthetic", SYNTHETIC_CROWDED, "neon-trees") else Path(data).resolve().name
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name) or "data"


def _known_num_classes(data: str) -> int | None:
    """Classes of a built-in dataset, known without generating it."""
    from deformable_detr.data import CATEGORIES

    return len(CATEGORIES) if data in ("synthetic", SYNTHETIC_CROWDED) else None


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    split: str | None = None,
    output: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    max_dets: int | None = None,
    image_size: int | None = None,
    quiet: bool = False,
    compile: bool = False,
    overwrite: bool = False,
    skip_bad_images: bool = False,
) -> dict:
    """COCO metrics of a training checkpoint (or an official Deformable DETR / DETR one, with ``data``) on
    ``data``/``split`` (default: the ones it was trained with); prints the COCO table and writes the metrics as JSON
    to ``output``. Default output: ``eval_<split>.json`` beside the checkpoint for the training data, ``<split>``
    being the split's folder name (so ``crowded`` and ``crowded2017`` share one file, which holds the latest
    evaluation of that split), and ``eval_<data name>_<split>.json`` for other data, so that they never replace
    each other. An explicit ``output`` that exists is refused unless ``overwrite``. ``image_size`` (default: the
    training one) is the shortest side images are resized to. Images that are missing or do not decode stop the
    evaluation before it starts (``skip_bad_images``: left out, one line each). Runs distributed under torchrun
    like ``train``."""
    check_packages("evaluate", {"pycocotools": "pycocotools"})
    if output is not None and not overwrite:
        refuse_existing(output, "evaluate")
    ckpt = load_checkpoint_file(checkpoint, purpose="evaluate")
    cfg = TrainConfig.from_dict(ckpt.get("config", {}))
    trained_on = cfg.data
    if data is None and cfg.data is None:
        raise ValueError(
            f"evaluate: {checkpoint} is {ckpt.get('foreign', 'a checkpoint without training data')}: pass --data "
            "(a COCO-format folder, e.g. --data /data/coco)"
        )
    # The synthetic data are those of training, whatever size they are evaluated at.
    spec = synthetic_spec(cfg)
    overrides = (
        ("data", data),
        ("val_split", split),
        ("batch_size", batch_size),
        ("device", device),
        ("image_size", image_size),
    )
    for name, value in overrides:
        if value is not None:
            setattr(cfg, name, value)
    if num_workers is not None:
        cfg.num_workers = num_workers
    if max_dets is not None:
        cfg.max_dets = max_dets
    cfg.quiet = quiet
    cfg.validate()
    mcfg = model_config_from_dict(ckpt.get("model_name", cfg.model), ckpt["model_config"])
    known = _known_num_classes(cfg.data)
    if known is not None and known != mcfg.num_classes:
        # Before generating anything: the built-in datasets' classes are known.
        raise ValueError(
            f"evaluate: the checkpoint predicts {mcfg.num_classes} classes, {cfg.data!r} has {known}; pass --data "
            "with the data it was trained for"
        )
    info = du.env_dist_info()
    dev = du.resolve_device(cfg.device, info)
    du.init_distributed(dev, info)
    try:
        val_set = build_dataset(
            cfg.data,
            cfg.val_split,
            False,
            image_size=cfg.image_size,
            max_size=cfg.max_size,
            label_map=cfg.label_map,
            synthetic_spec=spec,
        )
        if mcfg.num_classes != val_set.num_classes:
            raise ValueError(
                f"evaluate: the checkpoint predicts {mcfg.num_classes} classes, {cfg.data!r} split {cfg.val_split!r} "
                f"has {val_set.num_classes} (label_map={cfg.label_map!r})"
            )
        check_images(val_set, f"evaluate: split {cfg.val_split!r}", skip=skip_bad_images)
        model, _, postprocess = build_components(mcfg, cfg.max_dets)
        load_model_weights(model, ckpt)
        model.to(dev)
        if info.is_main and not quiet:
            print(describe_backend(mcfg, dev), flush=True)
        if compile:  # folded BN + channels_last + torch.compile (outputs equal within fp32 round-off)
            model = optimize_for_inference(model, compile=True, fullgraph=False, dynamic=None)
        loader = make_loader(val_set, cfg, info, train=False)
        evaluator = CocoEvaluator(val_set.annotation_file, val_set.label_to_category, cfg.max_dets)
        metrics = evaluate(
            model,
            postprocess,
            loader,
            evaluator,
            dev,
            cfg.amp,
            progress=info.is_main and not quiet,
            verbose=info.is_main,
        )
        if info.is_main:
            other = "" if cfg.data == trained_on else f"{_data_label(cfg.data)}_"
            out = Path(output) if output else Path(checkpoint).parent / f"eval_{other}{val_set.image_dir.name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=1) + "\n")
            if not quiet:
                print(f"wrote {out}")
        return metrics
    finally:
        du.cleanup_distributed()
