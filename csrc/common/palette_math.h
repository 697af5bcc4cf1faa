// Per-pixel arithmetic of the palette ops (kmeans_palette,
// floyd_steinberg_dither, palette_distance), shared by the CPU and CUDA kernels in the style of
// color_math.h: every formula lives here exactly once, so the CPU tests cover
// the arithmetic that the CUDA kernels run; the kernels only add loop
// structure (chunks, wavefronts, indexing).
//
// Bit-identical CPU and CUDA results (every non-NaN value; a NaN stays NaN on
// both devices, but its bits are not covered: float -> bfloat16 gives the
// quiet NaN 0x7FC0 on the host, __float2bfloat16 gives 0x7FFF): the products and sums below go through
// add_rn / sub_rn / mul_rn / div_rn, which on the device are the IEEE
// round-to-nearest intrinsics that nvcc never contracts into an FMA. On the
// host they are plain operators: gcc contracts a*b+c only when the target has
// FMA instructions, which the default x86-64 build does not (a build with
// -march=native or for aarch64 should add -ffp-contract=off to keep CPU and
// CUDA results identical).
#pragma once

#include <cstdint>
#include <optional>

#include "common/color_math.h"

namespace colorquant {

// ---------------------------------------------------------------------------
// Rounded arithmetic that is never fused.
// ---------------------------------------------------------------------------

CQ_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CQ_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
CQ_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
CQ_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
CQ_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CQ_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
CQ_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
CQ_HD double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---------------------------------------------------------------------------
// Nearest palette colour.
// ---------------------------------------------------------------------------

// sum_c (a[c * a_stride] - b[c])^2 in acc_t, channels added in order from 0.
// kC > 0: the channel count as a compile-time constant (C is then ignored),
// so that per-thread arrays of the CUDA kernels stay in registers. The sum
// starts from the first square rather than from 0 + it: the same value (a
// square is never -0), one addition fewer (a compiler may not drop 0 + x).
template <int kC, typename acc_t, typename a_t, typename b_t>
CQ_HD acc_t squared_distance(const a_t* a, int64_t a_stride, const b_t* b, int64_t C) {
  const int64_t n = kC > 0 ? kC : C;
  acc_t s = acc_t(0);
  for (int64_t c = 0; c < n; ++c) {
    const acc_t d = sub_rn(static_cast<acc_t>(a[c * a_stride]), static_cast<acc_t>(b[c]));
    s = c == 0 ? mul_rn(d, d) : add_rn(s, mul_rn(d, d));
  }
  return s;
}

// argmin_k squared_distance(x, palette[k]) over palette [K, C]; a tie goes to
// the lowest k (strict <, like numpy/torch argmin), and a NaN distance never
// wins against an earlier colour.
template <int kC, typename acc_t, typename x_t>
CQ_HD int64_t nearest_colour(const x_t* x, int64_t x_stride, const acc_t* palette, int64_t K,
                             int64_t C) {
  const int64_t n = kC > 0 ? kC : C;
  acc_t best = squared_distance<kC, acc_t>(x, x_stride, palette, n);
  int64_t best_k = 0;
  for (int64_t k = 1; k < K; ++k) {
    const acc_t d = squared_distance<kC, acc_t>(x, x_stride, palette + k * n, n);
    if (d < best) {
      best = d;
      best_k = k;
    }
  }
  return best_k;
}

// nearest_colour as a function object: floyd_steinberg_pixel's default search.
template <int kC, typename acc_t>
struct NearestColour {
  CQ_HD int64_t operator()(const acc_t* x, const acc_t* palette, int64_t K, int64_t C) const {
    return nearest_colour<kC, acc_t>(x, 1, palette, K, C);
  }
};

// ---------------------------------------------------------------------------
// Distance to the palette (palette_distance and its backward).
//
//   out[k,p]          =  squared_distance(x[:,p], palette[k])
//   grad_image[c,p]   =  2 sum_k grad[k,p] (x[c,p] - palette[k,c])
//   grad_palette[k,c] = -2 sum_p grad[k,p] (x[c,p] - palette[k,c])
//
// Both gradients sum the same term, distance_grad_term; the kernels add the
// terms (from 0, colours in ascending order for grad_image; per pixel chunk /
// tile for grad_palette) and scale each sum by 2 or -2 once. Scaling by a
// power of two is exact, so the scaled partial sums of grad_palette add up to
// exactly the scaled total (barring overflow).
// ---------------------------------------------------------------------------

template <typename acc_t>
CQ_HD acc_t distance_grad_term(acc_t grad, acc_t x, acc_t colour) {
  return mul_rn(grad, sub_rn(x, colour));
}

// grad_image from sum_k distance_grad_term.
template <typename acc_t>
CQ_HD acc_t distance_image_grad(acc_t sum) {
  return mul_rn(acc_t(2), sum);
}

// (A partial sum of) grad_palette from (a partial) sum_p distance_grad_term.
template <typename acc_t>
CQ_HD acc_t distance_palette_grad(acc_t sum) {
  return mul_rn(acc_t(-2), sum);
}

// ---------------------------------------------------------------------------
// Floyd-Steinberg error diffusion.
//
// The state of a pixel is its "partial" value: the pixel plus the errors it
// has received from the row above, added onto the pixel in the order they
// arrive in raster order (down-right 1/16 from x-1, down 5/16 from x, down-left
// 3/16 from x+1), exactly as a raster loop that diffuses into a copy of the
// image does. The right-hand 7/16 of the left neighbour ("carry") is added
// last. The value is clamped only if asked (ValueRange: the authors' code
// clamps to [0, 255]); the error is then taken from the clamped value.
// ---------------------------------------------------------------------------

// The optional clamp of a pixel's value; NaN stays NaN (no comparison holds).
template <typename acc_t>
struct ValueRange {
  bool clamp_low = false, clamp_high = false;
  acc_t low = acc_t(0), high = acc_t(0);
  CQ_HD acc_t operator()(acc_t v) const {
    if (clamp_low && v < low) v = low;
    if (clamp_high && v > high) v = high;
    return v;
  }
};

// The range of floyd_steinberg_dither's optional clamp_min / clamp_max (host code).
template <typename acc_t>
inline ValueRange<acc_t> value_range(std::optional<double> low, std::optional<double> high) {
  ValueRange<acc_t> range;
  range.clamp_low = low.has_value();
  range.clamp_high = high.has_value();
  range.low = static_cast<acc_t>(low.value_or(0.0));
  range.high = static_cast<acc_t>(high.value_or(0.0));
  return range;
}

constexpr double kFsRight = 7.0 / 16.0;      // (x+1, y)
constexpr double kFsDownLeft = 3.0 / 16.0;   // (x-1, y+1)
constexpr double kFsDown = 5.0 / 16.0;       // (x,   y+1)
constexpr double kFsDownRight = 1.0 / 16.0;  // (x+1, y+1)

// One pixel (x, y): value = range(partial (+ carry unless x == 0)), k = the nearest
// colour, error = value - palette[k]; then carry = 7/16 error and the row
// below is updated:
//   below_right = pixel(x+1, y+1) + 1/16 error  (its first term),
//   below       = below + 5/16 error            (x == 0: pixel(x, y+1) + 5/16 error),
//   below_left  = below_left + 3/16 error.
// below, below_left, below_right point at the partial values [C] of the row
// below, null where the target lies outside the image (all three null in the
// last row; below_left null at x == 0, below_right null at x == W-1).
// below_pixel points at channel 0 of pixel (x, y+1) of the image (channel
// stride pixel_stride; pixel (x+1, y+1) is next to it). value is a scratch
// array [C]. The weights are exact binary fractions, so e * (7/16) equals
// e * 7 / 16 of the reference. nearest(value, palette, K, C) must return
// nearest_colour's answer (the CPU kernel passes a vectorized search).
template <int kC, typename acc_t, typename pixel_t, typename Nearest = NearestColour<kC, acc_t>>
CQ_HD int64_t floyd_steinberg_pixel(const acc_t* partial, acc_t* carry, bool first_column,
                                    acc_t* value, const acc_t* palette, int64_t K, int64_t C,
                                    acc_t* below_left, acc_t* below, acc_t* below_right,
                                    const pixel_t* below_pixel, int64_t pixel_stride,
                                    const ValueRange<acc_t>& range,
                                    const Nearest& nearest = Nearest()) {
  const int64_t n = kC > 0 ? kC : C;
  for (int64_t c = 0; c < n; ++c) {
    value[c] = range(first_column ? partial[c] : add_rn(partial[c], carry[c]));
  }
  const int64_t k = nearest(value, palette, K, n);
  const acc_t* colour = palette + k * n;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t e = sub_rn(value[c], colour[c]);
    carry[c] = mul_rn(e, acc_t(kFsRight));
    if (below != nullptr) {
      const acc_t down = mul_rn(e, acc_t(kFsDown));
      below[c] = first_column
                     ? add_rn(static_cast<acc_t>(below_pixel[c * pixel_stride]), down)
                     : add_rn(below[c], down);
      if (below_left != nullptr) {
        below_left[c] = add_rn(below_left[c], mul_rn(e, acc_t(kFsDownLeft)));
      }
      if (below_right != nullptr) {
        below_right[c] = add_rn(static_cast<acc_t>(below_pixel[c * pixel_stride + 1]),
                                mul_rn(e, acc_t(kFsDownRight)));
      }
    }
  }
  return k;
}

