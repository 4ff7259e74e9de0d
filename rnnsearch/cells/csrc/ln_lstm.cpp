// Fused layer-norm LSTM sequence for the CPU: forward and backward over a whole sequence, float32.
//
// The arithmetic of rnnsearch.cells.ln_lstm.LayerNormLSTMCell (gate blocks normalised on their own,
// the cell state once more), with the recurrent GEMMs left to ATen (at::mm) and everything between two
// GEMMs done in one pass per batch row, vectorised with ATen's own at::vec (exp as inductor's exp_u20,
// tanh and sigmoid in exp form, as rnnsearch.compile's inductor options). The backward pass accumulates
// the gains' and bias' gradients per thread while each row is in cache, and computes the recurrent
// weight's gradient in one GEMM after the loop. Built and loaded by rnnsearch.cells.ln_lstm_kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
// Per row and step: rstd of the 4 input blocks, of the 4 recurrent ones, of the cell; the 4 input blocks' means.
constexpr int64_t STATS = 13;

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

// y = (x - mean) * rstd over n values; returns rstd (and the mean in *mean_out, if given).
inline float layer_norm_row(const float* x, float* y, int64_t n, float eps, float* mean_out = nullptr) {
  Vec vs(0.f);
  float s = 0.f;
  int64_t k = 0;
  for (; k + V <= n; k += V) vs = vs + Vec::loadu(x + k);
  for (; k < n; ++k) s += x[k];
  const float mean = (s + hsum(vs)) / n;
  Vec vq(0.f);
  float q = 0.f;
  const Vec vm(mean);
  for (k = 0; k + V <= n; k += V) {
    Vec d = Vec::loadu(x + k) - vm;
    vq = vq + d * d;
  }
  for (; k < n; ++k) q += (x[k] - mean) * (x[k] - mean);
  const float rstd = 1.f / std::sqrt((q + hsum(vq)) / n + eps);
  if (mean_out) *mean_out = mean;
  lanes(n, [&](auto* tag, int64_t j) {
    using T = std::remove_pointer_t<decltype(tag)>;
    st(y + j, (ld(x + j, tag) - T(mean)) * T(rstd));
  });
  return rstd;
}

