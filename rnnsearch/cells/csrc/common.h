// Helpers shared by rnnsearch's fused CPU sequence kernels (ln_lstm.cpp, lstm.h): at::vec lanes with a scalar
// tail, exp-form sigmoid and tanh, row sums, and the per-step GEMM split over threads. One translation unit
// (ln_lstm.cpp) includes it.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

// exp_u20 clamps its input, which turns NaN into a finite number: keep NaN, so a diverged run shows as one.
inline Vec vexp(const Vec& x) { return Vec::blendv(x.exp_u20(), x, x.isnan()); }
inline float vexp(float x) { return std::exp(x); }
inline Vec ld(const float* p, Vec*) { return Vec::loadu(p); }
inline float ld(const float* p, float*) { return *p; }
inline void st(float* p, const Vec& x) { x.store(p); }
inline void st(float* p, float x) { *p = x; }
inline float hsum(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(x);  // a tree of shuffles: not 16 dependent adds
#else
  float buf[V];
  x.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < V; ++i) s += buf[i];
  return s;
#endif
}
inline float hsum(float x) { return x; }
// torch.lerp(a, b, w)'s arithmetic (ATen's lerp: from b's end for w >= 0.5), so a kept unit (w = 1) is b exactly:
// zoneout's state = lerp(new, previous, z).
inline Vec lerp_as_torch(const Vec& a, const Vec& b, const Vec& w) {
  return Vec::blendv(a + w * (b - a), b - (b - a) * (Vec(1.f) - w), w >= Vec(0.5f));
}
inline float lerp_as_torch(float a, float b, float w) { return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w); }

template <typename T> inline T sigm(const T& x) { return T(1.f) / (T(1.f) + vexp(T(0.f) - x)); }
template <typename T> inline T tanh_e(const T& x) { return T(2.f) / (T(1.f) + vexp(T(-2.f) * x)) - T(1.f); }

// Runs body(T-typed lane, offset) over [0, n): vector lanes, then a scalar tail.
template <typename F> inline void lanes(int64_t n, F&& body) {
  int64_t k = 0;
  for (; k + V <= n; k += V) body(static_cast<Vec*>(nullptr), k);
  for (; k < n; ++k) body(static_cast<float*>(nullptr), k);
}

// Sums of vector lanes and a scalar tail, one accumulator each; add() picks by the lane type.
struct Acc {
  Vec v{0.f};
  float s = 0.f;
  void add(const Vec& x) { v = v + x; }
  void add(float x) { s += x; }
  float total() const { return s + hsum(v); }
};

// Σ f(x[k]) over n values, with four vector accumulators (one would make every add wait for the last).
template <typename F> inline float row_sum(const float* x, int64_t n, F&& f) {
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t k = 0;
  for (; k + 4 * V <= n; k += 4 * V) {
    s0 = s0 + f(Vec::loadu(x + k));
    s1 = s1 + f(Vec::loadu(x + k + V));
    s2 = s2 + f(Vec::loadu(x + k + 2 * V));
    s3 = s3 + f(Vec::loadu(x + k + 3 * V));
  }
  for (; k + V <= n; k += V) s0 = s0 + f(Vec::loadu(x + k));
  float s = 0.f;
  for (; k < n; ++k) s += f(x[k]);
  return s + hsum((s0 + s1) + (s2 + s3));
}

// The mean and 1 / std of n values (two passes: the mean, then the squared deviations); returns rstd.
inline float row_stats(const float* x, int64_t n, float eps, float* mean_out) {
  const float mean = row_sum(x, n, [](const auto& v) { return v; }) / n;
  const float sq = row_sum(x, n, [mean](const auto& v) {
    using T = std::decay_t<decltype(v)>;
    T d = v - T(mean);
    return d * d;
  });
  *mean_out = mean;
  return 1.f / std::sqrt(sq / n + eps);
}

