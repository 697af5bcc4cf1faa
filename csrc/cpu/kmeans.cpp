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

// Pixels per block of nearest_colours: its two scratch rows stay in L1.
constexpr int64_t kAssignBlock = 128;

// out[i] = nearest_colour(pixel i) for the n pixels x[i + c * P] (c < C) of one
// image, palette [K, C]: the same arithmetic and tie rule, with the colour loop
// outside and the pixel loop inside, so that the pixels go through the vector
// lanes (each lane computes one pixel exactly as nearest_colour does).
template <int kC, typename scalar_t, typename acc_t>
CQ_SIMD_CLONES void nearest_colours(const scalar_t* x, int64_t P, const acc_t* palette, int64_t K,
                                    int64_t C, int64_t n, int64_t* out) {
  const int64_t stride = kC > 0 ? kC : C;
  acc_t best[kAssignBlock];
  int32_t best_k[kAssignBlock];  // 32-bit, as wide as the float lanes (K <= 256)
  for (int64_t i0 = 0; i0 < n; i0 += kAssignBlock) {
    const int64_t m = std::min(kAssignBlock, n - i0);
    const scalar_t* xb = x + i0;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      best[i] = squared_distance<kC, acc_t>(xb + i, P, palette, C);
      best_k[i] = 0;
    }
    for (int64_t k = 1; k < K; ++k) {
      const acc_t* pk = palette + k * stride;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        const acc_t d = squared_distance<kC, acc_t>(xb + i, P, pk, C);
        const bool closer = d < best[i];  // strict: a tie or a NaN keeps the earlier colour
        best[i] = closer ? d : best[i];
        best_k[i] = closer ? static_cast<int32_t>(k) : best_k[i];
      }
    }
    std::copy(best_k, best_k + m, out + i0);
  }
}

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

  // --- k-means++ seeding: centre j of image b is the pixel of draw j.
  std::vector<double> d2(B * P), chunk_sums(B * nc);
  auto pick = [&](int64_t j) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const double u = kmeans_uniform(seed, b, j);
        const int64_t p = j == 0 ? uniform_pixel(u, P)
                                 : kmeanspp_draw(d2.data() + b * P, chunk_sums.data() + b * nc, P, u);
        for (int64_t c = 0; c < C; ++c) {
          centres[(b * K + j) * C + c] = static_cast<acc_t>(img[(b * C + c) * P + p]);
        }
      }
    });
  };
  pick(0);
  for (int64_t j = 1; j < K; ++j) {
    parallel_for_kmeans_chunks(B, P, 8, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
      const scalar_t* x = img + b * C * P;
      const acc_t* centre = centres.data() + (b * K + j - 1) * C;
      double* d = d2.data() + b * P;
      update_d2<kC>(x + p0, P, centre, C, p1 - p0, j == 1, d + p0);
      chunk_sums[task] = ordered_sum(d + p0, p1 - p0);
    });
    pick(j);
  }
  d2 = std::vector<double>();

  // --- Lloyd iterations. changed[it * B + b]: assignment `it` of image b
  // differs from assignment it - 1. Once an assignment repeats, the centres
  // and all later assignments repeat too, so the image is skipped (the same
  // result as running the iteration).
  std::vector<acc_t> partial(B * nc * K * C);
  std::vector<int64_t> counts(B * nc * K);
  std::vector<char> task_changed(B * nc), changed(B * std::max<int64_t>(iters, 1), 0);
  for (int64_t it = 0; it < iters; ++it) {
    // Assignment (ties to the lowest k) and per-chunk cluster sums.
    parallel_for_kmeans_chunks(B, P, 1, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
      task_changed[task] = 0;
      if (it >= 2 && !changed[(it - 1) * B + b]) return;
      const scalar_t* x = img + b * C * P;
      const acc_t* cb = centres.data() + b * K * C;
      acc_t* sums = partial.data() + task * K * C;
      int64_t* cnt = counts.data() + task * K;
      std::fill(sums, sums + K * C, acc_t(0));
      std::fill(cnt, cnt + K, int64_t{0});
      int64_t nearest[kKMeansChunk];
      nearest_colours<kC>(x + p0, P, cb, K, C, p1 - p0, nearest);
      bool any = false;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k = nearest[p - p0];
        any = any || (it > 0 && idx[b * P + p] != k);
        idx[b * P + p] = k;
        ++cnt[k];
        for (int64_t c = 0; c < C; ++c) {
          sums[k * C + c] = add_rn(sums[k * C + c], static_cast<acc_t>(x[c * P + p]));
        }
      }
      task_changed[task] = any;
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
        for (int64_t c = 0; c < C; ++c) {
          acc_t sum = acc_t(0);
          for (int64_t t = 0; t < nc; ++t) sum = add_rn(sum, partial[((b * nc + t) * K + k) * C + c]);
          centres[bk * C + c] = kmeans_centre(sum, count, centres[bk * C + c]);
        }
      }
    });
  }

  // --- The palette as returned (rounded to scalar_t), and the final assignment
  // against exactly those colours.
  scalar_t* pal = palette.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < B * K * C; ++i) {
    pal[i] = static_cast<scalar_t>(centres[i]);
    centres[i] = static_cast<acc_t>(pal[i]);
  }
  parallel_for_kmeans_chunks(B, P, 1, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
    const scalar_t* x = img + b * C * P;
    const acc_t* cb = centres.data() + b * K * C;
    nearest_colours<kC>(x + p0, P, cb, K, C, p1 - p0, idx + b * P + p0);
  });
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
