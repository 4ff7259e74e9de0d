// Fused layer-norm LSTM sequence for the CPU: forward and backward over a whole sequence, float32.
//
// The arithmetic of rnnsearch.cells.ln_lstm.LayerNormLSTMCell (gate blocks normalised on their own, the cell state
// once more), optionally under a ZoneoutWrapper or a DropoutWrapper's state dropout (the state it passes on zoned or
// dropped here, as lstm.h does), with each step's GEMMs (the input's products, the recurrent ones) through common.h's
// micro-kernel, each thread taking its own batch rows through the sequence where rows_apart holds, else split over the
// threads step by step (gemm_packed; gemm_cols without AVX-512), and everything between two GEMMs done in one pass per
// batch row, vectorised with ATen's own at::vec (exp as inductor's exp_u20, tanh and sigmoid in exp form, as
// rnnsearch.compile's inductor options). The backward pass accumulates the gains' and bias' gradients per thread while
// each row is in cache, makes the input's gradient with one more GEMM each step, and computes both weights' gradients
// in one GEMM each after the loop. Built and loaded by rnnsearch.cells.ln_lstm_kernel; the extension's one translation
// unit, it also binds the `lstm` kernel of lstm.h.
#include "common.h"
#include "lstm.h"

namespace {
// Per row and step: rstd of the 4 input blocks, of the 4 recurrent ones, of the cell; the 4 input blocks' means,
// the cell's mean.
constexpr int64_t STATS = 14;
}  // namespace