// ---------------------------------------------------------------------------
// k-means: counter-based random numbers, k-means++ sampling, centre update.
// ---------------------------------------------------------------------------

// Pixels per chunk of every k-means reduction (the D^2 prefix sums of the
// seeding and the per-cluster sums of the Lloyd updates): each chunk is summed
// in pixel order from 0, the chunks are then added in chunk order, on both
// devices, so results do not depend on the number of threads or the device.
constexpr int64_t kKMeansChunk = 1024;

CQ_HD int64_t kmeans_num_chunks(int64_t num_pixels) {
  return (num_pixels + kKMeansChunk - 1) / kKMeansChunk;
}

// The splitmix64 finalizer: a bijective 64-bit mixing function.
CQ_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1) for draw `step` under `seed`: a hash of the counter
// (seed, step), the same on every device and thread. Not of the image's place in
// its batch: an image is quantized the same alone or batched, at any position.
CQ_HD double kmeans_uniform(int64_t seed, int64_t step) {
  uint64_t h = splitmix64(static_cast<uint64_t>(seed));
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// Pixel drawn uniformly from [0, n) by u in [0, 1).
CQ_HD int64_t uniform_pixel(double u, int64_t n) {
  const int64_t p = static_cast<int64_t>(u * static_cast<double>(n));
  return p < n ? p : n - 1;
}

// sum_{i < n} w[i], added in order from 0.
CQ_HD double ordered_sum(const double* w, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s = add_rn(s, w[i]);
  return s;
}

// D^2 of a pixel after centre j: its distance d to the first centre (j == 0),
// then the smaller of the two.
template <typename acc_t>
CQ_HD double kmeanspp_d2(bool first, double previous, acc_t d) {
  const double dd = static_cast<double>(d);
  return first || dd < previous ? dd : previous;
}

// k-means++ draw: a pixel with probability d2[p] / sum(d2), by inverse CDF.
// The prefix sum is taken in pixel order, in two levels: prefix(p) =
// offset(chunk) + (d2 summed in order over the chunk up to p), where offset is
// the ordered sum of the earlier chunks' totals chunk_sums[] (each the
// ordered_sum of its chunk). prefix is non-decreasing and reaches the total
// at the last pixel; the draw is the first p with prefix(p) > u * total, so a
// pixel with d2 == 0 is never drawn. If the total is not a positive finite
// number (every pixel already is a centre: fewer distinct colours than K, or
// K > the number of pixels; or inf / NaN values), the pixel is drawn
// uniformly instead, which deterministically duplicates a chosen colour.
//
// first_above(p0, p1, offset, target): the first p in the chunk [p0, p1) with
// add_rn(offset, d2 summed in order over [p0, p]) > target (one exists). The
// sums are non-decreasing in p and add_rn is monotone, so a kernel that keeps
// some of the chunk's running sums may search them by bisection (the CPU
// kernel). ScanChunk adds them up as it goes (the CUDA kernel), from `local`,
// the sum of the chunk's values before p0 (0 from the chunk's start).
struct ScanChunk {
  const double* d2;
  CQ_HD int64_t operator()(int64_t p0, int64_t p1, double offset, double target,
                           double local = 0.0) const {
    for (int64_t p = p0; p < p1; ++p) {
      local = add_rn(local, d2[p]);
      if (add_rn(offset, local) > target) return p;
    }
    return p1 - 1;  // not reached when offset + the sum up to p1 > target
  }
};

template <typename FirstAbove>
CQ_HD int64_t kmeanspp_draw(const double* d2, const double* chunk_sums, int64_t P, double u,
                            const FirstAbove& first_above) {
  const int64_t nc = kmeans_num_chunks(P);
  const double total = ordered_sum(chunk_sums, nc);
  if (!(total > 0.0 && total <= 1.7976931348623157e308)) return uniform_pixel(u, P);
  const double target = mul_rn(u, total);
  double offset = 0.0;
  for (int64_t j = 0; j < nc; ++j) {
    const double next = add_rn(offset, chunk_sums[j]);
    if (next > target) {
      const int64_t p0 = j * kKMeansChunk;
      return first_above(p0, p0 + kKMeansChunk < P ? p0 + kKMeansChunk : P, offset, target);
    }
    offset = next;
  }
  // u * total rounded up to total: the last pixel with a positive weight.
  for (int64_t p = P - 1; p > 0; --p) {
    if (d2[p] > 0.0) return p;
  }
  return 0;
}

CQ_HD int64_t kmeanspp_draw(const double* d2, const double* chunk_sums, int64_t P, double u) {
  return kmeanspp_draw(d2, chunk_sums, P, u, ScanChunk{d2});
}

// Lloyd update of one centre coordinate: the mean of its pixels, or the
// previous value if the cluster is empty.
template <typename acc_t>
CQ_HD acc_t kmeans_centre(acc_t sum, int64_t count, acc_t previous) {
  return count > 0 ? div_rn(sum, static_cast<acc_t>(count)) : previous;
}

}  // namespace colorquant
