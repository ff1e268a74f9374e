"""Typed training configuration, and the two presets: the original COCO recipes and the CPU demo on ``synthetic``.

The model's own fields live in ``deformable_detr.models.DETRConfig`` / ``DeformableDETRConfig``;
``TrainConfig.model_overrides`` holds the fields that differ from those defaults (``num_classes`` always comes
from the dataset), so a checkpoint's config says exactly which model was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODELS = ("deformable_detr", "detr")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    data: str = "synthetic"
    output_dir: str = "output"
    model: str = "deformable_detr"
    model_overrides: dict = field(default_factory=dict)
    # Optimisation (Deformable DETR's main.py defaults; DETR's differ, see coco_preset).
    epochs: int = 50
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone_mult: float = 0.1
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    seed: int = 42
    # Runtime
    device: str | None = None
    amp: str = "none"
    num_workers: int = 2
    quiet: bool = False
    # The COCO table after every evaluation, not only after the last epoch.
    verbose: bool = False
    # Replace the files of a run already in output_dir (otherwise train refuses before any work).
    overwrite: bool = False
    # Images that are missing or do not decode are left out (one line each) instead of stopping the run.
    skip_bad_images: bool = False
    resume: str | None = None
    backbone_weights: str | None = None
    # Data
    image_size: int = 800
    max_size: int | None = 1333
    augmentation: str = "detr"
    label_map: str = "contiguous"
    train_split: str = "train2017"
    val_split: str = "val2017"
    # Evaluation: 0 = only after the last epoch.
    eval_every: int = 0
    max_dets: int = 100
    # Caps the steps of each epoch (smoke tests, quick experiments); None = the whole dataset.
    max_steps_per_epoch: int | None = None
    # torch.compile the model for the train steps (deformable_detr.models.compile_model).
    compile: bool = False

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "lr_drop", "image_size", "max_dets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_backbone_mult", "lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_workers < 0 or self.eval_every < 0:
            raise ValueError("num_workers and eval_every must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")

    @property
    def lr_backbone(self) -> float:
        return self.lr * self.lr_backbone_mult

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def coco_preset(model: str = "deformable_detr") -> TrainConfig:
    """The original recipes (per-GPU batch 2; the papers used 8 GPUs, i.e. a total batch of 16)."""
    if model == "detr":
        return TrainConfig(model="detr", epochs=300, lr=1e-4, lr_drop=200, image_size=800)
    return TrainConfig(model=model, epochs=50, lr=2e-4, lr_drop=40, image_size=800)


def demo_preset(model: str = "deformable_detr") -> TrainConfig:
    """CPU demo on the synthetic shapes: small images, ResNet-18 from random init, a narrow 2+2-layer
    transformer. Chosen so that training + evaluation fit in a few minutes on 2 CPU cores (README.md, "The CPU demo",
    quotes the measured run committed under benchmarks/results/)."""
    small = {
        "backbone": "resnet18",
        "hidden_dim": 64,
        "nheads": 4,
        "dim_feedforward": 256,
        "enc_layers": 1,
        "dec_layers": 2,
        "num_queries": 30,
        "dropout": 0.0,
    }
    if model == "deformable_detr":
        small.update(num_feature_levels=3, enc_n_points=2, dec_n_points=2)
    return TrainConfig(
        data="synthetic",
        model=model,
        model_overrides=small,
        epochs=4,
        batch_size=8,
        lr=5e-4,
        # The backbone starts from random weights here, so it learns at the full rate (the 0.1 of the recipes
        # protects pretrained ImageNet features).
        lr_backbone_mult=1.0,
        lr_drop=3,
        image_size=96,
        max_size=None,
        augmentation="flip",
        num_workers=1,
    )


def trees_preset(model: str = "deformable_detr") -> TrainConfig:
    """CPU demo on ``neon-trees`` (real aerial crowns; 1000-pixel tiles seen at half resolution, 100-250 crowns
    each): the synthetic demo's small model with 450 queries (1.5x the 279 crowns of the held-out dense image) and
    ``max_dets`` to match, flips and 90-degree rotations. Sized for at most 15 minutes on 2 CPU cores (README,
    tree demo)."""
    cfg = demo_preset(model)
    cfg.model_overrides["num_queries"] = 450
    cfg.data = "neon-trees"
    cfg.epochs = 20
    cfg.lr_drop = 16
    cfg.batch_size = 2
    cfg.image_size = 500
    cfg.augmentation = "aerial"
    cfg.max_dets = 450
    cfg.eval_every = 1
    return cfg


def crowd_preset(model: str = "deformable_detr") -> TrainConfig:
    """CPU crowd recipe on ``synthetic-crowded`` (400 training images of 320 pixels with 101-140 shapes of 10-22
    pixels each): the demo's small model with 300 queries (over twice the most objects in an image) and
    ``max_dets`` to match, two-stage Deformable DETR with box refinement (the decoder starts from the encoder's
    best-scoring locations, which suits many small objects better than learned query positions), trained and
    evaluated at the images' own 320 pixels, evaluated on the held-out ``crowded`` split. One epoch of 200 steps:
    about 450 CPU-seconds with one thread, inside 15 minutes on 2 CPU cores (README, crowd recipe)."""
    cfg = demo_preset(model)
    cfg.data = "synthetic-crowded"
    cfg.model_overrides["num_queries"] = 300
    if model == "deformable_detr":
        cfg.model_overrides.update(two_stage=True, with_box_refine=True)
    cfg.train_split = "train"
    cfg.val_split = "crowded"
    cfg.image_size = 320
    cfg.max_dets = 300
    cfg.batch_size = 2
    cfg.epochs = 1
    cfg.lr_drop = 1
    return cfg


def model_config(cfg: TrainConfig, num_classes: int):
    """The model config of a training run: package defaults, then the overrides, then the dataset's classes."""
    from deformable_detr.models import DeformableDETRConfig, DETRConfig

    config_cls = DETRConfig if cfg.model == "detr" else DeformableDETRConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(cfg.model_overrides) - known)
    if unknown:
        raise ValueError(f"model_overrides: {config_cls.__name__} has no field(s) {unknown}")
    values = dict(cfg.model_overrides)
    values.update(num_classes=num_classes, lr_backbone=cfg.lr_backbone)
    if cfg.backbone_weights:
        values.update(backbone_weights=cfg.backbone_weights, pretrained=True)
    config = config_cls(**values)
    config.validate()
    return config
