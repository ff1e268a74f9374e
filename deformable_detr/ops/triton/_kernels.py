"""Triton kernels of multi-scale deformable attention (forward and backward).

One program owns BLOCK_Q queries of one (batch n, head m) and a block of BLOCK_D channels, and loops over the
L levels and P points. Per sample it computes the four bilinear corners once for the whole block of queries and
gathers a [BLOCK_Q, BLOCK_D] tile per corner: each row is D contiguous channels of ``value``, so the gathers are
coalesced along D. All math runs in ACC (float32, or float64 for float64 inputs).

Layouts (all tensors contiguous, row-major):
    value            (N, S, M, D)      index ((n * S + s) * M + m) * D + d
    spatial_shapes   (L, 2) int64      (H_l, W_l)
    level_start      (L,) int64
    point_start      (L + 1,) int64    [0, P_0, P_0 + P_1, ..., K] (RAGGED only)
    locations        (N, Q, M, K, 2)   K = L * P points, level-major; the 6-D (N, Q, M, L, P, 2) is this with
    weights          (N, Q, M, K)      P_l = P, so both layouts share one flat (n, q, m, k) sample index
    out / grad_out   (N, Q, M * D)     index ((n * Q + q) * M + m) * D + d

Two compile-time switches select the variant (each its own compiled kernel, so the uniform bilinear kernel is
the same code as without them): RAGGED reads the points of level l as [point_start[l], point_start[l + 1]) (the
level table's way: one scalar load per level) instead of [l * P, (l + 1) * P); DISCRETE samples the nearest pixel
ix = clamp(floor(x * W + 0.5), 0, W - 1) (same for y; border-clamped, so +-inf reads the border pixel) with one
gather per sample, and gives locations no gradient (0; NaN for a NaN location, the NaN rule).

Bad data never leads to a stray access: a level whose map would leave [0, S) reads as empty (_checked_level, the CUDA
kernels' rule). Non-finite rule (README "Backends", csrc/ms_deform_attn/ms_deform_attn_math.h): a sample whose x or y is
NaN makes every channel of its (n, q, m) head NaN, its location and weight gradients NaN, and adds nothing to
grad_value; +-inf locations are outside the map; a NaN attention weight propagates by IEEE arithmetic (the corner
weights of a sample off the map are finite and its corner values 0, so NaN * 0 poisons the head there too).

Pointers are only dereferenced in the kernel bodies (and the gather / scatter helpers): the helpers that compute
addresses take loaded values, never a table or location pointer. torch.compile's analysis of which arguments a
user kernel writes (torch._higher_order_ops.triton_kernel_wrap) follows a store's address back through helper
calls but not through loads, so a pointer passed into an address-computing helper would be reported as written
(sampling_locations "mutated" -> "a leaf Variable that requires grad is being used in an in-place operation").

The grid is one flat axis (N * M * Q-blocks * D-blocks) so that no dimension runs into CUDA's 65535 limit on
grid axes 1 and 2; offsets are int64 because N * S * M * D exceeds 2^31 for large batches. A point table whose
ranges leave [0, K) is clamped into it (points outside read nothing), so a corrupt table cannot cause a stray access
either.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bilinear_corners(loc_x, loc_y, H, W, q_mask):
    """grid_sample(align_corners=False, padding_mode="zeros") corners of a block of samples.

    Returns the top-left integer corner (h0, w0), the fractional parts (lh, lw) and the validity of the rows
    h0, h0 + 1 and columns w0, w0 + 1. Same conditions as csrc/ms_deform_attn/ms_deform_attn_math.h.
    """
    Hf = H.to(loc_x.dtype)
    Wf = W.to(loc_x.dtype)
    w_im = loc_x * Wf - 0.5
    h_im = loc_y * Hf - 0.5
    # False for NaN as well: such samples read nothing (the callers apply the NaN rule, see _load_sample).
    inside = q_mask & (h_im > -1.0) & (w_im > -1.0) & (h_im < Hf) & (w_im < Wf)
    # Keep NaN / huge coordinates of samples that read nothing away from floor() and the int64 cast.
    h_im = tl.where(inside, h_im, 0.0)
    w_im = tl.where(inside, w_im, 0.0)
    h_floor = tl.floor(h_im)
    w_floor = tl.floor(w_im)
    lh = h_im - h_floor
    lw = w_im - w_floor
    h0 = h_floor.to(tl.int64)
    w0 = w_floor.to(tl.int64)
    h0_ok = inside & (h0 >= 0)
    h1_ok = inside & (h0 + 1 < H)
    w0_ok = inside & (w0 >= 0)
    w1_ok = inside & (w0 + 1 < W)
    return h0, w0, lh, lw, h0_ok, h1_ok, w0_ok, w1_ok


@triton.jit
def _checked_level(H, W, start, S):
    """(H, W, start, ok) of a level from its loaded table entries. The host cannot check spatial_shapes /
    level_start_index on the device without a sync, so, as in the CUDA kernels (read_level), a level whose map
    would leave [0, S) of its (n, m) slice is read as empty (ok False, H = W = start = 0): corrupt shapes give
    zeros, never a stray access."""
    side = 2147483648  # keeps H * W below 2^62: no overflow in the size test
    ok = (H > 0) & (W > 0) & (H < side) & (W < side) & (start >= 0) & (start <= S)
    ok = ok & (tl.where(ok, H, 0) * tl.where(ok, W, 0) <= S - start)
    return tl.where(ok, H, 0), tl.where(ok, W, 0), tl.where(ok, start, 0), ok


@triton.jit
def _clamped_range(first, last, K):
    """[begin, end) of a level's points from its two point-table entries, clamped into [0, K)."""
    begin = tl.minimum(tl.maximum(first, 0), K)
    return begin, tl.minimum(tl.maximum(last, begin), K)


