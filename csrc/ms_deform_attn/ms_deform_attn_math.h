// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// One "sample" is one (query, head, level, point): a normalized location (x, y) in a level of size H x W,
// bilinearly interpolated with grid_sample(align_corners=False, padding_mode="zeros") semantics:
//   w_im = x * W - 0.5,  h_im = y * H - 0.5,
// and the four integer corners around (h_im, w_im); corners outside the map contribute zero.
// Everything here is computed in the accumulation type acc_t (float for half types, else the dtype).
//
// Non-finite samples (the contract's rule): a location at x or y = +-inf lies outside every map (contributes 0,
// zero gradients); a NaN x or y makes every channel of the (n, q, m) output NaN, gives NaN gradients for both
// coordinates and the attention weight, and writes nothing into grad_value; a NaN attention weight propagates
// by IEEE arithmetic, including NaN * 0 for a sample outside the map. bilinear_corners() reports NaN and
// infinite locations as !any, so kernels test for NaN only on that rare path (location_is_nan, quiet_nan).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/portability.h"

namespace deformable_detr {
namespace msda {

// Level l of a table: its size and its first position in S. The kernels read the tables through this only, and a
// level whose map would leave [0, S) reads as empty (H = W = 0). The CUDA host cannot validate a device table
// without a sync, and the CPU entry checks a table's values once, not on every call (ms_deform_attn_checks.h,
// checked_levels), so a corrupt or later-edited table gives zeros, never a read outside value.
struct Level {
  int64_t H, W, start;
};

DDETR_HOST_DEVICE_INLINE Level read_level(const int64_t* shapes, const int64_t* starts, int64_t l, int64_t S) {
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
  constexpr int64_t kSide = int64_t{1} << 31;  // keeps H * W below 2^62: no overflow in the size test
  const bool ok = H > 0 && W > 0 && H < kSide && W < kSide && start >= 0 && start <= S && H * W <= S - start;
  return ok ? Level{H, W, start} : Level{0, 0, 0};
}

// Corner order: 0 = (h0, w0), 1 = (h0, w0 + 1), 2 = (h0 + 1, w0), 3 = (h0 + 1, w0 + 1).
template <typename acc_t>
struct Corners {
  acc_t weight[4];    // bilinear weight of each corner (0 for invalid corners)
  int64_t offset[4];  // spatial index h * W + w inside the level (0 for invalid corners: safe to read)
  bool valid[4];      // corner lies inside the map
  acc_t lh, lw;       // fractional parts, needed by the location gradient
  bool any;           // at least one corner is inside the map
};

template <typename acc_t>
DDETR_HOST_DEVICE_INLINE Corners<acc_t> bilinear_corners(acc_t x, acc_t y, int64_t H, int64_t W) {
  Corners<acc_t> c;
  const acc_t w_im = x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  const acc_t h_im = y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  // Outside (-1, H) x (-1, W) every corner is invalid, and an empty level has no corner at all. The comparisons
  // are false for NaN and +-inf too, so those never reach floor() (see the non-finite rule above).
  c.any = (H > 0) && (W > 0) && (h_im > static_cast<acc_t>(-1)) && (w_im > static_cast<acc_t>(-1)) &&
          (h_im < static_cast<acc_t>(H)) && (w_im < static_cast<acc_t>(W));
  if (!c.any) {
    DDETR_UNROLL
    for (int k = 0; k < 4; ++k) {
      c.weight[k] = 0;
      c.offset[k] = 0;
      c.valid[k] = false;
    }
    c.lh = 0;
    c.lw = 0;
    return c;
  }
  const acc_t h_floor = floor(h_im);
  const acc_t w_floor = floor(w_im);
  const int64_t h0 = static_cast<int64_t>(h_floor);
  const int64_t w0 = static_cast<int64_t>(w_floor);
  c.lh = h_im - h_floor;
  c.lw = w_im - w_floor;
  const acc_t hh = static_cast<acc_t>(1) - c.lh;
  const acc_t hw = static_cast<acc_t>(1) - c.lw;
  const bool h0_ok = h0 >= 0;
  const bool h1_ok = h0 + 1 <= H - 1;
  const bool w0_ok = w0 >= 0;
  const bool w1_ok = w0 + 1 <= W - 1;
  c.valid[0] = h0_ok && w0_ok;
  c.valid[1] = h0_ok && w1_ok;
  c.valid[2] = h1_ok && w0_ok;
  c.valid[3] = h1_ok && w1_ok;
  const acc_t raw[4] = {hh * hw, hh * c.lw, c.lh * hw, c.lh * c.lw};
  const int64_t off[4] = {h0 * W + w0, h0 * W + w0 + 1, (h0 + 1) * W + w0, (h0 + 1) * W + w0 + 1};
  DDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    c.weight[k] = c.valid[k] ? raw[k] : static_cast<acc_t>(0);
    c.offset[k] = c.valid[k] ? off[k] : 0;
  }
  return c;
}

// sampling="discrete": the nearest pixel, ix = clamp(floor(x * W + 0.5), 0, W - 1), same for y, border-clamped,
// as one corner of weight 1 (corner 0; the others invalid). Every location of a non-empty level reads a pixel,
// +-inf included (the clamp runs in floating point, before the integer conversion, so it is defined); only a
// NaN location or an empty level gives !any. No location gradient: lh = lw = 0, and the kernels write 0.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE Corners<acc_t> nearest_corner(acc_t x, acc_t y, int64_t H, int64_t W) {
  Corners<acc_t> c;
  DDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    c.weight[k] = 0;
    c.offset[k] = 0;
    c.valid[k] = false;
  }
  c.lh = 0;
  c.lw = 0;
  c.any = (H > 0) && (W > 0) && x == x && y == y;
  if (!c.any) return c;
  const acc_t half = static_cast<acc_t>(0.5);
  acc_t fx = floor(x * static_cast<acc_t>(W) + half);
  acc_t fy = floor(y * static_cast<acc_t>(H) + half);
  const acc_t max_x = static_cast<acc_t>(W - 1), max_y = static_cast<acc_t>(H - 1);
  fx = fx < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : (fx > max_x ? max_x : fx);
  fy = fy < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : (fy > max_y ? max_y : fy);
  c.weight[0] = 1;
  c.offset[0] = static_cast<int64_t>(fy) * W + static_cast<int64_t>(fx);
  c.valid[0] = true;
  return c;
}

