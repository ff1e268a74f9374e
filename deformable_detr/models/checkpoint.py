"""Load official checkpoints and HF transformers weights into our models.

Our state dict uses the original repos' key names, so ``r50_deformable_detr-checkpoint.pth`` and
``detr-r50-e632da11.pth`` load strict after unwrapping. HF transformers v4 state dicts (``DetrForObjectDetection``,
``DeformableDetrForObjectDetection``, with timm backbones as on the hub) are detected and renamed; DETR's
separate q/k/v projections are concatenated into ``in_proj_weight``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike

import torch
from torch import nn


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: the layout it detected and the keys that did not line up."""

    layout: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_keys and not self.unexpected_keys


# HF -> original, applied in order to keys that have lost their "model." prefix. Layer-local renames are
# written against the remainder of the key after "<stack>.layers.<i>.".
_HF_COMMON = [
    (r"^backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^backbone\.position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^backbone\.position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
    (r"^query_position_embeddings\.", "query_embed."),
]
_HF_DEFORMABLE_TOP = [
    (r"^level_embed$", "transformer.level_embed"),
    (r"^(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"^decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1."),
    (r"^input_proj\.", "input_proj."),
]
# Encoder layers of both models: the same renames (their attention differs, its parameter names do not move).
_HF_ENCODER = [
    (r"^self_attn_layer_norm\.", "norm1."),
    (r"^final_layer_norm\.", "norm2."),
    (r"^fc1\.", "linear1."),
    (r"^fc2\.", "linear2."),
]
_HF_DEFORMABLE_DECODER = [
    (r"^encoder_attn\.", "cross_attn."),
    (r"^encoder_attn_layer_norm\.", "norm1."),
    (r"^self_attn_layer_norm\.", "norm2."),
    (r"^final_layer_norm\.", "norm3."),
]
_HF_DETR_TOP = [
    (r"^input_projection\.", "input_proj."),
    (r"^decoder\.layernorm\.", "transformer.decoder.norm."),
]
_HF_DETR_DECODER = [
    (r"^encoder_attn\.", "multihead_attn."),
    (r"^self_attn_layer_norm\.", "norm1."),
    (r"^encoder_attn_layer_norm\.", "norm2."),
    (r"^final_layer_norm\.", "norm3."),
]
_HF_FFN = [(r"^fc1\.", "linear1."), (r"^fc2\.", "linear2.")]
_HF_HEADS = [(r"^class_labels_classifier\.", "class_embed."), (r"^bbox_predictor\.", "bbox_embed.")]


def _apply(key: str, rules) -> str:
    for pattern, repl in rules:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def is_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any("backbone.conv_encoder." in k or k.startswith("model.encoder.layers.") for k in state_dict)


def _merge_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF's q_proj/k_proj/v_proj -> nn.MultiheadAttention's in_proj_{weight,bias} (q, k, v stacked)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            groups.setdefault(f"{m.group(1)}|{m.group(3)}", {})[m.group(2)] = value
        else:
            out[key] = value
    for group, parts in groups.items():
        prefix, kind = group.split("|")
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF state dict: {prefix} has only {sorted(parts)} projections, expected q, k and v")
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF transformers v4 DETR / Deformable DETR state dict to the original repos' key names."""
    deformable = any("sampling_offsets" in k for k in state_dict)
    top = _HF_DEFORMABLE_TOP if deformable else _HF_DETR_TOP
    enc_rules = _HF_ENCODER
    dec_rules = (_HF_DEFORMABLE_DECODER if deformable else _HF_DETR_DECODER) + _HF_FFN
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            inner = key[len("model.") :]
        elif key.startswith(("class_labels_classifier.", "bbox_predictor.", "class_embed.", "bbox_embed.")):
            out[_apply(key, _HF_HEADS)] = value
            continue
        else:
            inner = key  # a bare DetrModel / DeformableDetrModel
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", inner)
        if m:
            stack, index, rest = m.groups()
            rest = _apply(rest, enc_rules if stack == "encoder" else dec_rules)
            out[f"transformer.{stack}.layers.{index}.{rest}"] = value
            continue
        out[_apply(inner, _HF_COMMON + top)] = value
    # MSDA layers have no q/k/v projections, so only nn.MultiheadAttention weights are merged.
    return _merge_qkv(out)


def _load_file(path, trusted: bool):
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    # The originals' checkpoints store their argparse Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"load_checkpoint: {path} holds objects beyond tensors and argparse.Namespace; if you trust the "
                f"file pass trusted=True ({error})"
            ) from error


def _unwrap(source, trusted: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, (str, PathLike)):
        source = _load_file(source, trusted)
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    for key in ("model", "state_dict"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    state = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.endswith(("total_ops", "total_params")):  # thop profiling buffers
            continue
        state[key.removeprefix("module.")] = value
    if is_hf_state_dict(state):
        return convert_hf_state_dict(state), "hf"
    return state, "original"


def _fill_shared(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Keys that alias one tensor in ``model`` (shared heads listed once per decoder layer, the decoder's view
    of the box-refine heads) are filled from whichever alias the checkpoint has: HF's save dedups them."""
    aliases: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(key)
    for keys in aliases.values():
        present = [k for k in keys if k in state]
        if present:
            for k in keys:
                state.setdefault(k, state[present[0]])


def load_checkpoint(model: nn.Module, source, *, strict: bool = True, trusted: bool = False) -> LoadReport:
    """Load ``source`` (a path or a state dict; original layout bare / under ``"model"`` / ``module.``-prefixed,
    or HF transformers v4 layout) into ``model``.

    Files are read with ``weights_only`` unpickling (plus ``argparse.Namespace``); ``trusted=True`` lifts that.
    Raises ValueError on any shape mismatch, and, with ``strict``, on missing or unexpected keys. Returns a
    :class:`LoadReport` either way.
    """
    state, layout = _unwrap(source, trusted)
    _fill_shared(model, state)
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError("load_checkpoint: shape mismatch for " + "; ".join(mismatched[:10]))
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    report = LoadReport(layout, missing, unexpected)
    if strict and not report.ok:
        raise ValueError(
            f"load_checkpoint ({layout} layout): {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _backbone_name(state: Mapping[str, torch.Tensor]) -> str | None:
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    layer3 = _layer_count(state, "backbone.0.body.layer3")
    names = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    return names.get((bottleneck, layer3))


def describe_state(source) -> str:
    """A few words on what a loaded file holds, for error messages about files that are not checkpoints."""
    if not isinstance(source, Mapping):
        return f"a {type(source).__name__}"
    keys = sorted(str(k) for k in source)
    return f"a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"


def official_model_config(source) -> tuple[str, dict, str] | None:
    """``(model name, model config fields, description)`` of an official checkpoint (fundamentalvision
    Deformable-DETR / facebookresearch DETR, bare or under ``"model"``, or the HF transformers v4 layout), read from
    its tensor shapes and, when present, its saved ``args``; None when ``source`` is no such checkpoint.

    What the shapes cannot tell (heads, sampling points, dilation) comes from ``args`` or the papers' defaults."""
    if not isinstance(source, Mapping):
        return None
    state, layout = _unwrap(source)
    args = source.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    deformable = any(".sampling_offsets." in k for k in state)
    detr = "transformer.encoder.layers.0.self_attn.in_proj_weight" in state and "class_embed.weight" in state
    backbone = _backbone_name(state)
    if not (deformable or detr) or backbone is None:
        return None
    fields: dict = {"backbone": backbone, "pretrained": False}
    fields["enc_layers"] = _layer_count(state, "transformer.encoder.layers")
    fields["dec_layers"] = _layer_count(state, "transformer.decoder.layers")
    fields["dim_feedforward"] = state["transformer.encoder.layers.0.linear1.weight"].shape[0]
    for name in ("nheads", "dilation", "position_embedding", "dropout"):
        if name in args:
            fields[name] = args[name]
    if deformable:
        name = "deformable_detr"
        fields["hidden_dim"] = state["transformer.level_embed"].shape[1]
        fields["num_feature_levels"] = state["transformer.level_embed"].shape[0]
        head = "class_embed.0.weight" if "class_embed.0.weight" in state else "class_embed.weight"
        fields["num_classes"] = state[head].shape[0]
        fields["two_stage"] = "transformer.enc_output.weight" in state
        # Without box refinement the original lists one shared head per decoder layer: one storage, many keys.
        shared = (
            "class_embed.1.weight" in state
            and state["class_embed.1.weight"].data_ptr() == state["class_embed.0.weight"].data_ptr()
        )
        fields["with_box_refine"] = bool(args.get("with_box_refine", "class_embed.1.weight" in state and not shared))
        fields["with_box_refine"] = fields["with_box_refine"] or fields["two_stage"]
        for key in ("enc_n_points", "dec_n_points"):
            if key in args:
                fields[key] = args[key]
        if "query_embed.weight" in state:
            fields["num_queries"] = state["query_embed.weight"].shape[0]
        elif "num_queries" in args:
            fields["num_queries"] = args["num_queries"]
    else:
        name = "detr"
        fields["hidden_dim"] = state["query_embed.weight"].shape[1]
        fields["num_queries"] = state["query_embed.weight"].shape[0]
        fields["num_classes"] = state["class_embed.weight"].shape[0] - 1  # plus "no object"
    title = "Deformable DETR" if deformable else "DETR"
    where = "HF transformers" if layout == "hf" else "official"
    return name, fields, f"an {where} {title} checkpoint ({backbone}, {fields['num_classes']} classes)"