// x (B, T, I) the input, W_ih (4H, I); h0, c0 (B, H); valid (T, B) bool or empty. Each step's input products
// x_t W_ih^T are one more GEMM of the step's (a narrow input's product over the whole sequence is slow, and its
// pass over memory costs more than the step's GEMM). Fills the saved tensors (A (T, B, 4H): the input products;
// Hprev (T, B, H): h_{t-1}; Cprev (T + 1, B, H): c_{t-1}, then c_T; Rhat, Acts (T, B, 4H); Tc (T, B, H): tanh of
// the normalised cell; Stats (T, B, STATS); Cnew, zoneout only (else empty): (T, B, H), the cell before zoning)
// and returns out (B, T, H), hT, cT. Zoneout (else both empty): Zh, Zc (T, B, H), how much of the previous h and c
// each unit keeps (a 0/1 draw in training, the probability in eval), state = lerp(new, previous, z), the output the
// zoned h (a ZoneoutWrapper's arithmetic); Cprev then holds the zoned cell. State dropout (else empty): Mh (T, B, H),
// the multiplier of the h passed on as state (0 or 1 / keep), the output the h before it (a DropoutWrapper's
// state_keep_prob). Not both: lstm.h's conventions.
std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& x, const at::Tensor& W_ih, const at::Tensor& h0,
                                        const at::Tensor& c0, const at::Tensor& W_hh, const at::Tensor& g_ih,
                                        const at::Tensor& g_hh, const at::Tensor& bias, const at::Tensor& g_c,
                                        const at::Tensor& b_c, const at::Tensor& valid, double forget_bias,
                                        double eps_d, const at::Tensor& Zh, const at::Tensor& Zc,
                                        const at::Tensor& Mh, const at::Tensor& A, const at::Tensor& Hprev,
                                        const at::Tensor& Cprev, const at::Tensor& Rhat, const at::Tensor& Acts,
                                        const at::Tensor& Tc, const at::Tensor& Stats, const at::Tensor& Cnew) {
  for (auto* p : {&x, &W_ih, &A, &h0, &c0, &W_hh, &g_ih, &g_hh, &bias, &g_c, &b_c, &Hprev, &Cprev, &Rhat, &Acts,
                  &Tc, &Stats})
    check(*p, "every tensor");
  const bool zoned = Zh.numel() > 0, sdrop = Mh.numel() > 0;
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), G = W_hh.size(0), H = G / 4;
  check_state_wrappers(Zh, Zc, Cnew, Mh, T, B, H);
  TORCH_CHECK(W_ih.size(0) == G && W_ih.size(1) == I && A.size(0) == T && A.size(1) == B && A.size(2) == G,
              "ln_lstm kernel: input ", x.sizes(), ", W_ih ", W_ih.sizes(), ", A ", A.sizes(), " for ", H, " units");
  const bool masked = valid.numel() > 0;
  const float fb = static_cast<float>(forget_bias), eps = static_cast<float>(eps_d);
  auto opts = A.options();
  at::Tensor out = at::empty({B, T, H}, opts);
  at::Tensor hT = at::empty({B, H}, opts);
  at::Tensor R = at::empty({B, G}, opts);
  Hprev[0].copy_(h0);
  Cprev[0].copy_(c0);
  const float *gih = g_ih.data_ptr<float>(), *ghh = g_hh.data_ptr<float>(), *bs = bias.data_ptr<float>(),
              *gc = g_c.data_ptr<float>(), *bc = b_c.data_ptr<float>();
  float* a_p = A.data_ptr<float>();
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  // step t's slices by pointer arithmetic: a tensor per slice would cost microseconds a step
  float *h_all = Hprev.data_ptr<float>(), *c_all = Cprev.data_ptr<float>(), *rh_all = Rhat.data_ptr<float>(),
        *ac_all = Acts.data_ptr<float>(), *tc_all = Tc.data_ptr<float>(), *s_all = Stats.data_ptr<float>(),
        *op = out.data_ptr<float>(), *r_p = R.data_ptr<float>();
  const float *zh_all = zoned ? Zh.data_ptr<float>() : nullptr, *zc_all = zoned ? Zc.data_ptr<float>() : nullptr,
              *mh_all = sdrop ? Mh.data_ptr<float>() : nullptr;
  float* cw_all = zoned ? Cnew.data_ptr<float>() : nullptr;
  const PackedB w_hh = pack_b(W_hh.data_ptr<float>(), H, G, true);  // the weights as stored, read transposed
  const PackedB w_ih = pack_b(W_ih.data_ptr<float>(), I, G, true);
  const float* x_p = x.data_ptr<float>();
  // step t for rows [b0, b1): everything after the step's GEMMs
  auto step_rows = [&](int64_t t, int64_t b0, int64_t b1) {
    float* hn = t + 1 < T ? h_all + (t + 1) * B * H : hT.data_ptr<float>();
    float* cn = c_all + (t + 1) * B * H;
    const float *hp = h_all + t * B * H, *cp = c_all + t * B * H;
    float *rh = rh_all + t * B * G, *ac = ac_all + t * B * G, *tcp = tc_all + t * B * H, *sp = s_all + t * B * STATS;
    {
      for (int64_t b = b0; b < b1; ++b) {
        float* o = op + (b * T + t) * H;
        if (masked && !vp[t * B + b]) {  // past this row's length: carry the state, output zeros
          std::copy(hp + b * H, hp + (b + 1) * H, hn + b * H);
          std::copy(cp + b * H, cp + (b + 1) * H, cn + b * H);
          std::fill(o, o + H, 0.f);
          continue;
        }
        const float *a = a_p + (t * B + b) * G, *r = r_p + b * G;
        float *rhb = rh + b * G, *acb = ac + b * G, *s = sp + b * STATS;
        float ma[4], mr[4];
        for (int j = 0; j < 4; ++j) {
          s[j] = row_stats(a + j * H, H, eps, ma + j);
          s[4 + j] = row_stats(r + j * H, H, eps, mr + j);
          s[9 + j] = ma[j];
        }
        const float* c = cp + b * H;
        const int64_t zrow = (t * B + b) * H;  // this row's zoneout draws, pre-zoning cell, state dropout
        float *cnb = cn + b * H, *cwb = zoned ? cw_all + zrow : cnb;  // the cell passed on; the cell before zoning
        Acc csum;
        // the gates: both products normalised on the fly (r̂ saved for backward), then the new cell
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp pre[4];
          for (int j = 0; j < 4; ++j) {
            const int64_t i = j * H + k;
            Tp rhat = (ld(r + i, tag) - Tp(mr[j])) * Tp(s[4 + j]);
            st(rhb + i, rhat);
            pre[j] = (ld(a + i, tag) - Tp(ma[j])) * Tp(s[j]) * ld(gih + i, tag) + ld(bs + i, tag) +
                     rhat * ld(ghh + i, tag);
          }
          Tp si = sigm(pre[0]), sf = sigm(pre[1] + Tp(fb)), tg = tanh_e(pre[2]), so = sigm(pre[3]);
          st(acb + k, si);
          st(acb + H + k, sf);
          st(acb + 2 * H + k, tg);
          st(acb + 3 * H + k, so);
          Tp cnew = sf * ld(c + k, tag) + si * tg;
          st(cwb + k, cnew);
          csum.add(cnew);
        });
        const float mc = csum.total() / H;
        const float rc = 1.f / std::sqrt(row_sum(cwb, H, [mc](const auto& v) {
                                            using Tp = std::decay_t<decltype(v)>;
                                            Tp d = v - Tp(mc);
                                            return d * d;
                                          }) / H + eps);
        s[8] = rc;
        s[13] = mc;
        float *hnb = hn + b * H, *tcb = tcp + b * H;
        const float *zh = zoned ? zh_all + zrow : nullptr, *zc = zoned ? zc_all + zrow : nullptr,
                    *mh = sdrop ? mh_all + zrow : nullptr, *hpb = hp + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp cnew = ld(cwb + k, tag);
          Tp chat = (cnew - Tp(mc)) * Tp(rc);
          Tp tc = tanh_e(chat * ld(gc + k, tag) + ld(bc + k, tag));
          st(tcb + k, tc);
          Tp h = ld(acb + 3 * H + k, tag) * tc;
          if (zoned) {  // the state keeps part of the previous one; the output is the zoned h
            st(cnb + k, lerp_as_torch(cnew, ld(c + k, tag), ld(zc + k, tag)));
            h = lerp_as_torch(h, ld(hpb + k, tag), ld(zh + k, tag));
          }
          st(hnb + k, sdrop ? h * ld(mh + k, tag) : h);  // the state passed on; the output is h
          st(o + k, h);
        });
      }
    }
  };
  if (rows_apart(B)) {  // each thread its own rows, through every step
    per_thread_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t t = 0; t < T; ++t) {
        gemm_rows(x_p + t * I, w_ih, a_p + t * B * G, b0, b1, T * I);  // x_t's rows, T * I apart
        gemm_rows(h_all + t * B * H, w_hh, r_p, b0, b1);
        step_rows(t, b0, b1);
      }
    });
  } else {
    for (int64_t t = 0; t < T; ++t) {
      gemm_packed(x_p + t * I, w_ih, a_p + t * B * G, B, T * I);  // x_t's rows, T * I apart
      gemm_packed(h_all + t * B * H, w_hh, r_p, B);
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { step_rows(t, b0, b1); });
    }
  }
  return {out, hT, Cprev[T].clone()};
}