@triton.jit
def _discrete_sample(loc_x, loc_y, q_mask, H, W, level_ok, ACC: tl.constexpr):
    """Pixel index and validity of one discrete sample (loaded x, y) for a block of queries: the nearest pixel
    clamp(floor(x * W + 0.5), 0, W - 1), clamp(floor(y * H + 0.5), 0, H - 1) (RT-DETRv2's rule, round half up).
    ``is_nan``: x or y is NaN (the NaN rule; such a sample reads nothing)."""
    is_nan = q_mask & ((loc_x != loc_x) | (loc_y != loc_y))
    # Clamped in floating point before the int64 cast: +-inf and huge values land on the border pixel.
    Wf = W.to(ACC)
    Hf = H.to(ACC)
    ix = tl.minimum(tl.maximum(tl.floor(loc_x * Wf + 0.5), 0.0), Wf - 1.0)
    iy = tl.minimum(tl.maximum(tl.floor(loc_y * Hf + 0.5), 0.0), Hf - 1.0)
    ok = q_mask & level_ok & ~is_nan
    index = tl.where(ok, iy, 0.0).to(tl.int64) * W + tl.where(ok, ix, 0.0).to(tl.int64)
    return index, ok, is_nan


@triton.jit
def _bilinear_sample(loc_x, loc_y, q_mask, H, W, level_ok):
    """Bilinear fractions, corner indices and corner validity of one (level, point) sample (loaded x, y) for a
    block of queries. ``is_nan``: the sample's x or y is NaN (its head's output and its location / weight
    gradients are NaN; it reads nothing)."""
    live = q_mask & level_ok
    h0, w0, lh, lw, h0_ok, h1_ok, w0_ok, w1_ok = _bilinear_corners(loc_x, loc_y, H, W, live)
    # On an empty level too: the rule holds for every sample off the map (as the CPU and CUDA kernels do).
    is_nan = q_mask & ((loc_x != loc_x) | (loc_y != loc_y))
    top = h0 * W + w0
    return lh, lw, top, top + W, h0_ok & w0_ok, h0_ok & w1_ok, h1_ok & w0_ok, h1_ok & w1_ok, is_nan