// The Fortran BLAS sgemm that PyTorch's own CPU matmul calls (MKL's, in the x86 wheels). Weak: where libtorch
// does not export it, the GEMMs below fall back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// C (M, N) = A (M, K) @ B, all row-major, A's rows lda apart (0: K, contiguous), C's ldc apart (0: N), B contiguous:
// B (K, N), or with bt B (N, K) used transposed (a weight as stored, without a transposed copy). The per-step
// GEMMs are small (M = batch), and one BLAS call splits them
// badly over threads: here each thread computes its own block of C's columns with a single-threaded sgemm (BLAS
// runs serially inside a parallel region), 9–19% faster per call on the project's earlier 2-core CPU at H = 128
// and 256 (untransposed B; docs/performance.md).
void gemm_cols(const float* a, const float* b, float* c, int64_t M, int64_t K, int64_t N, bool bt = false,
               int64_t lda = 0, int64_t ldc = 0) {
  if (lda <= 0) lda = K;
  if (ldc <= 0) ldc = N;
  if (sgemm_ == nullptr || at::get_num_threads() < 2) {
    auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor C = at::from_blob(c, {M, N}, {ldc, 1}, opts);
    at::Tensor Bm = bt ? at::from_blob(const_cast<float*>(b), {N, K}, opts).t()
                       : at::from_blob(const_cast<float*>(b), {K, N}, opts);
    at::mm_out(C, at::from_blob(const_cast<float*>(a), {M, K}, {lda, 1}, opts), Bm);
    return;
  }
  const int64_t parts = at::get_num_threads();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // column-major view: C^T (N, M) = B^T (N, K) @ A^T (K, M), on the block of columns [n0, n1)
      const int n0 = static_cast<int>(N * p / parts), nn = static_cast<int>(N * (p + 1) / parts) - n0;
      const int m = static_cast<int>(M), k = static_cast<int>(K), n = static_cast<int>(N), la = static_cast<int>(lda),
                lc = static_cast<int>(ldc);
      const float one = 1.f, zero = 0.f;
      if (nn <= 0) continue;
      if (bt)  // B^T's rows [n0, n0 + nn) are the stored B's rows: column-major (K, N), taken transposed
        sgemm_("T", "N", &nn, &m, &k, &one, b + static_cast<int64_t>(n0) * K, &k, a, &la, &zero, c + n0, &lc);
      else
        sgemm_("N", "N", &nn, &m, &k, &one, b + n0, &n, a, &la, &zero, c + n0, &lc);
    }
  });
}

// A GEMM's right-hand operand B (K, N) repacked once per sequence for the per-step products (gemm_packed).
// Where the build targets AVX-512, panels of kPanel columns, each (K, kPanel) contiguous and zero padded: the
// micro-kernel below streams one panel while it keeps a tile of C in registers. It ran the per-step shapes at
// 1.3 times MKL's speed on the project's AMD EPYC VM (whose MKL takes its AVX2 path there; docs/performance.md).
// Elsewhere B stays as it is, and gemm_packed calls gemm_cols.
struct PackedB {
  at::Tensor buf;  // (panels, K, kPanel); empty without the micro-kernel
  const float* src;
  int64_t K, N;
  bool bt;
};
constexpr int64_t kPanel = 64;  // four 16-float vectors

// b as in gemm_cols: (K, N), or with bt (N, K) used transposed.
PackedB pack_b(const float* b, int64_t K, int64_t N, bool bt) {
  PackedB p{at::Tensor(), b, K, N, bt};
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t panels = (N + kPanel - 1) / kPanel;
  p.buf = at::empty({panels, K, kPanel}, at::TensorOptions().dtype(at::kFloat));
  float* dst = p.buf.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float* d = dst + q * K * kPanel;
      const int64_t n0 = q * kPanel, w = std::min(kPanel, N - n0);
      if (w < kPanel) std::fill(d, d + K * kPanel, 0.f);
      if (bt) {  // B's column n is the stored row n: read along it
        for (int64_t j = 0; j < w; ++j) {
          const float* s = b + (n0 + j) * K;
          for (int64_t k = 0; k < K; ++k) d[k * kPanel + j] = s[k];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) std::copy(b + k * N + n0, b + k * N + n0 + w, d + k * kPanel);
      }
    }
  });
#endif
  return p;
}

#if defined(CPU_CAPABILITY_AVX512)
// C's rows [0, MR) and one panel's 64 columns: C (ldc apart) (+)= A (MR, K) @ panel (K, kPanel), A's element (r, k)
// at a[r * rs + k * ks] (a row-major A: rs = its row stride, ks = 1; a packed block of Xᵀ: rs = 1, ks = 6). The
// accumulators are 4 MR registers (MR = 6: 24, with the panel's 4 and a broadcast, 29 of the 32), stored under the
// panel's column masks; with accumulate, they start from C.
template <int MR>
inline void tile(const float* a, int64_t rs, int64_t ks, const float* panel, int64_t K, float* c, int64_t ldc,
                 const __mmask16* mask, bool accumulate) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j)
      acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], c + r * ldc + j * 16) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float *pk = panel + k * kPanel, *ak = a + k * ks;
    const __m512 b0 = _mm512_loadu_ps(pk), b1 = _mm512_loadu_ps(pk + 16), b2 = _mm512_loadu_ps(pk + 32),
                 b3 = _mm512_loadu_ps(pk + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ak[r * rs]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(c + r * ldc + j * 16, mask[j], acc[r][j]);
}

