// CPU kernel of colorquant::kmeans_palette: batched k-means per image over its
// H*W pixels (points in R^C), k-means++ seeding then Lloyd iterations.
//
// All images advance together, step by step; each step runs its (image,
// chunk of kKMeansChunk pixels) tasks in parallel. Every sum is taken per
// chunk in pixel order and the chunk results are added in chunk order
// (common/palette_math.h), exactly as the CUDA kernel does, so the result
// depends on the seed only: not on the number of threads, nor on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/palette_math.h"
#include "cpu/tiling.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

// Runs f(task, b, p0, p1) for every (image b, chunk [p0, p1)) in parallel.
template <typename F>
void parallel_for_kmeans_chunks(int64_t batch, int64_t num_pixels, int64_t grain, const F& f) {
  const int64_t nc = kmeans_num_chunks(num_pixels);
  at::parallel_for(0, batch * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc;
      const int64_t p0 = (task % nc) * kKMeansChunk;
      f(task, b, p0, std::min(num_pixels, p0 + kKMeansChunk));
    }
  });
}

// Pixels per block of nearest_colours: its scratch row stays in L1.
constexpr int64_t kAssignBlock = 128;

// One colour k of nearest_colours' search, at distance d, for one pixel.
template <bool kSecond, typename acc_t>
CQ_ALWAYS_INLINE void search_step(acc_t d, int32_t k, acc_t& best, int32_t& best_k, acc_t& second) {
  const bool closer = d < best;  // strict: a tie or a NaN keeps the earlier colour
  if constexpr (kSecond) {
    const acc_t other = closer ? best : d;
    second = other < second ? other : second;
  }
  best = closer ? d : best;
  best_k = closer ? k : best_k;
}

// For the pixels x[i + c * x_stride] (i < num_pixels, c < C), in blocks of
// kAssignBlock, and the palette [K, C]: best_k[i] = nearest_colour(pixel i) -- the same arithmetic and
// tie rule, with the colour loop outside and the pixel loop inside, so that the
// pixels go through the vector lanes -- and, if kSecond, second[i] = the
// smallest squared distance to any other colour (+inf if K == 1; NaN
// distances are ignored).
// Colours go kColoursPerStep at a time, so that a lane's state is loaded and
// stored once per step.
constexpr int kColoursPerStep = 4;

