// SIMD across samples for the fp32-accumulating CPU kernels: the per-sample corner math of ms_deform_attn_math.h
// (bilinear_corners: outside-map test, floor, fractions, the four corner weights, validity and offsets) and the
// backward's position / weight gradients, computed for kBatch consecutive samples of one row at once, one sample
// per fp32 lane (one ymm register in the AVX2 copy). The corner loops over channels stay per sample.
//
// Same arithmetic as the scalar path, operation by operation, so results agree with it to the last bit up to
// FMA contraction; the non-finite rule is the same: NaN and +-inf locations give no corner (the comparisons are
// false for them), and lanes without a corner take the rule's values by blends.
//
// Part of ms_deform_attn_cpu_kernels_impl.h (compiled once per instruction set, inside its target pragma): no
// includes here, include only from there.
#if defined(__GNUC__) || defined(__clang__)
#define DDETR_HAVE_SAMPLE_BATCH 1

namespace deformable_detr {
namespace msda {
namespace DDETR_CPU_ISA {
namespace {

constexpr int kBatch = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// The per-point constants of a row (every row has the same K points, uniform layout): the level's H and W as
// floats and ints, whether the level is non-empty, and the element offset of the level in a head's value rows.
// Padded to a multiple of kBatch with empty entries.
struct PointTable {
  PointTable(const Sizes& s, const int64_t* shapes, const int64_t* starts, int64_t row_stride) {
    const int64_t padded = (s.K + kBatch - 1) / kBatch * kBatch;
    Hf.assign(padded, 0.f);
    Wf.assign(padded, 0.f);
    Hi.assign(padded, 0);
    Wi.assign(padded, 0);
    live.assign(padded, 0);
    base.assign(padded, 0);
    for (int64_t l = 0; l < s.L; ++l) {
      const Level lv = read_level(shapes, starts, l, s.S);
      const int64_t H = lv.H, W = lv.W;
      for (int64_t p = l * s.P; p < (l + 1) * s.P; ++p) {
        Hf[p] = static_cast<float>(H);
        Wf[p] = static_cast<float>(W);
        Hi[p] = static_cast<int32_t>(H);
        Wi[p] = static_cast<int32_t>(W);
        live[p] = (H > 0 && W > 0) ? -1 : 0;
        base[p] = lv.start * row_stride;
      }
    }
  }
  // Corner offsets are computed in int32: every level must have h * W + w + W + 1 < 2^31.
  static bool fits(const Sizes& s, const int64_t* shapes, const int64_t* starts) {
    if (s.point_start != nullptr || s.discrete) return false;
    for (int64_t l = 0; l < s.L; ++l) {
      const Level lv = read_level(shapes, starts, l, s.S);
      if ((lv.H + 1) * (lv.W + 1) >= (int64_t{1} << 31)) return false;
    }
    return true;
  }
  std::vector<float> Hf, Wf;
  std::vector<int32_t> Hi, Wi, live;
  std::vector<int64_t> base;
};

// Loads by overload, not template: a template instantiated at the end of the translation unit falls outside the
// -Wpsabi silencing of ms_deform_attn_cpu_kernels_impl.h in the baseline copy.
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline i32x8 load8(const int32_t* p) {
  i32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline bool any_lane(const i32x8& m) {
  int32_t r = 0;
  for (int i = 0; i < kBatch; ++i) r |= m[i];
  return r != 0;
}

// Floor of a vector whose lanes lie in (-1, 2^31): truncate, then step down where truncation rounded up.
inline void floor8(const f32x8& v, f32x8& fl, i32x8& fi) {
  const i32x8 t = __builtin_convertvector(v, i32x8);
  const f32x8 tf = __builtin_convertvector(t, f32x8);
  fi = t + (tf > v);  // a true comparison is -1
  fl = __builtin_convertvector(fi, f32x8);
}

// The corners of samples [p0, p0 + n) of one row (n <= kBatch; lanes past n are padding without corners).
struct SampleBatch {
  f32x8 x, y, a;                       // location and attention weight
  f32x8 lh, lw;                        // fractional parts (0 without a corner)
  f32x8 w[4];                          // bilinear weight of each corner (0 when invalid)
  i32x8 any;                           // -1 where at least one corner is inside the map
  i32x8 nan_loc;                       // -1 where x or y is NaN (the non-finite rule; such lanes never have a corner)
  alignas(32) float coeff[4][kBatch];  // a * w[k]
  alignas(32) int32_t offset[4][kBatch];  // spatial index h * W + w of each valid corner, else 0
  alignas(32) int32_t valid[kBatch];      // bit k set where corner k is inside the map; 0 without a corner

  void compute(const float* loc, const float* att, int n, const PointTable& t, int64_t p0) {
    f32x8 lo, hi;
    if (n == kBatch) {
      lo = load8(loc);
      hi = load8(loc + kBatch);
      a = load8(att);
    } else {
      alignas(32) float xy[2 * kBatch] = {}, aa[kBatch] = {};
      std::memcpy(xy, loc, sizeof(float) * 2 * n);
      std::memcpy(aa, att, sizeof(float) * n);
      lo = load8(xy);
      hi = load8(xy + kBatch);
      a = load8(aa);
    }
    x = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
    y = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
    nan_loc = (x != x) | (y != y);
    const f32x8 H = load8(t.Hf.data() + p0), W = load8(t.Wf.data() + p0);
    const i32x8 Hi = load8(t.Hi.data() + p0), Wi = load8(t.Wi.data() + p0);
    const f32x8 w_im = x * W - 0.5f;
    const f32x8 h_im = y * H - 0.5f;
    any = load8(t.live.data() + p0) & (h_im > -1.f) & (w_im > -1.f) & (h_im < H) & (w_im < W);
    const f32x8 zero = {};
    f32x8 h_floor, w_floor;
    i32x8 h0, w0;
    const f32x8 hs = any ? h_im : zero, ws = any ? w_im : zero;
    floor8(hs, h_floor, h0);
    floor8(ws, w_floor, w0);
    lh = hs - h_floor;
    lw = ws - w_floor;
    const f32x8 hh = 1.f - lh, hw = 1.f - lw;
    const i32x8 h0_ok = h0 >= 0, h1_ok = h0 + 1 <= Hi - 1, w0_ok = w0 >= 0, w1_ok = w0 + 1 <= Wi - 1;
    const i32x8 v[4] = {any & h0_ok & w0_ok, any & h0_ok & w1_ok, any & h1_ok & w0_ok, any & h1_ok & w1_ok};
    const f32x8 raw[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
    const i32x8 off0 = h0 * Wi + w0;
    const i32x8 off[4] = {off0, off0 + 1, off0 + Wi, off0 + Wi + 1};
    i32x8 bits = {};
    for (int k = 0; k < 4; ++k) {
      w[k] = v[k] ? raw[k] : zero;
      const f32x8 c = a * w[k];
      std::memcpy(coeff[k], &c, sizeof(c));
      const i32x8 o = v[k] ? off[k] : i32x8{};
      std::memcpy(offset[k], &o, sizeof(o));
      bits |= v[k] & (1 << k);
    }
    std::memcpy(valid, &bits, sizeof(bits));
  }
};

// The backward's per-sample outputs from the four dot products <grad_out, corner value> of each lane:
// grad_locations (interleaved x, y) and grad_weights for samples [p0, p0 + n) of a row.
inline void store_sample_grads(const SampleBatch& b, const float dots[4][kBatch], const PointTable& t, int64_t p0,
                               int n, float* grad_loc, float* grad_w) {
  const f32x8 d0 = load8(dots[0]), d1 = load8(dots[1]);
  const f32x8 d2 = load8(dots[2]), d3 = load8(dots[3]);
  const f32x8 hh = 1.f - b.lh, hw = 1.f - b.lw;
  const f32x8 zero = {};
  // accumulate_position_grad() into zero-initialised sums, then position_grad_to_location().
  const f32x8 grad_w_im = zero + b.a * (hh * (d1 - d0) + b.lh * (d3 - d2));
  const f32x8 grad_h_im = zero + b.a * (hw * (d2 - d0) + b.lw * (d3 - d1));
  const f32x8 gx_in = grad_w_im * load8(t.Wf.data() + p0);
  const f32x8 gy_in = grad_h_im * load8(t.Hf.data() + p0);
  const f32x8 gw_in = b.w[0] * d0 + b.w[1] * d1 + b.w[2] * d2 + b.w[3] * d3;  // interpolate()
  // No corner: NaN location -> NaN gradients; otherwise a * 0 for the location and 0 for the weight.
  const i32x8& nan_loc = b.nan_loc;
  const f32x8 nan = zero + NAN;
  const f32x8 g_out = nan_loc ? nan : b.a * zero;
  const f32x8 gx = b.any ? gx_in : g_out, gy = b.any ? gy_in : g_out;
  const f32x8 gw = b.any ? gw_in : (nan_loc ? nan : zero);
  const f32x8 lo = __builtin_shufflevector(gx, gy, 0, 8, 1, 9, 2, 10, 3, 11);
  const f32x8 hi = __builtin_shufflevector(gx, gy, 4, 12, 5, 13, 6, 14, 7, 15);
  if (n == kBatch) {
    std::memcpy(grad_loc, &lo, sizeof(lo));
    std::memcpy(grad_loc + kBatch, &hi, sizeof(hi));
    std::memcpy(grad_w, &gw, sizeof(gw));
  } else {
    alignas(32) float xy[2 * kBatch], ww[kBatch];
    std::memcpy(xy, &lo, sizeof(lo));
    std::memcpy(xy + kBatch, &hi, sizeof(hi));
    std::memcpy(ww, &gw, sizeof(gw));
    std::memcpy(grad_loc, xy, sizeof(float) * 2 * n);
    std::memcpy(grad_w, ww, sizeof(float) * n);
  }
}

}  // namespace
}  // namespace DDETR_CPU_ISA
}  // namespace msda
}  // namespace deformable_detr

#endif