// The corners of one sample in either sampling mode.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE Corners<acc_t> sample_corners(acc_t x, acc_t y, int64_t H, int64_t W, bool discrete) {
  return discrete ? nearest_corner<acc_t>(x, y, H, W) : bilinear_corners<acc_t>(x, y, H, W);
}

// True when x or y is NaN. Call only where bilinear_corners() returned !any (the rule above): that keeps the
// check off the hot path. x != x rather than isnan(): the same on host and device, and kept under fast-math
// flags that do not assume finite math (nvcc --use_fast_math does not).
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE bool location_is_nan(acc_t x, acc_t y) {
  return x != x || y != y;
}

// A quiet NaN in acc_t, usable on host and device (NAN from <cmath> is a float constant expression).
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Bilinear value from the four corner values of one channel (invalid corners are already weighted 0).
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE acc_t interpolate(const Corners<acc_t>& c, const acc_t v[4]) {
  return c.weight[0] * v[0] + c.weight[1] * v[1] + c.weight[2] * v[2] + c.weight[3] * v[3];
}

// Gradient of one channel's bilinear value w.r.t. (w_im, h_im), scaled by `coeff` (= attention weight x
// upstream gradient) and added into (grad_w_im, grad_h_im). Invalid corners must be passed as v = 0.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE void accumulate_position_grad(const Corners<acc_t>& c, const acc_t v[4], acc_t coeff,
                                                       acc_t& grad_w_im, acc_t& grad_h_im) {
  const acc_t hh = static_cast<acc_t>(1) - c.lh;
  const acc_t hw = static_cast<acc_t>(1) - c.lw;
  grad_w_im += coeff * (hh * (v[1] - v[0]) + c.lh * (v[3] - v[2]));
  grad_h_im += coeff * (hw * (v[2] - v[0]) + c.lw * (v[3] - v[1]));
}

// d(w_im)/dx = W and d(h_im)/dy = H: the location gradient in normalized coordinates.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE void position_grad_to_location(acc_t grad_w_im, acc_t grad_h_im, int64_t H, int64_t W,
                                                        acc_t& grad_x, acc_t& grad_y) {
  grad_x = grad_w_im * static_cast<acc_t>(W);
  grad_y = grad_h_im * static_cast<acc_t>(H);
}

}  // namespace msda
}  // namespace deformable_detr