template <int kC, bool kSecond, typename x_t, typename acc_t>
CQ_SIMD_CLONES void nearest_colours(const x_t* x, int64_t x_stride, const acc_t* palette, int64_t K,
                                    int64_t C, int64_t num_pixels, int32_t* best_k_out,
                                    acc_t* second_out) {
  const int64_t stride = kC > 0 ? kC : C;
  acc_t best[kAssignBlock], unused[kSecond ? 1 : kAssignBlock];
  for (int64_t i0 = 0; i0 < num_pixels; i0 += kAssignBlock) {
    const int64_t n = std::min(kAssignBlock, num_pixels - i0);
    const x_t* xb = x + i0;
    int32_t* best_k = best_k_out + i0;
    acc_t* second = kSecond ? second_out + i0 : unused;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      best[i] = squared_distance<kC, acc_t>(xb + i, x_stride, palette, C);
      best_k[i] = 0;
      second[i] = std::numeric_limits<acc_t>::infinity();
    }
    int64_t k = 1;
    for (; k + kColoursPerStep <= K; k += kColoursPerStep) {
      const acc_t* pk = palette + k * stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        acc_t b = best[i], s = second[i];
        int32_t bk = best_k[i];
        for (int j = 0; j < kColoursPerStep; ++j) {
          search_step<kSecond>(squared_distance<kC, acc_t>(xb + i, x_stride, pk + j * stride, C),
                               static_cast<int32_t>(k + j), b, bk, s);
        }
        best[i] = b;
        second[i] = s;
        best_k[i] = bk;
      }
    }
    for (; k < K; ++k) {
      const acc_t* pk = palette + k * stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        search_step<kSecond>(squared_distance<kC, acc_t>(xb + i, x_stride, pk, C),
                             static_cast<int32_t>(k), best[i], best_k[i], second[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Pruned assignment (Hamerly's bounds, made exact). Each pixel keeps lb, a
// lower bound on its true distance (not squared) to every colour but its own.
// After the colours move by drift[k], lb - max_{k != own} drift[k] is still
// one (triangle inequality). If the pixel's own squared distance u, as the
// full search computes it, is below lb^2 by a margin far wider than the
// rounding error of a computed squared distance (a few 1e-7 relative in
// float), every other colour's computed distance exceeds u, so the full
// search would return the pixel's colour again: it is kept without searching.
// The index map is therefore exactly that of a full search, on every device.
// Hamerly's second bound needs no history: half the distance from the
// pixel's colour to the nearest other colour (if the pixel is nearer than
// that to its colour, no other colour can be nearer). Bounds that are not
// finite (inf / NaN values, overflow) never prune, nor do tiny ones (below
// 1e-15, where rounding errors stop being relative).
// ---------------------------------------------------------------------------

// lb from the computed squared distance to the second-nearest colour: the
// true one is at least second * (1 - 1e-6) (float: 5 roundings of 2^-24).
template <typename acc_t>
double lower_bound_of(acc_t second) {
  const double s = static_cast<double>(second);
  return std::isfinite(s) ? std::sqrt(s * (1.0 - 2e-6)) : 0.0;
}

// lb - drift, rounded down: the subtraction's rounding error is at most
// 1.2e-16 * lb where the result matters (drift < lb).
CQ_ALWAYS_INLINE double lower_bound_after(double lb, double drift) { return (lb - drift) - 4e-16 * lb; }

template <typename acc_t>
CQ_ALWAYS_INLINE bool keeps_colour(acc_t u, double lb) {
  return (lb > 1e-15) & (static_cast<double>(u) < lb * lb * (1.0 - 1e-5));  // & vectorizes, && branches
}

// The largest and second-largest drift of an image's colours (NaN counts as
// +inf), so that each pixel subtracts the largest over the other colours:
// second if its colour is arg, else first.
struct DriftMax {
  double first = 0.0, second = 0.0;
  int64_t arg = -1;
  DriftMax() = default;
  DriftMax(const double* drift, int64_t K) {
    for (int64_t k = 0; k < K; ++k) {
      const double d = std::isnan(drift[k]) ? std::numeric_limits<double>::infinity() : drift[k];
      if (d > first) {
        second = first;
        first = d;
        arg = k;
      } else if (d > second) {
        second = d;
      }
    }
  }
};

// How far a colour moves, added up coordinate by coordinate in double; an
// upper bound on the true distance.
struct Movement {
  double squared = 0.0;
  template <typename acc_t>
  acc_t add(acc_t before, acc_t after) {
    const double d = static_cast<double>(after) - static_cast<double>(before);
    squared += d * d;
    return after;
  }
  double distance_up() const { return std::sqrt(squared) * (1.0 + 1e-9); }
};

// half_gap[k] = a lower bound on half the true distance from colour k of cb
// [K, C] to the nearest other colour (0 if a colour is not finite).
template <int kC, typename acc_t>
CQ_SIMD_CLONES void half_gaps(const acc_t* cb, int64_t K, int64_t C, double* half_gap) {
  const int64_t n = kC > 0 ? kC : C;
  bool finite = true;
  for (int64_t i = 0; i < K * n; ++i) finite = finite && std::isfinite(static_cast<double>(cb[i]));
  for (int64_t k = 0; k < K; ++k) {
    acc_t nearest = std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(min : nearest)
    for (int64_t j = 0; j < K; ++j) {
      const acc_t s = squared_distance<kC, acc_t>(cb + j * n, 1, cb + k * n, C);
      nearest = (j != k) & (s < nearest) ? s : nearest;
    }
    half_gap[k] = finite ? 0.5 * lower_bound_of(nearest) : 0.0;
  }
}

// keep[p - p0] = whether pixel p of [p0, p1) provably keeps its colour idx[p]:
// by its bound lb[p], lowered here by the largest drift of the other colours
// (DriftMax's fields, passed apart so that the loop vectorizes), or by the
// half gap of its colour.
template <int kC, typename scalar_t, typename acc_t>
CQ_SIMD_CLONES void check_bounds(const scalar_t* __restrict__ x, int64_t P,
                                 const acc_t* __restrict__ cb, int64_t C, int64_t p0, int64_t p1,
                                 double first, double second, int64_t arg,
                                 const double* __restrict__ half_gap,
                                 const int64_t* __restrict__ idx, double* __restrict__ lb,
                                 uint8_t* __restrict__ keep) {
  const int64_t stride = kC > 0 ? kC : C;
#pragma omp simd
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t a = idx[p];
    const double bound = lower_bound_after(lb[p], a == arg ? second : first);
    lb[p] = bound;
    const double gap = half_gap[a];
    keep[p - p0] = keeps_colour(squared_distance<kC, acc_t>(x + p, P, cb + a * stride, C),
                                gap > bound ? gap : bound);
  }
}

// idx[i] = k[i] for i < n; returns how many changed.
CQ_SIMD_CLONES int64_t store_colours(const int32_t* __restrict__ k, int64_t n,
                                     int64_t* __restrict__ idx) {
  int64_t changed = 0;
#pragma omp simd reduction(+ : changed)
  for (int64_t i = 0; i < n; ++i) {
    changed += idx[i] != k[i];
    idx[i] = k[i];
  }
  return changed;
}

// Below this many colours a full search costs about as little as the checks.
constexpr int64_t kMinPruneColours = 16;

// Assigns pixels [p0, p1) of one image (x: its [C, P] pixels; idx, lb: its
// index map and bounds) to their nearest colour of cb [K, C]. With bounds
// (idx and lb hold the previous assignment, drift how far the colours moved
// since, half_gap the image's half_gaps), pixels that provably keep their
// colour are not searched. The result says whether any pixel changed colour
// (if idx held an assignment: again). lb may be null when no bounds are kept
// (then drift is null).
template <int kC, typename scalar_t, typename acc_t>
bool assign_pixels(const scalar_t* x, int64_t P, const acc_t* cb, int64_t K, int64_t C,
                   int64_t p0, int64_t p1, bool again, const DriftMax* drift,
                   const double* half_gap, int64_t* idx, double* lb) {
  const int64_t stride = kC > 0 ? kC : C;
  int32_t best_k[kKMeansChunk];  // p1 - p0 <= kKMeansChunk
  acc_t second[kKMeansChunk];
  const int64_t n = p1 - p0;
  if (drift == nullptr) {  // every pixel, read in place
    if (lb != nullptr) {
      nearest_colours<kC, true>(x + p0, P, cb, K, C, n, best_k, second);
      for (int64_t i = 0; i < n; ++i) lb[p0 + i] = lower_bound_of(second[i]);
    } else {
      nearest_colours<kC, false>(x + p0, P, cb, K, C, n, best_k, second);
    }
    return store_colours(best_k, n, idx + p0) > 0 && again;
  }
  int32_t todo[kKMeansChunk];  // pixels to search (p1 - p0 <= kKMeansChunk)
  int64_t num_todo = 0;
  {
    uint8_t keep[kKMeansChunk];
    check_bounds<kC>(x, P, cb, C, p0, p1, drift->first, drift->second, drift->arg, half_gap, idx,
                     lb, keep);
    for (int64_t p = p0; p < p1; ++p) {
      todo[num_todo] = static_cast<int32_t>(p);  // kept or not: no branch to mispredict
      num_todo += keep[p - p0] ? 0 : 1;
    }
  }
  if (num_todo == 0) return false;
  std::vector<acc_t> xb(num_todo * stride);  // the pixels to search, gathered
  for (int64_t c = 0; c < stride; ++c) {
    for (int64_t i = 0; i < num_todo; ++i) xb[c * num_todo + i] = static_cast<acc_t>(x[c * P + todo[i]]);
  }
  nearest_colours<kC, true>(xb.data(), num_todo, cb, K, C, num_todo, best_k, second);
  bool changed = false;
  for (int64_t i = 0; i < num_todo; ++i) {
    changed = changed || idx[todo[i]] != best_k[i];
    idx[todo[i]] = best_k[i];
    lb[todo[i]] = lower_bound_of(second[i]);
  }
  return changed;
}

// sums[k, c] += x[c, p] and counts[k] += 1 for the pixels p of [p0, p1), of
// colour k = idx[p], in pixel order (the order fixes the result). Adding up
// runs of one colour in registers instead was slower at K = 8 (the branch at
// each run's end) and faster only at K = 2.
template <int kC, typename scalar_t, typename acc_t>
void cluster_sums(const scalar_t* x, int64_t P, int64_t C, const int64_t* idx, int64_t p0,
                  int64_t p1, acc_t* sums, int64_t* counts) {
  const int64_t n = kC > 0 ? kC : C;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = idx[p];
    ++counts[k];
    for (int64_t c = 0; c < n; ++c) sums[k * n + c] = add_rn(sums[k * n + c], static_cast<acc_t>(x[c * P + p]));
  }
}

// ---------------------------------------------------------------------------
// k-means++ seeding
// ---------------------------------------------------------------------------

// d[i] = kmeanspp_d2(first, d[i], distance of pixel i to centre) for the n
// pixels x[i + c * P]: the k-means++ D^2 update, the pixel loop vectorized.
template <int kC, typename scalar_t, typename acc_t>
CQ_SIMD_CLONES void update_d2(const scalar_t* x, int64_t P, const acc_t* centre, int64_t C,
                              int64_t n, bool first, double* d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    d[i] = kmeanspp_d2(first, d[i], squared_distance<kC, acc_t>(x + i, P, centre, C));
  }
}

// Images whose running sums are added side by side: each image's sum is a
// chain of dependent additions in pixel order (which fixes the result), so
// one image at a time waits on the adder's latency.
constexpr int64_t kSeedGroup = 8;

// The running sum of d2 is kept at every kCheckpoint-th pixel of a chunk (the
// draw finds the block by bisection, then adds up at most kCheckpoint values):
// storing it at every pixel would cost more than adding.
constexpr int64_t kCheckpoint = 32;
constexpr int64_t kCheckpointsPerChunk = kKMeansChunk / kCheckpoint;

// For G images with n values d[g][i] each (a chunk): checkpoint[g][q] = the
// sum of d[g][i] over i < min((q + 1) * kCheckpoint, n), added in order from
// i = 0; the last one is the chunk's total.
template <int G>
void running_sums(const double* const* d, double* const* checkpoint, int64_t n) {
  double s[G];
  for (int g = 0; g < G; ++g) s[g] = 0.0;
  for (int64_t i0 = 0, q = 0; i0 < n; i0 += kCheckpoint, ++q) {
    const int64_t i1 = std::min(n, i0 + kCheckpoint);
    for (int64_t i = i0; i < i1; ++i) {
      for (int g = 0; g < G; ++g) s[g] = add_rn(s[g], d[g][i]);
    }
    for (int g = 0; g < G; ++g) checkpoint[g][q] = s[g];
  }
}

// kmeanspp_draw's search within a chunk: bisection over the checkpoints, then
// the running sum from the last checkpoint below the target.
struct SearchChunk {
  const double* d2;          // the image's D^2
  const double* checkpoint;  // the image's checkpoints, kCheckpointsPerChunk per chunk
  int64_t operator()(int64_t p0, int64_t p1, double offset, double target) const {
    const double* cp = checkpoint + p0 / kKMeansChunk * kCheckpointsPerChunk;
    int64_t lo = 0, hi = (p1 - p0 - 1) / kCheckpoint;  // the first block whose end is above
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (add_rn(offset, cp[mid]) > target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t begin = p0 + lo * kCheckpoint;
    return ScanChunk{d2}(begin, std::min(p1, begin + kCheckpoint), offset,
                         target, lo == 0 ? 0.0 : cp[lo - 1]);
  }
};

// Centre j of each image b (centres[b, j]) is the pixel of draw j.
template <int kC, typename scalar_t, typename acc_t>
void kmeanspp_seed(const scalar_t* img, int64_t B, int64_t C, int64_t P, int64_t K, int64_t seed,
                   acc_t* centres) {
  const int64_t nc = kmeans_num_chunks(P);
  std::vector<double> d2(B * P), checkpoints(B * nc * kCheckpointsPerChunk), chunk_sums(B * nc);
  auto draw = [&](int64_t b, int64_t j) {
    const double u = kmeans_uniform(seed, j);
    const int64_t p = j == 0 ? uniform_pixel(u, P)
                             : kmeanspp_draw(d2.data() + b * P, chunk_sums.data() + b * nc, P,
                                             u, SearchChunk{d2.data() + b * P,
                                                            checkpoints.data() + b * nc * kCheckpointsPerChunk});
    for (int64_t c = 0; c < C; ++c) {
      centres[(b * K + j) * C + c] = static_cast<acc_t>(img[(b * C + c) * P + p]);
    }
  };
  // D^2 after centre j - 1, its checkpoints and its total over chunk t of
  // images [b0, b1).
  auto update_chunk = [&](int64_t b0, int64_t b1, int64_t t, int64_t j) {
    const int64_t p0 = t * kKMeansChunk, n = std::min(kKMeansChunk, P - p0);
    for (int64_t b = b0; b < b1; ++b) {
      update_d2<kC>(img + b * C * P + p0, P, centres + (b * K + j - 1) * C, C, n, j == 1,
                    d2.data() + b * P + p0);
    }
    for (int64_t b = b0; b < b1;) {
      const double* d[kSeedGroup];
      double* cp[kSeedGroup];
      const int64_t g = b1 - b >= kSeedGroup ? kSeedGroup : 1;
      for (int64_t i = 0; i < g; ++i) {
        d[i] = d2.data() + (b + i) * P + p0;
        cp[i] = checkpoints.data() + ((b + i) * nc + t) * kCheckpointsPerChunk;
      }
      if (g == kSeedGroup) {
        running_sums<kSeedGroup>(d, cp, n);
      } else {
        running_sums<1>(d, cp, n);
      }
      for (int64_t i = 0; i < g; ++i) chunk_sums[(b + i) * nc + t] = cp[i][(n - 1) / kCheckpoint];
      b += g;
    }
  };
  const int64_t num_groups = (B + kSeedGroup - 1) / kSeedGroup;
  if (num_groups >= 2 * at::get_num_threads()) {
    // Enough groups of images to keep every thread busy: each group runs
    // the whole seeding, with no synchronization between the K steps.
    at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t grp = begin; grp < end; ++grp) {
        const int64_t b0 = grp * kSeedGroup, b1 = std::min(B, b0 + kSeedGroup);
        for (int64_t b = b0; b < b1; ++b) draw(b, 0);
        for (int64_t j = 1; j < K; ++j) {
          for (int64_t t = 0; t < nc; ++t) update_chunk(b0, b1, t, j);
          for (int64_t b = b0; b < b1; ++b) draw(b, j);
        }
      }
    });
  } else {
    // Few images: step by step, the (image, chunk) tasks of each step in parallel.
    for (int64_t b = 0; b < B; ++b) draw(b, 0);
    for (int64_t j = 1; j < K; ++j) {
      parallel_for_kmeans_chunks(B, P, 1, [&](int64_t, int64_t b, int64_t p0, int64_t) {
        update_chunk(b, b + 1, p0 / kKMeansChunk, j);
      });
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) draw(b, j);
      });
    }
  }
}