// tile<rows> for rows in [1, 6] (a part-filled tile's rows).
inline void tile_rows(int64_t rows, const float* a, int64_t rs, int64_t ks, const float* panel, int64_t K, float* c,
                      int64_t ldc, const __mmask16* mask, bool accumulate) {
  switch (rows) {
    case 6: tile<6>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
    case 5: tile<5>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
    case 4: tile<4>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
    case 3: tile<3>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
    case 2: tile<2>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
    default: tile<1>(a, rs, ks, panel, K, c, ldc, mask, accumulate); break;
  }
}

// n rows (or columns) as tiles of at most 6: as few as 6-row tiles need, their rows as even as they go (32 rows:
// 5, 5, 6, 5, 5, 6, not five of 6 and one of 2, which pays the panel's loads for a third of the FMAs). Tile i of
// `tiles` starts at tile_start(n, tiles, i).
inline int64_t tile_count(int64_t n) { return (n + 5) / 6; }
inline int64_t tile_start(int64_t n, int64_t tiles, int64_t i) { return n * i / tiles; }

// The four 16-lane store masks of a panel whose first `width` columns are C's (the rest padding).
inline void panel_masks(int64_t width, __mmask16* mask) {
  for (int j = 0; j < 4; ++j) {
    const int64_t left = width - j * 16;
    mask[j] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
}

// Rows [m0, m1) of C (rows ldc apart) against panel q.
inline void panel_rows(const float* a, int64_t lda, const PackedB& p, float* c, int64_t ldc, int64_t q, int64_t m0,
                       int64_t m1) {
  const int64_t K = p.K, N = p.N, n0 = q * kPanel;
  const float* panel = p.buf.data_ptr<float>() + q * K * kPanel;
  __mmask16 mask[4];
  panel_masks(N - n0, mask);
  for (int64_t i = 0, tiles = tile_count(m1 - m0); i < tiles; ++i) {
    const int64_t m = m0 + tile_start(m1 - m0, tiles, i), rows = m0 + tile_start(m1 - m0, tiles, i + 1) - m;
    tile_rows(rows, a + m * lda, lda, 1, panel, K, c + m * ldc + n0, ldc, mask, false);
  }
}
#endif

// C (M, N) = A (M, K) @ B, A's rows lda apart (0: K, contiguous), C's ldc apart (0: N), B packed by pack_b. Each
// thread takes its share of the panels, and where the panels do not divide evenly among the threads, of each
// panel's rows.
void gemm_packed(const float* a, const PackedB& p, float* c, int64_t M, int64_t lda = 0, int64_t ldc = 0) {
  if (lda <= 0) lda = p.K;
  if (ldc <= 0) ldc = p.N;
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t panels = p.buf.size(0), parts = at::get_num_threads();
  const int64_t slices = panels % parts == 0 ? 1 : parts, items = panels * slices;
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = items * t / parts; i < items * (t + 1) / parts; ++i) {
        const int64_t q = i / slices, s = i % slices;
        panel_rows(a, lda, p, c, ldc, q, M * s / slices, M * (s + 1) / slices);
      }
  });
#else
  gemm_cols(a, p.src, c, M, p.K, p.N, p.bt, lda, ldc);
#endif
}

// Rows [m0, m1) of C (M, N) = A @ B (B packed by pack_b; A's rows lda apart, 0: K; C's ldc apart, 0: N), every
// column, on the calling thread: for a kernel whose threads each take their own batch rows through the whole
// sequence (rows_apart).
void gemm_rows(const float* a, const PackedB& p, float* c, int64_t m0, int64_t m1, int64_t lda = 0, int64_t ldc = 0) {
  if (lda <= 0) lda = p.K;
  if (ldc <= 0) ldc = p.N;
  if (m1 <= m0) return;
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t q = 0; q < p.buf.size(0); ++q) panel_rows(a, lda, p, c, ldc, q, m0, m1);
#else
  gemm_cols(a + m0 * lda, p.src, c + m0 * ldc, m1 - m0, p.K, p.N, p.bt, lda, ldc);  // serial inside a parallel region
#endif
}

// Whether a kernel's threads should each take their own share of the batch rows through the whole sequence, with
// no barrier between steps (a row's steps depend on that row alone): on the micro-kernel's build, with
// rows_apart_min rows or more per thread (two tiles; the tests lower it to run both routes: a plain global,
// set from Python between kernel calls only).
int64_t rows_apart_min = 12;
inline bool rows_apart(int64_t B) {
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t parts = at::get_num_threads();
  return parts > 1 && B >= rows_apart_min * parts;
#else
  return false;
#endif
}

// Runs f(b0, b1) once per thread, on that thread's share [b0, b1) of the B batch rows (the rows_apart route).
template <typename F> inline void per_thread_rows(int64_t B, F&& f) {
  const int64_t parts = at::get_num_threads();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(B * p / parts, B * (p + 1) / parts);
  });
}

// Y (K, N) stored by panels of kPanel columns, as gemm_tn's right-hand operand wants it: panel q's rows are
// contiguous, (K, kPanel), at q * K * kPanel, a part-filled last panel zero padded. A kernel that writes a gradient
// row by row stores it this way (store_panels) and spares gemm_tn the gather of each panel's rows (rows 4 KiB
// apart at H = 256: a page each).
inline int64_t panel_count(int64_t N) { return (N + kPanel - 1) / kPanel; }
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kByPanels = true;  // whether the kernels store their weights' gradients' operands by panels
#else
constexpr bool kByPanels = false;
#endif

// The calling thread's streaming stores (store_panels) made visible: before any other thread may read them.
inline void fence_streams() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Row k of a panel-stored Y (K rows) from the N values at row. A whole panel's 64 floats (four cache lines, aligned
// where yp is) go by streaming stores: the row is written once and read back only by gemm_tn after the sequence, so
// fetching its lines first (a plain store's read for ownership) and keeping them in cache buys nothing. The
// writing threads must _mm_sfence before gemm_tn reads yp. (Plain copies here made the backward no faster than
// gemm_tn's own gather; streamed, ln_lstm's backward took 6-15% less: docs/performance.md.)
inline void store_panels(const float* row, int64_t N, float* yp, int64_t K, int64_t k) {
  for (int64_t q = 0, n0 = 0; n0 < N; ++q, n0 += kPanel) {
    const int64_t w = std::min(kPanel, N - n0);
    float* d = yp + (q * K + k) * kPanel;
#if defined(CPU_CAPABILITY_AVX512)
    if (w == kPanel && (reinterpret_cast<uintptr_t>(d) & 63) == 0) {
      for (int j = 0; j < 4; ++j) _mm512_stream_ps(d + 16 * j, _mm512_loadu_ps(row + n0 + 16 * j));
      continue;
    }
#endif
    std::copy(row + n0, row + n0 + w, d);
    if (w < kPanel) std::fill(d + w, d + kPanel, 0.f);
  }
}