@triton.jit
def _gather(level_ptr, spatial_index, corner_ok, d, d_mask, row_stride, ACC: tl.constexpr):
    """[BLOCK_Q, BLOCK_D] tile of value rows ``spatial_index`` (invalid corners read as 0, without a load)."""
    ptrs = level_ptr + spatial_index[:, None] * row_stride + d[None, :]
    return tl.load(ptrs, mask=corner_ok[:, None] & d_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _msda_forward_kernel(
    value_ptr,
    shapes_ptr,
    level_start_ptr,
    point_start_ptr,  # read only when RAGGED
    loc_ptr,
    attn_ptr,
    out_ptr,
    Q,
    S,
    M,
    D,
    L,
    P,  # points per level when not RAGGED
    K,  # points per (n, q, m) row
    q_bucket,  # autotune key only: coarse size class of Q
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    RAGGED: tl.constexpr,
    DISCRETE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_q_blocks = tl.cdiv(Q, BLOCK_Q)
    num_d_blocks = tl.cdiv(D, BLOCK_D)
    d_block = pid % num_d_blocks
    rest = pid // num_d_blocks
    q_block = rest % num_q_blocks
    rest = rest // num_q_blocks
    m = rest % M
    n = rest // M

    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    q_mask = q < Q
    d_mask = d < D
    row_stride = M * D
    value_nm_ptr = value_ptr + n * S * row_stride + m * D
    # Flat (n, q, m, k=0) index into weights; locations use twice that.
    sample_base = ((n * Q + q) * M + m) * K

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for level in range(L):
        H, W, start, level_ok = _checked_level(
            tl.load(shapes_ptr + 2 * level), tl.load(shapes_ptr + 2 * level + 1), tl.load(level_start_ptr + level), S
        )
        level_ptr = value_nm_ptr + start * row_stride
        if RAGGED:
            begin, end = _clamped_range(tl.load(point_start_ptr + level), tl.load(point_start_ptr + level + 1), K)
        else:
            begin = level * P
            end = begin + P
        for point in range(begin, end):
            sample = sample_base + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(ACC)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(ACC)
            a = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(ACC)
            if DISCRETE:
                index, ok, is_nan = _discrete_sample(loc_x, loc_y, q_mask, H, W, level_ok, ACC)
                acc += a[:, None] * _gather(level_ptr, index, ok, d, d_mask, row_stride, ACC)
            else:
                lh, lw, top, bottom, ok00, ok01, ok10, ok11, is_nan = _bilinear_sample(
                    loc_x, loc_y, q_mask, H, W, level_ok
                )
                hh = 1.0 - lh
                hw = 1.0 - lw
                v00 = _gather(level_ptr, top, ok00, d, d_mask, row_stride, ACC)
                v01 = _gather(level_ptr, top + 1, ok01, d, d_mask, row_stride, ACC)
                v10 = _gather(level_ptr, bottom, ok10, d, d_mask, row_stride, ACC)
                v11 = _gather(level_ptr, bottom + 1, ok11, d, d_mask, row_stride, ACC)
                acc += (
                    (a * hh * hw)[:, None] * v00
                    + (a * hh * lw)[:, None] * v01
                    + (a * lh * hw)[:, None] * v10
                    + (a * lh * lw)[:, None] * v11
                )
            acc = tl.where(is_nan[:, None], float("nan"), acc)

    out_ptrs = out_ptr + ((n * Q + q) * M + m)[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter(grad_level_ptr, spatial_index, corner_ok, d, d_mask, row_stride, contribution):
    ptrs = grad_level_ptr + spatial_index[:, None] * row_stride + d[None, :]
    tl.atomic_add(ptrs, contribution, mask=corner_ok[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _msda_backward_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    level_start_ptr,
    point_start_ptr,  # read only when RAGGED
    loc_ptr,
    attn_ptr,
    grad_value_ptr,  # zero-initialised, ACC dtype, same layout as value
    grad_loc_ptr,
    grad_attn_ptr,
    Q,
    S,
    M,
    D,
    L,
    P,  # points per level when not RAGGED
    K,  # points per (n, q, m) row
    q_bucket,  # autotune key only: coarse size class of Q
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    RAGGED: tl.constexpr,
    DISCRETE: tl.constexpr,
):
    # Every (query, head, level, point) belongs to exactly one program, which reduces over all D channels in
    # registers (looping over D in BLOCK_D chunks), so grad locations / weights are plain stores. Only
    # grad_value, where many samples hit the same corner, needs atomics.
    pid = tl.program_id(0).to(tl.int64)
    num_q_blocks = tl.cdiv(Q, BLOCK_Q)
    q_block = pid % num_q_blocks
    rest = pid // num_q_blocks
    m = rest % M
    n = rest // M

    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    q_mask = q < Q
    row_stride = M * D
    nm_offset = n * S * row_stride + m * D
    value_nm_ptr = value_ptr + nm_offset
    grad_value_nm_ptr = grad_value_ptr + nm_offset
    grad_out_rows = ((n * Q + q) * M + m) * D
    sample_base = ((n * Q + q) * M + m) * K

    for level in range(L):
        H, W, start, level_ok = _checked_level(
            tl.load(shapes_ptr + 2 * level), tl.load(shapes_ptr + 2 * level + 1), tl.load(level_start_ptr + level), S
        )
        level_offset = start * row_stride
        level_ptr = value_nm_ptr + level_offset
        grad_level_ptr = grad_value_nm_ptr + level_offset
        if RAGGED:
            begin, end = _clamped_range(tl.load(point_start_ptr + level), tl.load(point_start_ptr + level + 1), K)
        else:
            begin = level * P
            end = begin + P
        for point in range(begin, end):
            sample = sample_base + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(ACC)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(ACC)
            a = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(ACC)
            # The sample's corners: four bilinear ones, or for DISCRETE the one nearest pixel as (top, ok00).
            if DISCRETE:
                top, ok00, is_nan = _discrete_sample(loc_x, loc_y, q_mask, H, W, level_ok, ACC)
            else:
                lh, lw, top, bottom, ok00, ok01, ok10, ok11, is_nan = _bilinear_sample(
                    loc_x, loc_y, q_mask, H, W, level_ok
                )
                hh = 1.0 - lh
                hw = 1.0 - lw
                s01 = tl.zeros([BLOCK_Q], dtype=ACC)
                s10 = tl.zeros([BLOCK_Q], dtype=ACC)
                s11 = tl.zeros([BLOCK_Q], dtype=ACC)
            # s_k = sum_d grad_out * v_k: every gradient of this sample except grad_value is a combination of
            # these dot products (one for DISCRETE, four for bilinear).
            s00 = tl.zeros([BLOCK_Q], dtype=ACC)
            for d_start in range(0, D, BLOCK_D):
                d = d_start + tl.arange(0, BLOCK_D)
                d_mask = d < D
                go = tl.load(
                    grad_out_ptr + grad_out_rows[:, None] + d[None, :],
                    mask=q_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(ACC)
                a_go = a[:, None] * go
                s00 += tl.sum(go * _gather(level_ptr, top, ok00, d, d_mask, row_stride, ACC), axis=1)
                if DISCRETE:
                    _scatter(grad_level_ptr, top, ok00, d, d_mask, row_stride, a_go)
                else:
                    s01 += tl.sum(go * _gather(level_ptr, top + 1, ok01, d, d_mask, row_stride, ACC), axis=1)
                    s10 += tl.sum(go * _gather(level_ptr, bottom, ok10, d, d_mask, row_stride, ACC), axis=1)
                    s11 += tl.sum(go * _gather(level_ptr, bottom + 1, ok11, d, d_mask, row_stride, ACC), axis=1)
                    _scatter(grad_level_ptr, top, ok00, d, d_mask, row_stride, (hh * hw)[:, None] * a_go)
                    _scatter(grad_level_ptr, top + 1, ok01, d, d_mask, row_stride, (hh * lw)[:, None] * a_go)
                    _scatter(grad_level_ptr, bottom, ok10, d, d_mask, row_stride, (lh * hw)[:, None] * a_go)
                    _scatter(grad_level_ptr, bottom + 1, ok11, d, d_mask, row_stride, (lh * lw)[:, None] * a_go)
            if DISCRETE:
                # grad weight = <grad_out, v[pixel]>; the location gets no gradient.
                grad_a = s00
                grad_x = tl.zeros([BLOCK_Q], dtype=ACC)
                grad_y = grad_x
            else:
                # Invalid corners have s_k = 0 (masked loads), which is exactly the zero-padding gradient.
                grad_a = hh * hw * s00 + hh * lw * s01 + lh * hw * s10 + lh * lw * s11
                grad_x = a * (hh * (s01 - s00) + lh * (s11 - s10)) * W.to(ACC)
                grad_y = a * (hw * (s10 - s00) + lw * (s11 - s01)) * H.to(ACC)
            loc_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_loc_ptr + 2 * sample, tl.where(is_nan, float("nan"), grad_x).to(loc_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, tl.where(is_nan, float("nan"), grad_y).to(loc_ty), mask=q_mask)
            grad_a = tl.where(is_nan, float("nan"), grad_a)
            tl.store(grad_attn_ptr + sample, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