// ---------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------

template <int kC, typename scalar_t>
void kmeans_forward(const Tensor& image, int64_t K, int64_t iters, int64_t seed,
                    Tensor& index_map, Tensor& palette) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t P = image.size(2) * image.size(3);
  const int64_t nc = kmeans_num_chunks(P);
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  int64_t* idx = index_map.mutable_data_ptr<int64_t>();
  std::vector<acc_t> centres(B * K * C);
  kmeanspp_seed<kC>(img, B, C, P, K, seed, centres.data());

  // Assignment of every pixel against `centres`: the first in full, later
  // ones pruned by the bounds, drift[b, k] being how far colour k of image b
  // moved since the last assignment (reset here). on_chunk(task, b, p0, p1,
  // changed) runs after each chunk's assignment; images with skip(b) are left
  // alone.
  const bool prune = K >= kMinPruneColours;
  std::vector<double> lb(prune ? B * P : 0), drift(B * K, 0.0), half_gap(prune ? B * K : 0);
  std::vector<DriftMax> moved(prune ? B : 0);
  bool have_bounds = false;
  auto assign = [&](const auto& skip, const auto& on_chunk) {
    const bool use_bounds = have_bounds && prune;
    if (use_bounds) {  // once per image, for all of its chunks
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (skip(b)) continue;
          moved[b] = DriftMax(drift.data() + b * K, K);
          half_gaps<kC>(centres.data() + b * K * C, K, C, half_gap.data() + b * K);
        }
      });
    }
    parallel_for_kmeans_chunks(B, P, 1, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
      if (skip(b)) return;
      const bool changed = assign_pixels<kC>(
          img + b * C * P, P, centres.data() + b * K * C, K, C, p0, p1, have_bounds,
          use_bounds ? &moved[b] : nullptr, use_bounds ? half_gap.data() + b * K : nullptr,
          idx + b * P, prune ? lb.data() + b * P : nullptr);
      on_chunk(task, b, p0, p1, changed);
    });
    std::fill(drift.begin(), drift.end(), 0.0);
    have_bounds = true;
  };

  // --- Lloyd iterations. changed[it * B + b]: assignment `it` of image b
  // differs from assignment it - 1. Once an assignment repeats, the centres
  // and all later assignments repeat too, so the image is skipped (the same
  // result as running the iteration).
  std::vector<acc_t> partial(B * nc * K * C);
  std::vector<int64_t> counts(B * nc * K);
  std::vector<char> task_changed(B * nc), changed(B * std::max<int64_t>(iters, 1), 0);
  for (int64_t it = 0; it < iters; ++it) {
    // Assignment (ties to the lowest k) and per-chunk cluster sums.
    std::fill(task_changed.begin(), task_changed.end(), 0);
    assign([&](int64_t b) { return it >= 2 && !changed[(it - 1) * B + b]; },
           [&](int64_t task, int64_t b, int64_t p0, int64_t p1, bool changed) {
             const scalar_t* x = img + b * C * P;
             acc_t* sums = partial.data() + task * K * C;
             int64_t* cnt = counts.data() + task * K;
             std::fill(sums, sums + K * C, acc_t(0));
             std::fill(cnt, cnt + K, int64_t{0});
             cluster_sums<kC>(x, P, C, idx + b * P, p0, p1, sums, cnt);
             task_changed[task] = changed;
           });
    for (int64_t b = 0; b < B; ++b) {
      char any = 0;
      for (int64_t t = 0; t < nc; ++t) any |= task_changed[b * nc + t];
      changed[it * B + b] = any;
    }
    // Update: chunk sums added in chunk order; an empty cluster keeps its centre.
    at::parallel_for(0, B * K, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) {
        const int64_t b = bk / K, k = bk % K;
        if (it >= 1 && !changed[it * B + b]) continue;
        int64_t count = 0;
        for (int64_t t = 0; t < nc; ++t) count += counts[(b * nc + t) * K + k];
        acc_t* centre = centres.data() + bk * C;
        Movement move;
        for (int64_t c = 0; c < C; ++c) {
          acc_t sum = acc_t(0);
          for (int64_t t = 0; t < nc; ++t) sum = add_rn(sum, partial[((b * nc + t) * K + k) * C + c]);
          centre[c] = move.add(centre[c], kmeans_centre(sum, count, centre[c]));
        }
        drift[bk] += move.distance_up();
      }
    });
  }

  // --- The palette as returned (rounded to scalar_t), and the final assignment
  // against exactly those colours.
  scalar_t* pal = palette.mutable_data_ptr<scalar_t>();
  for (int64_t bk = 0; bk < B * K; ++bk) {
    acc_t* centre = centres.data() + bk * C;
    Movement move;
    for (int64_t c = 0; c < C; ++c) {
      pal[bk * C + c] = static_cast<scalar_t>(centre[c]);
      centre[c] = move.add(centre[c], static_cast<acc_t>(pal[bk * C + c]));
    }
    drift[bk] += move.distance_up();
  }
  assign([](int64_t) { return false; }, [](int64_t, int64_t, int64_t, int64_t, bool) {});
}

std::tuple<Tensor, Tensor> kmeans_palette_cpu(const Tensor& image_in, int64_t num_colors,
                                              int64_t iters, int64_t seed) {
  check_kmeans_args(image_in, num_colors, iters);
  const Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  Tensor index_map = at::empty({B, H, W}, image.options().dtype(at::kLong));
  Tensor palette = at::empty({B, num_colors, C}, image.options());
  if (B == 0) return {index_map, palette};
  if (H * W == 0) {  // no pixels: nothing to cluster, the palette is zeros
    palette.zero_();
    return {index_map, palette};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "kmeans_palette_cpu", [&] {
                                    dispatch_channels(C, [&](auto kC) {
                                      kmeans_forward<decltype(kC)::value, scalar_t>(
                                          image, num_colors, iters, seed, index_map, palette);
                                    });
                                  });
  return {index_map, palette};
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) { m.impl("kmeans_palette", &kmeans_palette_cpu); }

}  // namespace cpu
}  // namespace colorquant