// Layer-norm backward over n values: out = rstd * (dy - mean(dy) - yhat * mean(dy * yhat)), dy = g * gain.
inline void layer_norm_row_bwd(const float* g, const float* gain, const float* yhat, float rstd, float* out,
                               int64_t n) {
  Vec v1(0.f), v2(0.f);
  float s1 = 0.f, s2 = 0.f;
  int64_t k = 0;
  for (; k + V <= n; k += V) {
    Vec dy = Vec::loadu(g + k) * Vec::loadu(gain + k);
    v1 = v1 + dy;
    v2 = v2 + dy * Vec::loadu(yhat + k);
  }
  for (; k < n; ++k) {
    float dy = g[k] * gain[k];
    s1 += dy;
    s2 += dy * yhat[k];
  }
  const float m1 = (s1 + hsum(v1)) / n, m2 = (s2 + hsum(v2)) / n;
  lanes(n, [&](auto* tag, int64_t j) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T dy = ld(g + j, tag) * ld(gain + j, tag);
    st(out + j, T(rstd) * (dy - T(m1) - ld(yhat + j, tag) * T(m2)));
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "ln_lstm kernel: ", name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// A (B, T, 4H) raw input products; h0, c0 (B, H); valid (T, B) bool or empty. Returns
// out (B, T, H), hT, cT and the saved tensors for backward.
std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& A, const at::Tensor& h0, const at::Tensor& c0,
                                        const at::Tensor& W_hh, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                        const at::Tensor& bias, const at::Tensor& g_c, const at::Tensor& b_c,
                                        const at::Tensor& valid, double forget_bias, double eps_d,
                                        const at::Tensor& Hprev, const at::Tensor& Cprev, const at::Tensor& Rhat,
                                        const at::Tensor& Acts, const at::Tensor& Chat, const at::Tensor& Stats) {
  for (auto* p : {&A, &h0, &c0, &W_hh, &g_ih, &g_hh, &bias, &g_c, &b_c, &Hprev, &Cprev, &Rhat, &Acts, &Chat, &Stats})
    check(*p, "every tensor");
  const int64_t B = A.size(0), T = A.size(1), G = A.size(2), H = G / 4;
  const bool masked = valid.numel() > 0;
  const float fb = static_cast<float>(forget_bias), eps = static_cast<float>(eps_d);
  auto opts = A.options();
  at::Tensor scratch = at::empty({at::get_num_threads(), G}, opts);  // each thread's normalised input row
  at::Tensor out = at::empty({B, T, H}, opts);
  at::Tensor hT = at::empty({B, H}, opts), cT = at::empty({B, H}, opts);
  at::Tensor R = at::empty({B, G}, opts);
  at::Tensor W_t = W_hh.t().contiguous();  // (H, 4H)
  Hprev[0].copy_(h0);
  Cprev[0].copy_(c0);
  const float *a_p = A.data_ptr<float>(), *gih = g_ih.data_ptr<float>(), *ghh = g_hh.data_ptr<float>(),
              *bs = bias.data_ptr<float>(), *gc = g_c.data_ptr<float>(), *bc = b_c.data_ptr<float>();
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(R, Hprev[t], W_t);
    float* hn = t + 1 < T ? Hprev[t + 1].data_ptr<float>() : hT.data_ptr<float>();
    float* cn = t + 1 < T ? Cprev[t + 1].data_ptr<float>() : cT.data_ptr<float>();
    const float *hp = Hprev[t].data_ptr<float>(), *cp = Cprev[t].data_ptr<float>(), *r_p = R.data_ptr<float>();
    float *rh = Rhat[t].data_ptr<float>(), *ac = Acts[t].data_ptr<float>(),
          *ch = Chat[t].data_ptr<float>(), *sp = Stats[t].data_ptr<float>(), *op = out.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      float* ahb = scratch[at::get_thread_num()].data_ptr<float>();
      for (int64_t b = b0; b < b1; ++b) {
        float* o = op + (b * T + t) * H;
        if (masked && !vp[t * B + b]) {  // past this row's length: carry the state, output zeros
          std::copy(hp + b * H, hp + (b + 1) * H, hn + b * H);
          std::copy(cp + b * H, cp + (b + 1) * H, cn + b * H);
          std::fill(o, o + H, 0.f);
          continue;
        }
        const float* a = a_p + (b * T + t) * G;
        float *rhb = rh + b * G, *acb = ac + b * G, *s = sp + b * STATS;
        for (int j = 0; j < 4; ++j) {
          s[j] = layer_norm_row(a + j * H, ahb + j * H, H, eps, s + 9 + j);
          s[4 + j] = layer_norm_row(r_p + b * G + j * H, rhb + j * H, H, eps);
        }
        const float* c = cp + b * H;
        float* cnb = cn + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp pre[4];
          for (int j = 0; j < 4; ++j) {
            const int64_t i = j * H + k;
            pre[j] = ld(ahb + i, tag) * ld(gih + i, tag) + ld(bs + i, tag) + ld(rhb + i, tag) * ld(ghh + i, tag);
          }
          Tp si = sigm(pre[0]), sf = sigm(pre[1] + Tp(fb)), tg = tanh_e(pre[2]), so = sigm(pre[3]);
          st(acb + k, si);
          st(acb + H + k, sf);
          st(acb + 2 * H + k, tg);
          st(acb + 3 * H + k, so);
          st(cnb + k, sf * ld(c + k, tag) + si * tg);
        });
        float* chb = ch + b * H;
        s[8] = layer_norm_row(cnb, chb, H, eps);
        float* hnb = hn + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp h = ld(acb + 3 * H + k, tag) * tanh_e(ld(chb + k, tag) * ld(gc + k, tag) + ld(bc + k, tag));
          st(hnb + k, h);
          st(o + k, h);
        });
      }
    });
  }
  return {out, hT, cT};
}

