// Helpers shared by rnnsearch's fused CPU sequence kernels (ln_lstm.cpp, lstm.h): at::vec lanes with a scalar
// tail, exp-form sigmoid and tanh, row sums, and the per-step GEMM split over threads. One translation unit
// (ln_lstm.cpp) includes it.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

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
  float buf[V];
  x.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < V; ++i) s += buf[i];
  return s;
}
inline float hsum(float x) { return x; }

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

// C (M, N) = A (M, K) @ B, all row-major and contiguous: B (K, N), or with bt B (N, K) used transposed (a weight
// as stored, without a transposed copy). The per-step GEMMs are small (M = batch), and one BLAS call splits them
// badly over threads: here each thread computes its own block of C's columns with a single-threaded sgemm (BLAS
// runs serially inside a parallel region), 9–19% faster per call on the project's earlier 2-core CPU at H = 128
// and 256 (untransposed B; docs/performance.md).
void gemm_cols(const float* a, const float* b, float* c, int64_t M, int64_t K, int64_t N, bool bt = false) {
  if (sgemm_ == nullptr || at::get_num_threads() < 2) {
    auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor C = at::from_blob(c, {M, N}, opts);
    at::Tensor Bm = bt ? at::from_blob(const_cast<float*>(b), {N, K}, opts).t()
                       : at::from_blob(const_cast<float*>(b), {K, N}, opts);
    at::mm_out(C, at::from_blob(const_cast<float*>(a), {M, K}, opts), Bm);
    return;
  }
  const int64_t parts = at::get_num_threads();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // column-major view: C^T (N, M) = B^T (N, K) @ A^T (K, M), on the block of columns [n0, n1)
      const int n0 = static_cast<int>(N * p / parts), nn = static_cast<int>(N * (p + 1) / parts) - n0;
      const int m = static_cast<int>(M), k = static_cast<int>(K), n = static_cast<int>(N);
      const float one = 1.f, zero = 0.f;
      if (nn <= 0) continue;
      if (bt)  // B^T's rows [n0, n0 + nn) are the stored B's rows: column-major (K, N), taken transposed
        sgemm_("T", "N", &nn, &m, &k, &one, b + static_cast<int64_t>(n0) * K, &k, a, &k, &zero, c + n0, &n);
      else
        sgemm_("N", "N", &nn, &m, &k, &one, b + n0, &n, a, &k, &zero, c + n0, &n);
    }
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "ln_lstm kernel: ", name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace
