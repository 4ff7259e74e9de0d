// Fused LSTM sequence for the CPU (the registry's `lstm`: TF's LSTMCell without projection, peepholes and
// cell clip optional, tanh activation, and Greff et al.'s variants): forward and backward over a whole
// sequence, float32.
//
// ln_lstm.cpp's scheme (its translation unit includes this file), with the input inside: one GEMM per step, the
// input's and the recurrent one together ([x_t, h_{t-1}] [W_ih W_hh]^T; ln_lstm normalises the two apart, so it
// makes them as two), through common.h's micro-kernel with each thread taking its own batch rows through the
// sequence (rows_apart), else split over the threads step by step (gemm_packed, gemm_cols without AVX-512),
// everything between two GEMMs one vectorised pass per batch row, the bias' and peepholes' gradients accumulated
// per thread, both weights' gradients one GEMM after the loop.
// Each variant is its own instantiation (Spec<V>), so the vanilla cell pays nothing for the others.
// Built and loaded by rnnsearch.cells.ln_lstm_kernel, used by rnnsearch.cells.lstm_kernel.
#pragma once
#include <type_traits>

#include "common.h"

namespace {
// x clipped to [-c, c] (NaN stays NaN, as in torch.clamp).
inline Vec clip_to(const Vec& x, float c) { return at::vec::clamp(x, Vec(-c), Vec(c)); }
inline float clip_to(float x, float c) { return std::min(std::max(x, -c), c); }
// g where the clip left x alone (|x| < c), else 0: the clip's gradient, read off its output.
inline Vec where_unclipped(const Vec& g, const Vec& x, float c) { return Vec::blendv(Vec(0.f), g, x.abs() < Vec(c)); }
inline float where_unclipped(float g, float x, float c) { return std::abs(x) < c ? g : 0.f; }

// The variants, numbered as rnnsearch.cells.lstm_kernel.VARIANTS: 0 vanilla (and NP), 1 NIG (i = 1),
// 2 NFG (f = 1), 3 NOG (o = 1), 4 NIAF (g not squashed), 5 NOAF (h = o c), 6 CIFG (f = 1 - i), 7 FGR (the
// previous step's gates [i f o], a third state s, enter each gate through W_gr: pre_ifo += s W_gr^T).
constexpr int kVariants = 8;
template <int V> struct Spec {
  static constexpr bool has_i = V != 1, has_f = V != 2 && V != 6, has_o = V != 3;
  static constexpr bool coupled = V == 6, act_g = V != 4, act_c = V != 5, gate_rec = V == 7;
  static constexpr int gates = 1 + has_i + has_f + has_o;  // blocks of H rows in W_cat and the bias, in order i f g o
  static constexpr int oi = 0, of = has_i, og = has_i + has_f, oo = og + 1;  // their column blocks
};

// Calls f(std::integral_constant<int, V>) for the runtime variant v.
template <typename F, int V = 0> inline void with_variant(int64_t v, F&& f) {
  if constexpr (V < kVariants) {
    if (v == V) return f(std::integral_constant<int, V>{});
    with_variant<F, V + 1>(v, std::forward<F>(f));
  } else {
    TORCH_CHECK(false, "lstm kernel: unknown variant ", v);
  }
}
}  // namespace

