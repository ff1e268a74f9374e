"""DETR and Deformable DETR.

Stable entry points (the train/eval pipeline relies on these):

- ``build(config) -> nn.Module``: ``config`` is a :class:`DETRConfig` or :class:`DeformableDETRConfig`
  (defaults = the original R50 recipes; override fields for small models). ``model(images)`` takes a float
  tensor [B, 3, H, W], a list of [3, Hi, Wi] tensors, or an :class:`ImageBatch`, and returns a dict with
  ``pred_logits``, ``pred_boxes`` (normalised cxcywh), ``aux_outputs`` and, for two-stage, ``enc_outputs``.
- ``build_criterion(config) -> SetCriterion``: ``criterion(outputs, targets) -> dict of losses``; the total is
  ``sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)``.
  Targets: list of dicts with ``labels`` [n] int64 and ``boxes`` [n, 4] normalised cxcywh.
- ``build_postprocess(config) -> PostProcess``: ``postprocess(outputs, target_sizes [B, 2] (h, w))`` -> list
  of dicts ``scores``, ``labels``, ``boxes`` (absolute xyxy). No NMS.
- ``load_checkpoint(model, source) -> LoadReport``: official ``.pth`` files or HF transformers state dicts.
- ``optimize_for_inference(model, *, fold_batchnorm=True, channels_last=True, compile=False, **compile_kwargs)``:
  eval mode, frozen BN folded into the convolutions, channels_last backbone, optionally ``torch.compile``
  (fullgraph). ``compile_model(model, **kwargs)``: ``torch.compile(model, fullgraph=True, dynamic=False)``, also
  for training.
"""

from deformable_detr.models.builder import build, build_backbone, build_criterion, build_postprocess
from deformable_detr.models.checkpoint import LoadReport, convert_hf_state_dict, load_checkpoint
from deformable_detr.models.config import DeformableDETRConfig, DETRConfig
from deformable_detr.models.criterion import SetCriterion
from deformable_detr.models.image_batch import ImageBatch, to_image_batch
from deformable_detr.models.inference import compile_model, fold_frozen_batchnorm, optimize_for_inference
from deformable_detr.models.postprocess import PostProcess

__all__ = [
    "DETRConfig",
    "DeformableDETRConfig",
    "ImageBatch",
    "LoadReport",
    "PostProcess",
    "SetCriterion",
    "build",
    "build_backbone",
    "build_criterion",
    "build_postprocess",
    "compile_model",
    "convert_hf_state_dict",
    "fold_frozen_batchnorm",
    "load_checkpoint",
    "optimize_for_inference",
    "to_image_batch",
]