// Gradients of ln_lstm_forward: returns dA, dh0, dc0, dW_hh, dg_ih, dg_hh, dbias, dg_c, db_c. dR (T, B, 4H) is a
// work buffer; every saved tensor is left as it was (a second backward with retain_graph reads them again).
std::vector<at::Tensor> ln_lstm_backward(const at::Tensor& dout_in, const at::Tensor& dhT, const at::Tensor& dcT,
                                         const at::Tensor& W_hh, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                         const at::Tensor& g_c, const at::Tensor& b_c, const at::Tensor& A,
                                         const at::Tensor& Hprev, const at::Tensor& Cprev, const at::Tensor& Rhat,
                                         const at::Tensor& Acts, const at::Tensor& Chat, const at::Tensor& Stats,
                                         const at::Tensor& valid, const at::Tensor& dR) {
  at::Tensor dout = dout_in.contiguous();
  const int64_t T = Hprev.size(0), B = Hprev.size(1), H = Hprev.size(2), G = 4 * H;
  const bool masked = valid.numel() > 0;
  auto opts = Hprev.options();
  const int nthreads = at::get_num_threads();
  at::Tensor dA = at::empty({B, T, G}, opts);
  at::Tensor dH = dhT.contiguous().clone(), dC = dcT.contiguous().clone(), dHn = at::empty({B, H}, opts);
  at::Tensor part4 = at::zeros({nthreads, 3, G}, opts), part1 = at::zeros({nthreads, 2, H}, opts);
  at::Tensor scratch = at::empty({nthreads, 2 * G + H}, opts);
  const float *gih = g_ih.data_ptr<float>(), *ghh = g_hh.data_ptr<float>(), *gc = g_c.data_ptr<float>(),
              *bc = b_c.data_ptr<float>(), *do_p = dout.data_ptr<float>(), *a_p = A.data_ptr<float>();
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float *cp = Cprev[t].data_ptr<float>(), *rh = Rhat[t].data_ptr<float>(),
                *ac = Acts[t].data_ptr<float>(), *ch = Chat[t].data_ptr<float>(), *sp = Stats[t].data_ptr<float>();
    float *dh = dH.data_ptr<float>(), *dc = dC.data_ptr<float>(), *dr = dR[t].data_ptr<float>(),
          *da = dA.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      float* p4 = part4[tid].data_ptr<float>();  // dbias, dg_hh, dg_ih partial sums
      float* p1 = part1[tid].data_ptr<float>();  // dg_c, db_c
      float* dg = scratch[tid].data_ptr<float>();  // the gates' gradient (4H), then dĉ (H)
      float* dchat = dg + G;
      float* ahb = dchat + H;  // the normalised input row, recomputed
      for (int64_t b = b0; b < b1; ++b) {
        float* dab = da + (b * T + t) * G;
        float* drb = dr + b * G;
        if (masked && !vp[t * B + b]) {  // the state was carried: its gradient passes straight through
          std::fill(dab, dab + G, 0.f);
          std::fill(drb, drb + G, 0.f);
          continue;
        }
        const float *acb = ac + b * G, *chb = ch + b * H, *s = sp + b * STATS, *dob = do_p + (b * T + t) * H;
        float *dhb = dh + b * H, *dcb = dc + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp chat = ld(chb + k, tag);
          Tp tc = tanh_e(chat * ld(gc + k, tag) + ld(bc + k, tag));
          Tp d = ld(dhb + k, tag) + ld(dob + k, tag);
          Tp so = ld(acb + 3 * H + k, tag);
          Tp dcn = d * so * (Tp(1.f) - tc * tc);
          st(p1 + k, ld(p1 + k, tag) + dcn * chat);
          st(p1 + H + k, ld(p1 + H + k, tag) + dcn);
          st(dchat + k, dcn);
          st(dg + 3 * H + k, d * tc * so * (Tp(1.f) - so));  // do
        });
        layer_norm_row_bwd(dchat, gc, chb, s[8], dchat, H);  // in place: dĉ → the normalised cell's input grad
        const float* cpb = cp + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp si = ld(acb + k, tag), sf = ld(acb + H + k, tag), tg = ld(acb + 2 * H + k, tag);
          Tp dct = ld(dcb + k, tag) + ld(dchat + k, tag);
          st(dg + k, dct * tg * si * (Tp(1.f) - si));
          st(dg + H + k, dct * ld(cpb + k, tag) * sf * (Tp(1.f) - sf));
          st(dg + 2 * H + k, dct * si * (Tp(1.f) - tg * tg));
          st(dcb + k, dct * sf);
        });
        const float* rhb = rh + b * G;
        const float* a = a_p + (b * T + t) * G;
        for (int j = 0; j < 4; ++j) {
          const float mean = s[9 + j], rstd = s[j];
          lanes(H, [&](auto* tag, int64_t k) {
            using Tp = std::remove_pointer_t<decltype(tag)>;
            st(ahb + j * H + k, (ld(a + j * H + k, tag) - Tp(mean)) * Tp(rstd));
          });
        }
        lanes(G, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp g = ld(dg + k, tag);
          st(p4 + k, ld(p4 + k, tag) + g);
          st(p4 + G + k, ld(p4 + G + k, tag) + g * ld(rhb + k, tag));
          st(p4 + 2 * G + k, ld(p4 + 2 * G + k, tag) + g * ld(ahb + k, tag));
        });
        for (int j = 0; j < 4; ++j) {
          layer_norm_row_bwd(dg + j * H, ghh + j * H, rhb + j * H, s[4 + j], drb + j * H, H);
          layer_norm_row_bwd(dg + j * H, gih + j * H, ahb + j * H, s[j], dab + j * H, H);
        }
      }
    });
    at::mm_out(dHn, dR[t], W_hh);
    if (masked) {  // rows past their length carry dh unchanged
      float* dhn = dHn.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        if (!vp[t * B + b]) std::copy(dh + b * H, dh + (b + 1) * H, dhn + b * H);
    }
    std::swap(dH, dHn);
  }
  at::Tensor dW = at::mm(dR.view({T * B, G}).t(), Hprev.view({T * B, H}));
  at::Tensor s4 = part4.sum(0), s1 = part1.sum(0);
  return {dA, dH, dC, dW, s4[2], s4[1], s4[0], s1[0], s1[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // ATen's own calls need no GIL: other Python threads (a tracker's, say) run meanwhile
  m.def("forward", &ln_lstm_forward, "ln_lstm sequence forward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &ln_lstm_backward, "ln_lstm sequence backward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
}