// Gradients of ln_lstm_forward: returns dx (B, T, I; undefined unless with_dx), dh0, dc0, dW_ih (undefined unless
// with_dw_ih), dW_hh, dg_ih, dg_hh, dbias, dg_c, db_c. Zoneout's Zh, Zc, Cnew and state dropout's Mh as there (else
// empty): the part of h's gradient a unit keeps goes straight to the previous step (Carry, (B, H)), the part of c's
// with it. x and W_ih are the forward's, dR a work buffer of
// dr_numel(T, B, H) floats; every saved tensor is left as it was (a second backward with retain_graph reads them
// again). x's gradient is one more GEMM of each step's, dA_t W_ih over the rows the step just made.
// Each layer norm's backward, rstd * (dy - mean(dy) - ŷ * mean(dy * ŷ)) with dy = gradient * gain, takes two
// passes: the sums ride along with the pass that makes dy, the result with the pass that uses it; the
// normalised values (ŷ of the input products and of the cell) are recomputed from the stats, not saved.
// With the micro-kernel, the weights' gradients read the products' gradients dR and dA stored by panels
// (store_panels, as each row is done): dR in the work buffer, dA in one of its own; each step's rows of both also
// row-major in a B x 4H buffer each, for the step's GEMMs. Elsewhere dR is (T, B, 4H) and dA (B, T, 4H), row-major.
int64_t dr_numel(int64_t T, int64_t B, int64_t H) { return T * B * (kByPanels ? panel_count(4 * H) * kPanel : 4 * H); }