// XH (T, B, I + H): x_t in each row's first I columns (the caller's), h_{t-1} in the rest (written here, and saved).
// Each step is one GEMM, [x_t, h_{t-1}] [W_ih W_hh]^T: W_cat (nH, I + H), n the variant's gate blocks (the input
// enters there rather than in one GEMM over the whole sequence first, which is slow for a narrow input and adds a
// (T, B, nH) pass over memory). h0, c0 (B, H); bias (nH): b_ih + b_hh; w_ci,
// w_cf, w_co (H) or empty (no peepholes, or no such gate); valid (T, B) bool or empty; cell_clip <= 0: none.
// Fills the saved tensors (XH's h part; Cprev (T + 1, B, H): c_{t-1}, then c_T; Acts (T, B, 4H):
// i, f, g, o, a dropped gate's constant included; Tc (T, B, H): tanh of the new cell, or the cell under NOAF)
// and returns out (B, T, H), hT, cT, sT. FGR only (else all empty): s0 (B, 3H), W_gr (3H, 3H), and the saved
// S (T + 1, B, 3H): s_{t-1}, then s_T. Zoneout only (else all empty): Zh, Zc (T, B, H), how much of the previous
// h and c each unit keeps (a 0/1 draw in training, the probability in eval): state = new + z (previous - new),
// the output the zoned h; and the saved Cnew (T, B, H), the cell before zoning (Cprev then holds the zoned one).
// State dropout only (else empty): Mh (T, B, H), the multiplier of the h passed on as state (0 or 1 / keep); the
// output is the h before it (TF's DropoutWrapper with state_keep_prob). Not together with zoneout.
std::vector<at::Tensor> lstm_forward(const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& W_cat,
                                     const at::Tensor& bias, const at::Tensor& w_ci,
                                     const at::Tensor& w_cf, const at::Tensor& w_co, const at::Tensor& valid,
                                     double forget_bias,
                                     double cell_clip, int64_t variant, const at::Tensor& s0,
                                     const at::Tensor& W_gr, const at::Tensor& XH, const at::Tensor& Cprev,
                                     const at::Tensor& Acts, const at::Tensor& Tc, const at::Tensor& S,
                                     const at::Tensor& Zh, const at::Tensor& Zc, const at::Tensor& Cnew,
                                     const at::Tensor& Mh) {
  for (auto* p : {&h0, &c0, &W_cat, &bias, &XH, &Cprev, &Acts, &Tc}) check(*p, "every tensor");
  const bool fgr = W_gr.numel() > 0;
  if (fgr)
    for (auto* p : {&s0, &W_gr, &S}) check(*p, "an FGR tensor");
  const bool zoned = Zh.numel() > 0, sdrop = Mh.numel() > 0;
  for (auto* p : {&w_ci, &w_cf, &w_co})
    if (p->numel() > 0) check(*p, "a peephole weight");
  const bool pi = w_ci.numel() > 0, pf = w_cf.numel() > 0, po = w_co.numel() > 0;
  const int64_t T = XH.size(0), B = XH.size(1), W = XH.size(2), H = h0.size(1), I = W - H;
  check_state_wrappers(Zh, Zc, Cnew, Mh, T, B, H);
  const int64_t G = W_cat.size(0);
  TORCH_CHECK(W_cat.size(1) == W && bias.numel() == G, "lstm kernel: weights ", W_cat.sizes(), " and bias ",
              bias.sizes(), " for ", I, " inputs and ", H, " units");
  const bool masked = valid.numel() > 0, clipped = cell_clip > 0;
  const float fb = static_cast<float>(forget_bias), cc = static_cast<float>(cell_clip);
  auto opts = XH.options();
  at::Tensor out = at::empty({B, T, H}, opts);
  at::Tensor hT = at::empty({B, H}, opts);
  at::Tensor R = at::empty({B, G}, opts);
  at::Tensor R2 = at::empty({fgr ? B : 0, 3 * H}, opts);
  XH[0].narrow(1, I, H).copy_(h0);
  Cprev[0].copy_(c0);
  if (fgr) S[0].copy_(s0);
  float *s_all = fgr ? S.data_ptr<float>() : nullptr, *r2_p = R2.data_ptr<float>();
  const float* bs = bias.data_ptr<float>();
  const float *wci = pi ? w_ci.data_ptr<float>() : nullptr, *wcf = pf ? w_cf.data_ptr<float>() : nullptr,
              *wco = po ? w_co.data_ptr<float>() : nullptr;
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  float *xh = XH.data_ptr<float>(), *c_all = Cprev.data_ptr<float>(), *ac_all = Acts.data_ptr<float>(),
        *tc_all = Tc.data_ptr<float>(), *op = out.data_ptr<float>(), *r_p = R.data_ptr<float>();
  with_variant(variant, [&](auto vc) {
    using S = Spec<decltype(vc)::value>;
    TORCH_CHECK(G == S::gates * H, "lstm kernel: ", G, " weight rows for ", S::gates, " gates of ", H);
    TORCH_CHECK(fgr == S::gate_rec, "lstm kernel: W_gr is for FGR only, and FGR needs it");
    const PackedB w_cat = pack_b(W_cat.data_ptr<float>(), W, G, true);  // the weights as stored, read transposed
    const PackedB w_gr = S::gate_rec ? pack_b(W_gr.data_ptr<float>(), 3 * H, 3 * H, true) : PackedB{};
    // step t for rows [b0, b1): everything after the step's GEMMs
    auto step_rows = [&](int64_t t, int64_t b0, int64_t b1) {
      const bool last = t + 1 == T;
      float* hn = last ? hT.data_ptr<float>() : xh + (t + 1) * B * W + I;  // rows hn_row apart
      const int64_t hn_row = last ? H : W;
      float* cn = c_all + (t + 1) * B * H;
      const float *hp = xh + t * B * W + I, *cp = c_all + t * B * H;  // rows W apart
      float *ac = ac_all + t * B * 4 * H, *tcp = tc_all + t * B * H;
      {
        for (int64_t b = b0; b < b1; ++b) {
          float* o = op + (b * T + t) * H;
          if (masked && !vp[t * B + b]) {  // past this row's length: carry the state, output zeros
            std::copy(hp + b * W, hp + b * W + H, hn + b * hn_row);
            std::copy(cp + b * H, cp + (b + 1) * H, cn + b * H);
            if constexpr (S::gate_rec)
              std::copy(s_all + (t * B + b) * 3 * H, s_all + (t * B + b + 1) * 3 * H, s_all + ((t + 1) * B + b) * 3 * H);
            std::fill(o, o + H, 0.f);
            continue;
          }
          const float *r = r_p + b * G, *c = cp + b * H;
          const float* r2 = S::gate_rec ? r2_p + b * 3 * H : nullptr;  // s_{t-1} W_gr^T: i, f, o
          float* sn = S::gate_rec ? s_all + ((t + 1) * B + b) * 3 * H : nullptr;
          float *acb = ac + b * 4 * H, *cnb = cn + b * H, *tcb = tcp + b * H, *hnb = hn + b * hn_row;
          const int64_t zrow = (t * B + b) * H;  // this row's zoneout draws and pre-zoning cell
          const float *zh = zoned ? Zh.data_ptr<float>() + zrow : nullptr,
                      *zc = zoned ? Zc.data_ptr<float>() + zrow : nullptr, *hpb = hp + b * W;
          float* cwb = zoned ? Cnew.data_ptr<float>() + zrow : nullptr;
          const float* mh = sdrop ? Mh.data_ptr<float>() + zrow : nullptr;
          lanes(H, [&](auto* tag, int64_t k) {
            using Tp = std::remove_pointer_t<decltype(tag)>;
            auto pre = [&](int block) { return ld(r + block * H + k, tag) + ld(bs + block * H + k, tag); };
            Tp cprev = ld(c + k, tag), si(1.f), sf(1.f), so(1.f);
            if constexpr (S::has_i) {
              Tp p = pre(S::oi);
              if constexpr (S::gate_rec) p = p + ld(r2 + k, tag);
              if (pi) p = p + ld(wci + k, tag) * cprev;
              si = sigm(p);
            }
            if constexpr (S::has_f) {
              Tp p = pre(S::of);
              if constexpr (S::gate_rec) p = p + ld(r2 + H + k, tag);
              if (pf) p = p + ld(wcf + k, tag) * cprev;
              sf = sigm(p + Tp(fb));
            } else if constexpr (S::coupled) {
              sf = Tp(1.f) - si;
            }
            Tp tg = pre(S::og);
            if constexpr (S::act_g) tg = tanh_e(tg);
            Tp cnew = sf * cprev + si * tg;
            if (clipped) cnew = clip_to(cnew, cc);
            if constexpr (S::has_o) {
              Tp p = pre(S::oo);
              if constexpr (S::gate_rec) p = p + ld(r2 + 2 * H + k, tag);
              if (po) p = p + ld(wco + k, tag) * cnew;
              so = sigm(p);
            }
            if constexpr (S::gate_rec) {
              st(sn + k, si);
              st(sn + H + k, sf);
              st(sn + 2 * H + k, so);
            }
            Tp tc = cnew;
            if constexpr (S::act_c) tc = tanh_e(cnew);
            Tp h = so * tc;
            st(acb + k, si);
            st(acb + H + k, sf);
            st(acb + 2 * H + k, tg);
            st(acb + 3 * H + k, so);
            if (zoned) {  // the state keeps part of the previous one; the output is the zoned h
              st(cwb + k, cnew);
              cnew = lerp_as_torch(cnew, cprev, ld(zc + k, tag));
              h = lerp_as_torch(h, ld(hpb + k, tag), ld(zh + k, tag));
            }
            st(cnb + k, cnew);
            st(tcb + k, tc);
            st(hnb + k, sdrop ? h * ld(mh + k, tag) : h);  // the state passed on; the output is h
            st(o + k, h);
          });
        }
      }
    };
    if (rows_apart(B)) {  // each thread its own rows, through every step
      per_thread_rows(B, [&](int64_t b0, int64_t b1) {
        for (int64_t t = 0; t < T; ++t) {
          gemm_rows(xh + t * B * W, w_cat, r_p, b0, b1);  // step t's rows [x_t, h_{t-1}]
          if constexpr (S::gate_rec) gemm_rows(s_all + t * B * 3 * H, w_gr, r2_p, b0, b1);
          step_rows(t, b0, b1);
        }
      });
    } else {
      for (int64_t t = 0; t < T; ++t) {
        gemm_packed(xh + t * B * W, w_cat, r_p, B);  // step t's rows [x_t, h_{t-1}]
        if constexpr (S::gate_rec) gemm_packed(s_all + t * B * 3 * H, w_gr, r2_p, B);
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { step_rows(t, b0, b1); });
      }
    }
  });
  return {out, hT, Cprev[T].clone(), fgr ? S[T].clone() : at::empty({0}, opts)};
}

