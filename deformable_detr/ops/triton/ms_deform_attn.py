"""``deformable_detr::ms_deform_attn_triton`` and its backward as ``torch.library.triton_op``s.

The op bodies only check, allocate and launch (through ``wrap_triton``), so ``torch.compile`` sees the Triton
kernels themselves, and the same bodies serve as fake kernels. On CUDA the launch configuration is autotuned
over a small set keyed on (D, L, P, Q bucket); elsewhere (CPU tensors under ``TRITON_INTERPRET=1``) a fixed
heuristic is used so tests never autotune.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from deformable_detr.ops.triton._kernels import _msda_backward_kernel, _msda_forward_kernel

_FORWARD_OP = "deformable_detr::ms_deform_attn_triton"
_BACKWARD_OP = "deformable_detr::ms_deform_attn_triton_backward"
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Channel tiles: the forward splits D over programs; the backward loops over D inside a program because it
# reduces over all channels. Capped so that a [BLOCK_Q, BLOCK_D] fp32 tile stays in registers.
_MAX_FORWARD_BLOCK_D = 128
_MAX_BACKWARD_BLOCK_D = 64
# Interpreter / non-autotuned launch: large enough that the interpreter runs few programs.
_HEURISTIC_BLOCK_Q = 16
_HEURISTIC_NUM_WARPS = 4


def _q_bucket(Q: int) -> int:
    """Coarse size class of the query count for the autotune key (decoder ~300, mid-size, encoder ~20k)."""
    return 0 if Q <= 1024 else (1 if Q <= 8192 else 2)


def _configs(pairs):
    return [triton.Config({"BLOCK_Q": block_q}, num_warps=warps) for block_q, warps in pairs]


_AUTOTUNE_KEY = ["D", "L", "P", "K", "q_bucket", "RAGGED", "DISCRETE"]
_forward_autotuned = triton.autotune(
    configs=_configs([(8, 2), (16, 2), (16, 4), (32, 4), (64, 4), (64, 8)]),
    key=_AUTOTUNE_KEY,
)(_msda_forward_kernel)
# Autotuning runs the kernel several times; grad_value is accumulated with atomics, so it is re-zeroed first.
_backward_autotuned = triton.autotune(
    configs=_configs([(8, 2), (16, 2), (16, 4), (32, 4), (64, 8)]),
    key=_AUTOTUNE_KEY,
    reset_to_zero=["grad_value_ptr"],
)(_msda_backward_kernel)


def _acc_dtype(value: torch.Tensor):
    return tl.float64 if value.dtype == torch.float64 else tl.float32


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device; a tensor on cuda:1 needs that device made current.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _sizes(value, spatial_shapes, sampling_locations, point_start, discrete):
    """Kernel size arguments (without the tile sizes): Q, S, M, D, L, P (points per level of the 6-D layout, 0
    for the ragged one), K (points per (n, q, m) row) and the two variant switches."""
    N, S, M, D = value.shape
    Q = sampling_locations.shape[1]
    if point_start is None:
        L, P = sampling_locations.shape[3], sampling_locations.shape[4]
        K = L * P
    else:
        L, P, K = spatial_shapes.shape[0], 0, sampling_locations.shape[3]
    sizes = dict(Q=Q, S=S, M=M, D=D, L=L, P=P, K=K, q_bucket=_q_bucket(Q), ACC=_acc_dtype(value))
    sizes.update(RAGGED=point_start is not None, DISCRETE=bool(discrete))
    return sizes


def _is_empty(N, sizes) -> bool:
    # No output element, or no sample: the output and all gradients are zero. S == 0 is not empty: every level is
    # then empty, yet a NaN location must still poison its head (the NaN rule), so the kernels run.
    return N * sizes["Q"] * sizes["M"] * sizes["D"] * sizes["K"] == 0


@triton_op(_FORWARD_OP, mutates_args=())
def _ms_deform_attn_triton_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    point_start: torch.Tensor | None = None,
    discrete: bool = False,
) -> torch.Tensor:
    N, _, M, D = value.shape
    sizes = _sizes(value, spatial_shapes, sampling_locations, point_start, discrete)
    Q = sizes["Q"]
    if _is_empty(N, sizes):
        return value.new_zeros((N, Q, M * D))
    out = value.new_empty((N, Q, M * D))
    block_d = min(triton.next_power_of_2(D), _MAX_FORWARD_BLOCK_D)
    num_d_blocks = triton.cdiv(D, block_d)
    args = (
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        _point_table(point_start, level_start_index),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        out,
    )
    sizes["BLOCK_D"] = block_d
    with _device_guard(value):
        if value.device.type == "cuda":
            grid = lambda meta: (N * M * num_d_blocks * triton.cdiv(Q, meta["BLOCK_Q"]),)  # noqa: E731
            wrap_triton(_forward_autotuned)[grid](*args, **sizes)
        else:
            grid = (N * M * num_d_blocks * triton.cdiv(Q, _HEURISTIC_BLOCK_Q),)
            wrap_triton(_msda_forward_kernel)[grid](
                *args, **sizes, BLOCK_Q=_HEURISTIC_BLOCK_Q, num_warps=_HEURISTIC_NUM_WARPS
            )
    return out


@triton_op(_BACKWARD_OP, mutates_args=())
def _ms_deform_attn_triton_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    point_start: torch.Tensor | None = None,
    discrete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, _, M, D = value.shape
    sizes = _sizes(value, spatial_shapes, sampling_locations, point_start, discrete)
    Q = sizes["Q"]
    grad_locations = torch.zeros(sampling_locations.shape, dtype=sampling_locations.dtype, device=value.device)
    grad_weights = torch.zeros(attention_weights.shape, dtype=attention_weights.dtype, device=value.device)
    # Atomics accumulate in float32 (float64 for float64): half-precision atomics would round every add.
    acc_torch_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value_acc = torch.zeros(value.shape, dtype=acc_torch_dtype, device=value.device)
    if not _is_empty(N, sizes):
        args = (
            grad_output.contiguous(),
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            _point_table(point_start, level_start_index),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
            grad_value_acc,
            grad_locations,
            grad_weights,
        )
        sizes["BLOCK_D"] = min(triton.next_power_of_2(D), _MAX_BACKWARD_BLOCK_D)
        with _device_guard(value):
            if value.device.type == "cuda":
                grid = lambda meta: (N * M * triton.cdiv(Q, meta["BLOCK_Q"]),)  # noqa: E731
                wrap_triton(_backward_autotuned)[grid](*args, **sizes)
            else:
                grid = (N * M * triton.cdiv(Q, _HEURISTIC_BLOCK_Q),)
                wrap_triton(_msda_backward_kernel)[grid](
                    *args, **sizes, BLOCK_Q=_HEURISTIC_BLOCK_Q, num_warps=_HEURISTIC_NUM_WARPS
                )
    return grad_value_acc.to(value.dtype), grad_locations, grad_weights


def _point_table(point_start, level_start_index):
    # The uniform kernels never read the point table; any int64 tensor stands in for the pointer.
    return level_start_index.contiguous() if point_start is None else point_start.contiguous()


def _setup_context(ctx, inputs, output):
    *tensors, point_start, discrete = inputs
    ctx.save_for_backward(*tensors, point_start)
    ctx.discrete = discrete


def _alert_not_deterministic() -> None:
    """grad_value is summed with float atomics on the GPU: honour torch.use_deterministic_algorithms as PyTorch's
    own atomic kernels do (an error, or a warning in warn_only mode)."""
    message = (
        "ms_deform_attn backward (Triton, CUDA) sums grad_value with float atomics, so it is not deterministic; "
        "it cannot run under torch.use_deterministic_algorithms(True)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start = ctx.saved_tensors
    if value.is_cuda and torch.are_deterministic_algorithms_enabled():
        _alert_not_deterministic()
    grad_value, grad_locations, grad_weights = torch.ops.deformable_detr.ms_deform_attn_triton_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        point_start,
        ctx.discrete,
    )
    return grad_value, None, None, grad_locations, grad_weights, None, None


_ms_deform_attn_triton_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    point_start: torch.Tensor | None = None,
    discrete: bool = False,
) -> torch.Tensor:
    """Triton MSDA (README, "Operator contract") on already-validated inputs; differentiable and torch.compile-able.

    ``spatial_shapes`` / ``level_start_index`` must be int64 on ``value``'s device. Without ``point_start`` the
    6-D layout (locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P)); with it, points per level: locations
    (N, Q, M, K, 2), weights (N, Q, M, K), ``point_start`` the (L + 1,) int64 table [0, P_0, P_0 + P_1, ..., K]
    on ``value``'s device. ``discrete``: nearest-pixel sampling (no location gradient) instead of bilinear.
    Returns (N, Q, M * D) in ``value``'s dtype; accumulation is float32 (float64 for float64 values).
    """
    if value.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"ms_deform_attn_triton: value must be float32, float64, float16 or bfloat16, got {value.dtype}"
        )
    tables = [("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)]
    if point_start is not None:
        tables.append(("point_start", point_start))
        L = spatial_shapes.shape[0]
        if point_start.shape != (L + 1,):
            raise ValueError(
                f"ms_deform_attn_triton: point_start must have shape (L + 1,) = ({L + 1},), got {tuple(point_start.shape)}"
            )
    for name, t in tables:
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn_triton: {name} is on {t.device}, value on {value.device}")
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn_triton: {name} must be int64, got {t.dtype}")
    return torch.ops.deformable_detr.ms_deform_attn_triton(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start, bool(discrete)
    )