std::vector<at::Tensor> ln_lstm_backward(const at::Tensor& dout_in, const at::Tensor& dhT, const at::Tensor& dcT,
                                         const at::Tensor& x, const at::Tensor& W_ih, const at::Tensor& W_hh,
                                         const at::Tensor& g_ih, const at::Tensor& g_hh, const at::Tensor& g_c,
                                         const at::Tensor& b_c, const at::Tensor& Zh, const at::Tensor& Zc,
                                         const at::Tensor& Mh,
                                         const at::Tensor& A, const at::Tensor& Hprev, const at::Tensor& Cprev,
                                         const at::Tensor& Rhat, const at::Tensor& Acts, const at::Tensor& Tc,
                                         const at::Tensor& Stats, const at::Tensor& Cnew, const at::Tensor& valid,
                                         const at::Tensor& dR, bool with_dx, bool with_dw_ih) {
  for (auto* p : {&x, &W_ih, &W_hh, &g_ih, &g_hh, &g_c, &A, &Hprev, &Cprev, &Rhat, &Acts, &Tc, &Stats, &dR})
    check(*p, "every tensor");
  const bool zoned = Zh.numel() > 0, sdrop = Mh.numel() > 0;
  at::Tensor dout = dout_in.contiguous();
  const int64_t T = Hprev.size(0), B = Hprev.size(1), H = Hprev.size(2), G = 4 * H, I = x.size(2);
  check_state_wrappers(Zh, Zc, Cnew, Mh, T, B, H);
  TORCH_CHECK(dR.numel() >= dr_numel(T, B, H), "ln_lstm kernel: dR holds ", dR.numel(), " floats, not ",
              dr_numel(T, B, H));
  const bool masked = valid.numel() > 0;
  auto opts = Hprev.options();
  const int nthreads = at::get_num_threads();
  // dA: by panels for W_ih's gradient and the step's rows for x's (else the whole of it, row-major); the step's dR
  at::Tensor dA = kByPanels ? at::empty({panel_count(G), B * T, kPanel}, opts) : at::empty({B, T, G}, opts);
  at::Tensor dAs = at::empty({kByPanels ? B : 0, G}, opts), dRs = at::empty({kByPanels ? B : 0, G}, opts);
  at::Tensor dx = at::empty({with_dx ? B : 0, T, I}, opts);
  at::Tensor dH = dhT.contiguous().clone(), dC = dcT.contiguous().clone(), dHn = at::empty({B, H}, opts);
  at::Tensor part4 = at::zeros({nthreads, 3, G}, opts), part1 = at::zeros({nthreads, 2, H}, opts);
  at::Tensor scratch = at::empty({nthreads, G + H}, opts);
  at::Tensor Carry = at::empty({zoned ? B : 0, H}, opts);  // zoneout: h's gradient that skips the step
  float* carry = Carry.data_ptr<float>();
  const float *zh_all = zoned ? Zh.data_ptr<float>() : nullptr, *zc_all = zoned ? Zc.data_ptr<float>() : nullptr,
              *mh_all = sdrop ? Mh.data_ptr<float>() : nullptr, *cw_all = zoned ? Cnew.data_ptr<float>() : nullptr;
  const float *gih = g_ih.data_ptr<float>(), *ghh = g_hh.data_ptr<float>(), *gc = g_c.data_ptr<float>(),
              *do_p = dout.data_ptr<float>(), *a_p = A.data_ptr<float>();
  const bool* vp = masked ? valid.data_ptr<bool>() : nullptr;
  const float *c_all = Cprev.data_ptr<float>(), *rh_all = Rhat.data_ptr<float>(), *ac_all = Acts.data_ptr<float>(),
              *tc_all = Tc.data_ptr<float>(), *s_all = Stats.data_ptr<float>();
  float *dr_all = dR.data_ptr<float>(), *da = dA.data_ptr<float>(), *p4_all = part4.data_ptr<float>(),
        *p1_all = part1.data_ptr<float>(), *scr_all = scratch.data_ptr<float>(), *drs = dRs.data_ptr<float>(),
        *das = dAs.data_ptr<float>(), *dx_p = dx.data_ptr<float>();
  // where row b of step t's dR and dA go, and where the step's GEMMs read them (rows G, or dA's T * G, apart)
  auto dr_row = [&](int64_t t, int64_t b) { return kByPanels ? drs + b * G : dr_all + (t * B + b) * G; };
  auto da_row = [&](int64_t t, int64_t b) { return kByPanels ? das + b * G : da + (b * T + t) * G; };
  const int64_t da_lda = kByPanels ? G : T * G;
  const PackedB w_hh = pack_b(W_hh.data_ptr<float>(), G, H, false);
  const PackedB w_ih = with_dx ? pack_b(W_ih.data_ptr<float>(), G, I, false) : PackedB{};  // dx_t = dA_t W_ih
  // step t's rows [b0, b1) of x's gradient, on the calling thread (rows of dx T * I apart)
  auto dx_rows = [&](int64_t t, int64_t b0, int64_t b1) {
    if (with_dx) gemm_rows(da_row(t, 0), w_ih, dx_p + t * I, b0, b1, da_lda, T * I);
  };
  // step t for rows [b0, b1), from h's gradient dh (rows of B x H): everything before the step's GEMM
  float* dc = dC.data_ptr<float>();
  auto step_rows = [&](int64_t t, const float* dh, int64_t b0, int64_t b1) {
    const float *cp = c_all + t * B * H, *cn = c_all + (t + 1) * B * H, *rh = rh_all + t * B * G,
                *ac = ac_all + t * B * G, *tcp = tc_all + t * B * H, *sp = s_all + t * B * STATS;
    {
      const int tid = at::get_thread_num();
      float* p4 = p4_all + tid * 3 * G;  // dbias, dg_hh, dg_ih partial sums
      float* p1 = p1_all + tid * 2 * H;  // dg_c, db_c
      float* dg = scr_all + tid * (G + H);  // the gates' gradient (4H)
      float* dcn = dg + G;                      // the gradient at the cell norm's output (H)
      for (int64_t b = b0; b < b1; ++b) {
        float *dab = da_row(t, b), *drb = dr_row(t, b);
        auto store_row = [&] {  // a finished row, on to the panels the weights' gradients read
          if (kByPanels) {
            store_panels(drb, G, dr_all, T * B, t * B + b);
            store_panels(dab, G, da, B * T, b * T + t);
          }
        };
        if (masked && !vp[t * B + b]) {  // the state was carried: its gradient passes straight through
          std::fill(dab, dab + G, 0.f);
          std::fill(drb, drb + G, 0.f);
          store_row();
          continue;
        }
        const int64_t zrow = (t * B + b) * H;
        const float *acb = ac + b * G, *tcb = tcp + b * H, *s = sp + b * STATS, *dob = do_p + (b * T + t) * H,
                    *cnb = zoned ? cw_all + zrow : cn + b * H,  // the cell before zoning
                    *zh = zoned ? zh_all + zrow : nullptr, *zc = zoned ? zc_all + zrow : nullptr,
                    *mh = sdrop ? mh_all + zrow : nullptr;
        float* cab = zoned ? carry + b * H : nullptr;
        const float* dhb = dh + b * H;
        float* dcb = dc + b * H;
        const float mc = s[13], rc = s[8];
        Acc c1, c2;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp chat = (ld(cnb + k, tag) - Tp(mc)) * Tp(rc);
          Tp tc = ld(tcb + k, tag);
          Tp dstate = ld(dhb + k, tag);  // the gradient of the h passed on
          if (sdrop) dstate = dstate * ld(mh + k, tag);
          Tp d = dstate + ld(dob + k, tag);
          if (zoned) {  // state = new + z (previous - new): (1 - z) of the gradient to the new, z to the previous
            Tp z = ld(zh + k, tag);
            st(cab + k, z * d);
            d = d - z * d;
          }
          Tp so = ld(acb + 3 * H + k, tag);
          Tp g = d * so * (Tp(1.f) - tc * tc);
          st(p1 + k, ld(p1 + k, tag) + g * chat);
          st(p1 + H + k, ld(p1 + H + k, tag) + g);
          st(dcn + k, g);
          st(dg + 3 * H + k, d * tc * so * (Tp(1.f) - so));  // do
          Tp dy = g * ld(gc + k, tag);
          c1.add(dy);
          c2.add(dy * chat);
        });
        const float cm1 = c1.total() / H, cm2 = c2.total() / H;
        const float* cpb = cp + b * H;
        lanes(H, [&](auto* tag, int64_t k) {
          using Tp = std::remove_pointer_t<decltype(tag)>;
          Tp chat = (ld(cnb + k, tag) - Tp(mc)) * Tp(rc);
          Tp dcin = ld(dcb + k, tag), dckeep(0.f);
          if (zoned) {  // likewise the cell's
            dckeep = ld(zc + k, tag) * dcin;
            dcin = dcin - dckeep;
          }
          Tp dct = dcin + Tp(rc) * (ld(dcn + k, tag) * ld(gc + k, tag) - Tp(cm1) - chat * Tp(cm2));
          Tp si = ld(acb + k, tag), sf = ld(acb + H + k, tag), tg = ld(acb + 2 * H + k, tag);
          st(dg + k, dct * tg * si * (Tp(1.f) - si));
          st(dg + H + k, dct * ld(cpb + k, tag) * sf * (Tp(1.f) - sf));
          st(dg + 2 * H + k, dct * si * (Tp(1.f) - tg * tg));
          st(dcb + k, dct * sf + dckeep);
        });
        const float* rhb = rh + b * G;
        const float* a = a_p + (t * B + b) * G;
        for (int j = 0; j < 4; ++j) {  // each gate block: its gains' and bias' sums, then both layer norms
          const float ma = s[9 + j], ra = s[j], rr = s[4 + j];
          Acc r1, r2, a1, a2;
          lanes(H, [&](auto* tag, int64_t k) {
            using Tp = std::remove_pointer_t<decltype(tag)>;
            const int64_t i = j * H + k;
            Tp g = ld(dg + i, tag), rhat = ld(rhb + i, tag), ahat = (ld(a + i, tag) - Tp(ma)) * Tp(ra);
            st(p4 + i, ld(p4 + i, tag) + g);
            st(p4 + G + i, ld(p4 + G + i, tag) + g * rhat);
            st(p4 + 2 * G + i, ld(p4 + 2 * G + i, tag) + g * ahat);
            Tp dyr = g * ld(ghh + i, tag), dya = g * ld(gih + i, tag);
            r1.add(dyr);
            r2.add(dyr * rhat);
            a1.add(dya);
            a2.add(dya * ahat);
          });
          const float rm1 = r1.total() / H, rm2 = r2.total() / H, am1 = a1.total() / H, am2 = a2.total() / H;
          lanes(H, [&](auto* tag, int64_t k) {
            using Tp = std::remove_pointer_t<decltype(tag)>;
            const int64_t i = j * H + k;
            Tp g = ld(dg + i, tag), rhat = ld(rhb + i, tag), ahat = (ld(a + i, tag) - Tp(ma)) * Tp(ra);
            st(drb + i, Tp(rr) * (g * ld(ghh + i, tag) - Tp(rm1) - rhat * Tp(rm2)));
            st(dab + i, Tp(ra) * (g * ld(gih + i, tag) - Tp(am1) - ahat * Tp(am2)));
          });
        }
        store_row();
      }
      fence_streams();  // the panels, before gemm_tn reads them (on whichever thread)
    }
  };
  // after the step's GEMM (dhn = dR W_hh): rows past their length carry dh unchanged; zoneout's kept part of h's
  // gradient goes past the step
  auto carry_rows = [&](int64_t t, const float* dh, float* dhn, int64_t b0, int64_t b1) {
    if (masked || zoned)
      for (int64_t b = b0; b < b1; ++b) {
        if (masked && !vp[t * B + b]) {
          std::copy(dh + b * H, dh + (b + 1) * H, dhn + b * H);
        } else if (zoned) {
          float* d = dhn + b * H;
          const float* kept = carry + b * H;
          lanes(H, [&](auto* tag, int64_t k) { st(d + k, ld(d + k, tag) + ld(kept + k, tag)); });
        }
      }
  };
  if (rows_apart(B)) {  // each thread its own rows, through every step (dH and dHn swapped per thread)
    per_thread_rows(B, [&](int64_t b0, int64_t b1) {
      float *dh = dH.data_ptr<float>(), *dhn = dHn.data_ptr<float>();
      for (int64_t t = T - 1; t >= 0; --t) {
        step_rows(t, dh, b0, b1);
        gemm_rows(dr_row(t, 0), w_hh, dhn, b0, b1);
        dx_rows(t, b0, b1);
        carry_rows(t, dh, dhn, b0, b1);
        std::swap(dh, dhn);
      }
    });
    if (T % 2 == 1) std::swap(dH, dHn);
  } else {
    for (int64_t t = T - 1; t >= 0; --t) {
      float *dh = dH.data_ptr<float>(), *dhn = dHn.data_ptr<float>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { step_rows(t, dh, b0, b1); });
      gemm_packed(dr_row(t, 0), w_hh, dhn, B);
      if (with_dx) gemm_packed(da_row(t, 0), w_ih, dx_p + t * I, B, da_lda, T * I);
      if (masked || zoned) at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { carry_rows(t, dh, dhn, b0, b1); });
      std::swap(dH, dHn);
    }
  }
  // the weights' gradients: x^T dA and h^T dR over every (row, step), in the orders their rows were stored in
  at::Tensor dW_hh = gemm_tn_of(Hprev.view({T * B, H}), dr_all, G, kByPanels).t().contiguous();
  at::Tensor dW_ih = with_dw_ih ? gemm_tn_of(x.view({B * T, I}), da, G, kByPanels).t().contiguous() : at::Tensor();
  at::Tensor s4 = part4.sum(0), s1 = part1.sum(0);
  return {with_dx ? dx : at::Tensor(), dH, dC, dW_ih, dW_hh, s4[2], s4[1], s4[0], s1[0], s1[1]};
}

