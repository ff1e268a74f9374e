"""The one place the pipeline touches the models package: build (model, criterion, postprocess) from a config."""

from __future__ import annotations

import dataclasses


def model_config_from_dict(model_name: str, values: dict):
    """Rebuild a model config saved in a checkpoint (fields unknown to this version are ignored)."""
    from deformable_detr.models import DeformableDETRConfig, DETRConfig

    config_cls = DETRConfig if model_name == "detr" else DeformableDETRConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    config = config_cls(**{k: v for k, v in values.items() if k in known})
    config.validate()
    return config


def build_components(config, max_dets: int = 100):
    """``(model, criterion, postprocess)`` for a DETRConfig / DeformableDETRConfig; the post-processor keeps
    ``max_dets`` detections per image (COCO's 100; more for crowded scenes)."""
    from deformable_detr import models

    model = models.build(config)
    criterion = models.build_criterion(config)
    postprocess = models.build_postprocess(config)
    postprocess.num_select = max_dets
    return model, criterion, postprocess


def describe_backend(config, device) -> str:
    """One line for the logs: which multi-scale deformable attention kernels the model runs on ``device``."""
    import torch

    from deformable_detr._extension import load_error
    from deformable_detr.ops.ms_deform_attn import available_backends

    if not hasattr(config, "num_feature_levels"):
        return "MSDA backend: none (DETR uses standard attention)"
    device = torch.device(device)
    backend = getattr(config, "backend", None) or available_backends(device)[0]
    if backend == "pytorch":
        return f"MSDA backend: pytorch (the slow grid_sample reference; {load_error() or 'no faster backend here'})"
    return f"MSDA backend: {backend} on {device.type}"