// C (M, N) = X^T Y for X (K, M), row-major and contiguous, and Y either row-major and contiguous (y, panels false)
// or stored by panels (store_panels; panels true): a weight's gradient over a whole sequence's rows (K = steps x
// batch), without a transposed copy. With the micro-kernel: each thread takes its share of Y's 64-column panels
// (and of C's rows, where the panels do not divide among the threads) and goes through K in blocks of kTnBlock rows,
// packing the block's X (in tiles of up to 6 columns, split evenly) and, for a row-major Y, each of its panels before it multiplies them
// (read in place, rows 4 KiB apart would share cache sets); else at::mm.
constexpr int64_t kTnBlock = 512;
at::Tensor gemm_tn_of(const at::Tensor& X, const float* y, int64_t N, bool panels) {
  const int64_t K = X.size(0), M = X.size(1);
#if defined(CPU_CAPABILITY_AVX512)
  at::Tensor C = at::empty({M, N}, X.options());
  if (K == 0 || M == 0 || N == 0) return C.zero_();
  const float* x = X.data_ptr<float>();
  float* c = C.data_ptr<float>();
  const int64_t panels_n = panel_count(N), tiles = tile_count(M), parts = at::get_num_threads();
  const int64_t slices = panels_n % parts == 0 ? 1 : parts, items = panels_n * slices;
  // per thread: its packed blocks of X (tiles, kTnBlock, 6) and, for a row-major Y, of one panel of Y (kTnBlock,
  // kPanel). A part-filled tile's padding is never read (the tile's own width), a part-filled panel's is never
  // stored (the masks), but is zero, here or by store_panels (no denormals or NaN in the lanes the FMAs run on).
  at::Tensor Xp = at::empty({parts, tiles, kTnBlock, 6}, X.options());
  at::Tensor Yp = at::zeros({panels ? 0 : parts, kTnBlock, kPanel}, X.options());
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = items * t / parts, i1 = items * (t + 1) / parts;
      if (i0 >= i1) continue;
      float* xp = Xp.data_ptr<float>() + t * tiles * kTnBlock * 6;
      float* yp = panels ? nullptr : Yp.data_ptr<float>() + t * kTnBlock * kPanel;
      // the tiles this thread's items use: all, or its one item's slice (slices split at tile bounds)
      const bool all = slices == 1 || i1 - i0 > 1;
      const int64_t tile0 = all ? 0 : tiles * (i0 % slices) / slices;
      const int64_t tile1 = all ? tiles : tiles * (i0 % slices + 1) / slices;
      for (int64_t k0 = 0; k0 < K; k0 += kTnBlock) {
        const int64_t kc = std::min(kTnBlock, K - k0);
        for (int64_t ti = tile0; ti < tile1; ++ti) {
          const int64_t m0 = tile_start(M, tiles, ti), w = tile_start(M, tiles, ti + 1) - m0;
          const __mmask16 cols = static_cast<__mmask16>((1u << w) - 1);
          float* d = xp + ti * kTnBlock * 6;
          const float* src = x + k0 * M + m0;
          for (int64_t k = 0; k < kc; ++k)  // 6 (or w) floats a row: one masked load and store
            _mm512_mask_storeu_ps(d + k * 6, cols, _mm512_maskz_loadu_ps(cols, src + k * M));
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t q = i / slices, s = i % slices, n0 = q * kPanel, w = std::min(kPanel, N - n0);
          const float* block = yp;
          if (panels) {
            block = y + (q * K + k0) * kPanel;
          } else {
            for (int64_t k = 0; k < kc; ++k) {  // each row of the panel from its own page: fetched 16 rows ahead
              if (k + 16 < kc)
                for (int64_t o = 0; o < w; o += 16)
                  _mm_prefetch(reinterpret_cast<const char*>(y + (k0 + k + 16) * N + n0 + o), _MM_HINT_T0);
              std::copy(y + (k0 + k) * N + n0, y + (k0 + k) * N + n0 + w, yp + k * kPanel);
            }
          }
          __mmask16 mask[4];
          panel_masks(w, mask);
          for (int64_t ti = tiles * s / slices; ti < tiles * (s + 1) / slices; ++ti) {
            const int64_t m = tile_start(M, tiles, ti);
            const float* xt = xp + ti * kTnBlock * 6;
            float* ct = c + m * N + n0;
            tile_rows(tile_start(M, tiles, ti + 1) - m, xt, 1, 6, block, kc, ct, N, mask, k0 > 0);
          }
        }
      }
    }
  });
  return C;
#else
  TORCH_CHECK(!panels, "gemm_tn: a panel-stored operand needs the micro-kernel's build");
  return at::mm(X.t(), at::from_blob(const_cast<float*>(y), {K, N}, X.options()));
#endif
}

// X^T Y for a row-major Y (K, N).
at::Tensor gemm_tn(const at::Tensor& X, const at::Tensor& Y) {
  return gemm_tn_of(X, Y.data_ptr<float>(), Y.size(1), false);
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "ln_lstm kernel: ", name,
              " must be a contiguous float32 CPU tensor");
}

// Zoneout's Zh, Zc and saved pre-zoning cell Cnew, or state dropout's Mh (each kind empty where not used): not both
// kinds, and each given tensor (T, B, H), contiguous float32 on the CPU.
void check_state_wrappers(const at::Tensor& Zh, const at::Tensor& Zc, const at::Tensor& Cnew, const at::Tensor& Mh,
                          int64_t T, int64_t B, int64_t H) {
  const bool zoned = Zh.numel() > 0, sdrop = Mh.numel() > 0;
  TORCH_CHECK(!(zoned && sdrop), "kernel: zoneout and state dropout in one call");
  for (const at::Tensor* p : {&Zh, &Zc, &Cnew, &Mh}) {
    if (p == &Mh ? !sdrop : !zoned) continue;
    check(*p, "a zoneout or state dropout tensor");
    TORCH_CHECK(p->dim() == 3 && p->size(0) == T && p->size(1) == B && p->size(2) == H,
                "kernel: a zoneout or state dropout tensor of ", p->sizes(), " for ", T, " steps, ", B, " rows and ",
                H, " units");
  }
}

}  // namespace