// a (M, K) @ b: b (K, N), or with bt (N, K) used transposed; float32, contiguous. A whole sequence's product
// through the per-step GEMMs' micro-kernel (gemm_packed) where it is built, else at::mm. repeat > 1 computes it
// that many times over one packing of b, as the kernels' steps do (for scripts/bench.py's measure of it).
at::Tensor packed_mm(const at::Tensor& a, const at::Tensor& b, bool bt, int64_t repeat) {
  check(a, "packed_mm's a");
  check(b, "packed_mm's b");
  const int64_t M = a.size(0), K = a.size(1), N = bt ? b.size(0) : b.size(1);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && (bt ? b.size(1) : b.size(0)) == K, "packed_mm: ", a.sizes(), " @ ",
              b.sizes(), bt ? " transposed" : "");
#if defined(CPU_CAPABILITY_AVX512)
  at::Tensor c = at::empty({M, N}, a.options());
  const PackedB p = pack_b(b.data_ptr<float>(), K, N, bt);
  for (int64_t r = 0; r < std::max<int64_t>(repeat, 1); ++r) gemm_packed(a.data_ptr<float>(), p, c.data_ptr<float>(), M);
  return c;
#else
  at::Tensor c;
  for (int64_t r = 0; r < std::max<int64_t>(repeat, 1); ++r) c = bt ? at::mm(a, b.t()) : at::mm(a, b);
  return c;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // ATen's own calls need no GIL: other Python threads (a tracker's, say) run meanwhile
  m.def("forward", &ln_lstm_forward, "ln_lstm sequence forward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &ln_lstm_backward, "ln_lstm sequence backward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dr_numel", &dr_numel, "floats in backward's work buffer dR for T steps, B rows, H units");
  m.def("lstm_forward", &lstm_forward, "lstm sequence forward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("lstm_backward", &lstm_backward, "lstm sequence backward (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_mm", &packed_mm, "a @ b (or b transposed) through the micro-kernel (float32, CPU)",
        py::arg("a"), py::arg("b"), py::arg("bt"), py::arg("repeat") = 1, py::call_guard<py::gil_scoped_release>());
  m.def("gemm_tn", [](const at::Tensor& x, const at::Tensor& y) {
          check(x, "gemm_tn's x");
          check(y, "gemm_tn's y");
          TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "gemm_tn: ", x.sizes(), ", ", y.sizes());
          return gemm_tn(x, y);
        }, "x^T @ y through the micro-kernel (float32, CPU)", py::call_guard<py::gil_scoped_release>());
  m.def("set_rows_apart_min", [](int64_t rows) {
          const int64_t before = rows_apart_min;
          rows_apart_min = std::max<int64_t>(rows, 1);
          return before;
        }, "rows a thread needs to take its own rows through a whole sequence (default 12); returns the old value");
  m.def("zoneout_draws", &zoneout_draws, "zoneout's 0/1 draws for a (T, B, H) sequence",
        py::call_guard<py::gil_scoped_release>());
}