// Gradients of lstm_forward: returns dx (T, B, I; time-major; undefined unless with_dx: the input's gradient, one
// more GEMM of each step's, dG_t W_ih over the gates' pre-activation gradient the step just made), dh0, dc0,
// d[W_ih W_hh] (nH, I + H: one GEMM after the loop, dG^T over XH's rows [x_t, h_{t-1}]), dbias, dw_ci, dw_cf,
// dw_co (each peephole's gradient is zeros where forward had no such weight), ds0, dW_gr (FGR; else empty). For
// FGR, dQ (T, B, 3H) is a work buffer; the saved tensors are left as they were.
// Zoneout: Zh, Zc and Cnew as in lstm_forward (else empty); the part of h's gradient a unit keeps goes straight to
// the previous step (Carry, (B, H)). Where the cell clip held the new cell at ±cell_clip its gradient stops
// (torch.clamp's, except at exactly ±cell_clip unclipped).
std::vector<at::Tensor> lstm_backward(const at::Tensor& dout_in, const at::Tensor& dhT, const at::Tensor& dcT,
                                      const at::Tensor& W_hh, const at::Tensor& w_ci, const at::Tensor& w_cf,
                                      const at::Tensor& w_co, double cell_clip, int64_t variant,
                                      const at::Tensor& dsT, const at::Tensor& W_gr, const at::Tensor& XH,
                                      const at::Tensor& Cprev, const at::Tensor& Acts, const at::Tensor& Tc,
                                      const at::Tensor& S, const at::Tensor& Zh, const at::Tensor& Zc,
                                      const at::Tensor& Cnew, const at::Tensor& Mh, const at::Tensor& valid,
                                      const at::Tensor& dQ, const at::Tensor& W_ih, bool with_dx) {
  for (auto* p : {&W_hh, &W_ih, &XH, &Cprev, &Acts, &Tc}) check(*p, "every tensor");
  const bool fgr = W_gr.numel() > 0;
  if (fgr)
    for (auto* p : {&W_gr, &S, &dQ}) check(*p, "an FGR tensor");
  const bool zoned = Zh.numel() > 0, sdrop = Mh.numel() > 0;
  const bool pi = w_ci.numel() > 0, pf = w_cf.numel() > 0, po = w_co.numel() > 0;
  at::Tensor dout = dout_in.contiguous();
  const int64_t T = XH.size(0), B = XH.size(1), W = XH.size(2), H = W_hh.size(1), G = W_hh.size(0);
  check_state_wrappers(Zh, Zc, Cnew, Mh, T, B, H);
  const bool masked = valid.numel() > 0, clipped = cell_clip > 0;
  const float cc = static_cast<float>(cell_clip);
  auto opts = XH.options();
  const int nthreads = at::get_num_threads();
  // with the micro-kernel, dG's rows are stored by panels as each is done, for [W_ih W_hh]'s gradient (gemm_tn),
  // and only the step's row-major (one B x nH buffer), for the step's GEMMs; elsewhere the whole of dG, row-major
  const bool dg_whole = !kByPanels;
  at::Tensor dG = at::empty({dg_whole ? T : 1, B, G}, opts);
  at::Tensor dGp = at::empty({kByPanels ? panel_count(G) : 0, T * B, kPanel}, opts);
  float* dgp = dGp.data_ptr<float>();
  const int64_t I = W_ih.size(1);
  at::Tensor dx = at::empty({with_dx ? T : 0, B, I}, opts);
  float* dx_p = dx.data_ptr<float>();
  const PackedB w_ih = with_dx ? pack_b(W_ih.data_ptr<float>(), G, I, false) : PackedB{};  // dx_t = dG_t W_ih
  at::Tensor dH = dhT.contiguous().clone(), dC = dcT.contiguous().clone(), dHn = at::empty({B, H}, opts);
  // per thread: the peepholes' gradients, and one step's rows of the bias' (then added to a float64 sum, so that a
  // long sequence's sum keeps its precision)
  at::Tensor part = at::zeros({nthreads, 3 * H + G}, opts);
  at::Tensor bias_sum = at::zeros({nthreads, G}, opts.dtype(at::kDouble));
  double* bsum_all = bias_sum.data_ptr<double>();
  // FGR: the gradient of the gate state s_t, (B, 3H), carried backwards like dH
  at::Tensor dS = fgr ? dsT.contiguous().clone() : at::empty({0}, opts), dSn = at::empty({fgr ? B : 0, 3 * H}, opts);
  float* dq_all = fgr ? dQ.data_ptr<float>() : nullptr;
  at::Tensor Carry = at::empty({zoned ? B : 0, H}, opts);  // zoneout: h's gradient that skips the step
  float* carry = Carry.data_ptr<float>();
  const float *wci = pi ? w_ci.data_ptr<float>() : nullptr, *wcf = pf ? w_cf.data_ptr<float>() : nullptr,
              *wco = po ? w_co.data_ptr<float>() : nullptr, *do_p = dout.data_ptr<float>();
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  const float *c_all = Cprev.data_ptr<float>(), *ac_all = Acts.data_ptr<float>(), *tc_all = Tc.data_ptr<float>();
  float *dg_all = dG.data_ptr<float>(), *part_all = part.data_ptr<float>();
  auto dg_step = [&](int64_t t) { return dg_all + (dg_whole ? t : 0) * B * G; };  // step t's rows of dG
  with_variant(variant, [&](auto vc) {
    using S = Spec<decltype(vc)::value>;
    TORCH_CHECK(G == S::gates * H, "lstm kernel: ", G, " recurrent weight rows for ", S::gates, " gates of ", H);
    TORCH_CHECK(fgr == S::gate_rec, "lstm kernel: W_gr is for FGR only, and FGR needs it");
    const PackedB w_hh = pack_b(W_hh.data_ptr<float>(), G, H, false);
    const PackedB w_gr = S::gate_rec ? pack_b(W_gr.data_ptr<float>(), 3 * H, 3 * H, false) : PackedB{};
    float* dc = dC.data_ptr<float>();
    // step t for rows [b0, b1), from h's gradient dh and FGR's gate state's ds: everything before the step's GEMMs
    auto step_rows = [&](int64_t t, const float* dh, const float* ds, int64_t b0, int64_t b1) {
      const float *cp = c_all + t * B * H, *cn = c_all + (t + 1) * B * H, *ac = ac_all + t * B * 4 * H,
                  *tcp = tc_all + t * B * H;
      float* dq = fgr ? dq_all + t * B * 3 * H : nullptr;
      {
        const int tid = at::get_thread_num();
        float* pp = part_all + tid * (3 * H + G);  // d w_ci, d w_cf, d w_co
        float* pb = pp + 3 * H;                    // d bias, this step's rows
        std::fill(pb, pb + G, 0.f);
        for (int64_t b = b0; b < b1; ++b) {
          float* dgb = dg_step(t) + b * G;
          if (masked && !vp[t * B + b]) {  // the state was carried: its gradient passes straight through
            std::fill(dgb, dgb + G, 0.f);
            if (kByPanels) store_panels(dgb, G, dgp, T * B, t * B + b);
            if constexpr (S::gate_rec) std::fill(dq + b * 3 * H, dq + (b + 1) * 3 * H, 0.f);
            continue;
          }
          const float* dsb = S::gate_rec ? ds + b * 3 * H : nullptr;  // into this step's [i f o]
          float* dqb = S::gate_rec ? dq + b * 3 * H : nullptr;
          const int64_t zrow = (t * B + b) * H;
          const float *acb = ac + b * 4 * H, *cpb = cp + b * H, *tcb = tcp + b * H, *dob = do_p + (b * T + t) * H,
                      *cnb = zoned ? Cnew.data_ptr<float>() + zrow : cn + b * H,  // the cell before zoning
                      *zh = zoned ? Zh.data_ptr<float>() + zrow : nullptr, *zc = zoned ? Zc.data_ptr<float>() + zrow : nullptr;
          float* cab = zoned ? carry + b * H : nullptr;
          const float* mh = sdrop ? Mh.data_ptr<float>() + zrow : nullptr;
          const float* dhb = dh + b * H;
          float* dcb = dc + b * H;
          lanes(H, [&](auto* tag, int64_t k) {
            using Tp = std::remove_pointer_t<decltype(tag)>;
            auto put = [&](int block, const Tp& v) {
              const int64_t i = block * H + k;
              st(dgb + i, v);
              st(pb + i, ld(pb + i, tag) + v);
            };
            Tp si = ld(acb + k, tag), sf = ld(acb + H + k, tag), tg = ld(acb + 2 * H + k, tag),
               so = ld(acb + 3 * H + k, tag), tc = ld(tcb + k, tag), cprev = ld(cpb + k, tag);
            Tp dstate = ld(dhb + k, tag);  // the gradient of the h passed on
            if (sdrop) dstate = dstate * ld(mh + k, tag);
            Tp d = dstate + ld(dob + k, tag), dcin = ld(dcb + k, tag), dckeep(0.f);
            if (zoned) {  // state = new + z (previous - new): (1 - z) of the gradient to the new, z to the previous
              Tp z = ld(zh + k, tag);
              st(cab + k, z * d);
              d = d - z * d;
              z = ld(zc + k, tag);
              dckeep = z * dcin;
              dcin = dcin - dckeep;
            }
            Tp dcn = dcin + (S::act_c ? d * so * (Tp(1.f) - tc * tc) : d * so);
            Tp dpo(0.f);
            if constexpr (S::has_o) {
              Tp dso = d * tc;
              if constexpr (S::gate_rec) dso = dso + ld(dsb + 2 * H + k, tag);
              dpo = dso * so * (Tp(1.f) - so);
              if (po) dcn = dcn + dpo * ld(wco + k, tag);
            }
            if (clipped) dcn = where_unclipped(dcn, ld(cnb + k, tag), cc);  // zero where the clip held it
            Tp dcp = dcn * sf + dckeep;
            if constexpr (S::has_i) {
              Tp dsi = dcn * tg;
              if constexpr (S::coupled) dsi = dsi - dcn * cprev;  // f = 1 - i
              if constexpr (S::gate_rec) dsi = dsi + ld(dsb + k, tag);
              Tp dpi = dsi * si * (Tp(1.f) - si);
              if constexpr (S::gate_rec) st(dqb + k, dpi);
              if (pi) {
                dcp = dcp + dpi * ld(wci + k, tag);
                st(pp + k, ld(pp + k, tag) + dpi * cprev);
              }
              put(S::oi, dpi);
            }
            if constexpr (S::has_f) {
              Tp dsf = dcn * cprev;
              if constexpr (S::gate_rec) dsf = dsf + ld(dsb + H + k, tag);
              Tp dpf = dsf * sf * (Tp(1.f) - sf);
              if constexpr (S::gate_rec) st(dqb + H + k, dpf);
              if (pf) {
                dcp = dcp + dpf * ld(wcf + k, tag);
                st(pp + H + k, ld(pp + H + k, tag) + dpf * cprev);
              }
              put(S::of, dpf);
            }
            put(S::og, S::act_g ? dcn * si * (Tp(1.f) - tg * tg) : dcn * si);
            if constexpr (S::has_o) {
              if (po) st(pp + 2 * H + k, ld(pp + 2 * H + k, tag) + dpo * ld(cnb + k, tag));
              put(S::oo, dpo);
              if constexpr (S::gate_rec) st(dqb + 2 * H + k, dpo);
            }
            st(dcb + k, dcp);
          });
          if (kByPanels) store_panels(dgb, G, dgp, T * B, t * B + b);
        }
        fence_streams();  // the panels, before gemm_tn reads them (on whichever thread)
        double* bsum = bsum_all + tid * G;
        for (int64_t i = 0; i < G; ++i) bsum[i] += pb[i];
      }
    };
    // after the step's GEMMs (dhn = dh's through W_hh, dsn = ds's through W_gr), rows [b0, b1): zoneout's kept
    // part of h's gradient, past the step; rows past their length carry dh (and ds) unchanged
    auto after_rows = [&](int64_t t, const float* dh, float* dhn, const float* ds, float* dsn, int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (masked && !vp[t * B + b]) {
          std::copy(dh + b * H, dh + (b + 1) * H, dhn + b * H);
          if constexpr (S::gate_rec) std::copy(ds + b * 3 * H, ds + (b + 1) * 3 * H, dsn + b * 3 * H);
        } else if (zoned) {
          lanes(H, [&](auto* tag, int64_t k) { st(dhn + b * H + k, ld(dhn + b * H + k, tag) + ld(carry + b * H + k, tag)); });
        }
      }
    };
    float *dh_p = dH.data_ptr<float>(), *dhn_p = dHn.data_ptr<float>();
    float *ds_p = fgr ? dS.data_ptr<float>() : nullptr, *dsn_p = fgr ? dSn.data_ptr<float>() : nullptr;
    if (rows_apart(B)) {  // each thread its own rows, through every step (the gradients' buffers swapped per thread)
      per_thread_rows(B, [&](int64_t b0, int64_t b1) {
        float *dh = dh_p, *dhn = dhn_p, *ds = ds_p, *dsn = dsn_p;
        for (int64_t t = T - 1; t >= 0; --t) {
          step_rows(t, dh, ds, b0, b1);
          gemm_rows(dg_step(t), w_hh, dhn, b0, b1);
          if (with_dx) gemm_rows(dg_step(t), w_ih, dx_p + t * B * I, b0, b1);
          // s_{t-1}'s gradient: this step's [i f o] pre-activations' through W_gr
          if constexpr (S::gate_rec) gemm_rows(dq_all + t * B * 3 * H, w_gr, dsn, b0, b1);
          after_rows(t, dh, dhn, ds, dsn, b0, b1);
          std::swap(dh, dhn);
          std::swap(ds, dsn);
        }
      });
    } else {
      float *dh = dh_p, *dhn = dhn_p, *ds = ds_p, *dsn = dsn_p;
      for (int64_t t = T - 1; t >= 0; --t) {
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { step_rows(t, dh, ds, b0, b1); });
        gemm_packed(dg_step(t), w_hh, dhn, B);
        if (with_dx) gemm_packed(dg_step(t), w_ih, dx_p + t * B * I, B);
        if constexpr (S::gate_rec) gemm_packed(dq_all + t * B * 3 * H, w_gr, dsn, B);
        if (masked || zoned)
          at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { after_rows(t, dh, dhn, ds, dsn, b0, b1); });
        std::swap(dh, dhn);
        std::swap(ds, dsn);
      }
    }
    if (T % 2 == 1) {  // the last step's gradients are in the second buffers
      std::swap(dH, dHn);
      std::swap(dS, dSn);
    }
  });
  // [W_ih W_hh]'s gradient, from the panels (or the whole dG, row-major)
  at::Tensor dW = gemm_tn_of(XH.view({T * B, W}), kByPanels ? dgp : dg_all, G, kByPanels).t().contiguous();
  at::Tensor dpeep = part.narrow(1, 0, 3 * H).sum(0).view({3, H}), dbias = bias_sum.sum(0).to(at::kFloat);
  if (!with_dx) dx = at::Tensor();
  if (!fgr) return {dx, dH, dC, dW, dbias, dpeep[0], dpeep[1], dpeep[2], dS, dS};
  at::Tensor dWgr = gemm_tn(S.narrow(0, 0, T).reshape({T * B, 3 * H}), dQ.view({T * B, 3 * H})).t().contiguous();
  return {dx, dH, dC, dW, dbias, dpeep[0], dpeep[1], dpeep[2], dS, dWgr};
}

// Zoneout's draws for a (T, B, H) sequence: 1 where a unit keeps its previous h (probability ph) or c (pc), else
// 0. splitmix64's stream from the seed, one 64-bit value per unit and step (its top 24 bits h's uniform, the next
// 24 c's), so the draws are the same on any number of threads; several times faster than torch.rand's.
std::vector<at::Tensor> zoneout_draws(int64_t seed, int64_t T, int64_t B, int64_t H, double ph, double pc) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor Zh = at::empty({T, B, H}, opts), Zc = at::empty({T, B, H}, opts);
  float *zh = Zh.data_ptr<float>(), *zc = Zc.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t th = static_cast<uint64_t>(std::llround(ph * 16777216.0)),  // p in units of 2^-24
      tc = static_cast<uint64_t>(std::llround(pc * 16777216.0));
  at::parallel_for(0, T * B * H, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      uint64_t x = s + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
      x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
      x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
      x ^= x >> 31;
      zh[i] = (x >> 40) < th ? 1.f : 0.f;
      zc[i] = ((x >> 16) & 0xFFFFFFull) < tc ? 1.f : 0.f;
    }
  });
  return {Zh, Zc};
}
