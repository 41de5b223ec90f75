// The depth loops of the fused stages and the op registrations (TORCH_LIBRARY(resode, m)).
//
// A "block" provides
//   eval(n, x, out, base, c, ctx, update_stats):  out = base + c * f_n(x)   (base undefined:
//       out = f_n(x); out undefined: only the context needed by vjp is filled)
//   vjp(n, ctx, g, scale, gx, accumulate):  gradient of scale * <g, f_n(x)> w.r.t. the
//       parameters of f_n (accumulated) and x (added to gx, or written when !accumulate).
//       g is read completely before gx is written, so gx may alias g.
// The loops below (forward, exact backward from stored contexts, reconstruction adjoint) are
// written once for both block types and both devices.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <array>
#include <tuple>
#include <vector>

#include "resode.h"

namespace resode {
namespace {

using at::Tensor;

Tensor opt_or_undef(const std::optional<Tensor>& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

int64_t num_evals(int64_t scheme, int64_t depth) {
  return scheme == kEuler ? depth : 2 * (depth - 1);
}

void check_common(const Tensor& x, int64_t scheme, double h, int64_t depth) {
  TORCH_CHECK_VALUE(scheme == kEuler || scheme == kHeun,
                    "resode: scheme must be 0 (euler) or 1 (heun), got ", scheme);
  TORCH_CHECK_VALUE(depth >= 1, "resode: depth must be >= 1, got ", depth);
  TORCH_CHECK_VALUE(scheme != kHeun || depth >= 2, "resode: heun needs depth >= 2, got ", depth);
  TORCH_CHECK_VALUE(std::isfinite(h), "resode: step h must be finite");
  const auto dt = x.scalar_type();
  if (x.is_cuda()) {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                     "resode: CUDA fused stages support float32, float64 and bfloat16, got ", dt);
  } else {
    TORCH_CHECK_TYPE(x.device().is_cpu(), "resode: unsupported device ", x.device());
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble,
                     "resode: CPU fused stages support float32 and float64, got ", dt);
  }
}

void check_param(const Tensor& p, const Tensor& x, const char* name,
                 std::vector<int64_t> tail, int64_t depth) {
  TORCH_CHECK_TYPE(p.device() == x.device(), "resode: parameter ", name, " is on ", p.device(),
                   " but the input is on ", x.device());
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type(), "resode: parameter ", name, " has dtype ",
                   p.scalar_type(), " but the input has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(p.dim() == static_cast<int64_t>(tail.size()) + 1,
                    "resode: parameter ", name, " must have ", tail.size() + 1,
                    " dims (P, ...), got shape ", p.sizes());
  TORCH_CHECK_VALUE(p.size(0) == 1 || p.size(0) == depth, "resode: parameter ", name,
                    " has leading size ", p.size(0), "; expected 1 (tied) or depth=", depth);
  for (size_t i = 0; i < tail.size(); ++i) {
    TORCH_CHECK_VALUE(p.size(i + 1) == tail[i], "resode: parameter ", name, " has shape ",
                      p.sizes(), ", expected (P, ", c10::IntArrayRef(tail), ")");
  }
}

// ----------------------------------------------------------------------------------------------
// MLP block: f(x) = W2 act(W1 x + b1) + b2.  W1 (P, H, D), b1 (P, H), W2 (P, D, H), b2 (P, D).
struct MLPCtx {
  Tensor x, z, a;  // input (B, D), pre-activation and activation (B, H)
  bool stored = false;
};

struct MLPBlock {
  Tensor w1, b1, w2, b2;
  int64_t act, P;
  Tensor gw1, gb1, gw2, gb2, ones, ga;

  int64_t idx(int64_t n) const { return P == 1 ? 0 : n; }

  // tanh / relu derivatives only need the activation: z is computed in place into a
  bool needs_z() const { return act == kGelu; }

  MLPCtx scratch_ctx(const Tensor& x) const {
    MLPCtx c;
    c.z = at::empty({x.size(0), w1.size(1)}, x.options());
    c.a = needs_z() ? at::empty_like(c.z) : c.z;
    return c;
  }

  void eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
            MLPCtx& ctx, bool /*update_stats*/) {
    const int64_t p = idx(n);
    if (!ctx.stored) {
      ctx.x = x;
    } else if (ctx.x.data_ptr() != x.data_ptr()) {
      ctx.x.copy_(x);  // only the stage input; later states are written in place
    }
    const Tensor w1t = w1[p].t();
    if (b1.defined()) {
      at::addmm_out(ctx.z, b1[p], x, w1t);
    } else {
      at::mm_out(ctx.z, x, w1t);
    }
    ew::act_forward(ctx.z, ctx.a, act);
    if (!out.defined()) return;
    const Tensor w2t = w2[p].t();
    if (base.defined()) {
      ew::add_row_bias(out, base, b2.defined() ? b2[p] : Tensor(), c);
      out.addmm_(ctx.a, w2t, 1.0, c);
    } else {
      Tensor o = out;
      if (b2.defined()) {
        at::addmm_out(o, b2[p], ctx.a, w2t);
      } else {
        at::mm_out(o, ctx.a, w2t);
      }
      if (c != 1.0) o.mul_(c);
    }
  }

  // Parameter gradients start uninitialised: the first contribution to block p is written
  // with beta = 0 (no zero-fill pass over the (P, ...) gradients), later ones accumulate.
  std::vector<char> touched;

  void prepare_backward(const Tensor& x) {
    gw1 = at::empty_like(w1);
    gw2 = at::empty_like(w2);
    if (b1.defined()) gb1 = at::empty_like(b1);
    if (b2.defined()) gb2 = at::empty_like(b2);
    touched.assign(P, 0);
    ones = at::ones({x.size(0)}, x.options());
    ga = at::empty({x.size(0), w1.size(1)}, x.options());
  }

  void finish_backward() {
    for (int64_t p = 0; p < P; ++p) {
      if (touched[p]) continue;
      gw1[p].zero_();
      gw2[p].zero_();
      if (b1.defined()) gb1[p].zero_();
      if (b2.defined()) gb2[p].zero_();
    }
  }

  void vjp(int64_t n, const MLPCtx& ctx, const Tensor& g, double scale, const Tensor& gx,
           bool accumulate) {
    const int64_t p = idx(n);
    // beta = 0 ignores the (uninitialised) destination, NaN included (BLAS / ATen semantics)
    const double beta = touched[p] ? 1.0 : 0.0;
    touched[p] = 1;
    Tensor gw2p = gw2[p];
    gw2p.addmm_(g.t(), ctx.a, beta, scale);
    if (b2.defined()) {
      Tensor gb2p = gb2[p];
      gb2p.addmv_(g.t(), ones, beta, scale);
    }
    ga.addmm_(g, w2[p], 0.0, 1.0);
    ew::act_backward(ga, ctx.z, ctx.a, act, scale);
    Tensor gw1p = gw1[p];
    gw1p.addmm_(ga.t(), ctx.x, beta, 1.0);
    if (b1.defined()) {
      Tensor gb1p = gb1[p];
      gb1p.addmv_(ga.t(), ones, beta, 1.0);
    }
    Tensor gxm = gx;
    gxm.addmm_(ga, w1[p], accumulate ? 1.0 : 0.0, 1.0);
  }
};

// ----------------------------------------------------------------------------------------------
// Conv block: f(x) = BN2(conv2(ReLU(BN1(conv1(x))))), 3x3 convs with bias, padding 1.
struct ConvCtx {
  Tensor x, xhat1, a1, xhat2;  // (B, C, H, W)
  Tensor invstd1, invstd2;     // (C,) acc dtype
  bool stored = false;
};

struct ConvBlock {
  // params: w1 (P,C,C,3,3), b1 (P,C), g1, be1 (P,C), w2, b2, g2, be2
  Tensor w1, b1, g1, be1, w2, b2, g2, be2;
  Tensor rm1, rv1, rm2, rv2;  // running stats (P, C), updated in place
  // per-block conv weights as separate allocations: oneDNN/mkldnn is ~2x slower on weights
  // that are views at a storage offset (measured on CPU)
  std::vector<Tensor> w1s, w2s;
  bool training;
  double momentum, eps;
  int64_t P;
  std::vector<int64_t> counts;  // evaluations per parameter index (num_batches_tracked)
  Tensor mean_s, var_s;         // (C,) acc scratch
  Tensor gw1, gb1, gg1, gbe1, gw2, gb2, gg2, gbe2, gu, s_go, s_goxh, ftmp;

  int64_t idx(int64_t n) const { return P == 1 ? 0 : n; }

  ConvCtx scratch_ctx(const Tensor& x) const {
    ConvCtx c;
    c.xhat1 = at::empty_like(x);
    c.a1 = at::empty_like(x);
    c.xhat2 = at::empty_like(x);
    auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
    c.invstd1 = at::empty({x.size(1)}, acc);
    c.invstd2 = at::empty({x.size(1)}, acc);
    return c;
  }

  void init_scratch(const Tensor& x) {
    auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
    mean_s = at::empty({x.size(1)}, acc);
    var_s = at::empty({x.size(1)}, acc);
  }

  // Batch (training) or running (eval) statistics of u for BN layer `which`; writes invstd and
  // returns the mean (acc dtype). Updates the running stats once when asked.
  Tensor stats(const Tensor& u, int64_t p, const Tensor& rm, const Tensor& rv,
               const Tensor& invstd_out, bool update) {
    if (training && !u.is_cuda()) {
      // CPU: ATen's vectorised channel statistics (also updates the running stats, with the
      // same formula as nn.BatchNorm2d) -- the generic engine's numbers exactly.
      Tensor rmp = update ? rm[p] : Tensor(), rvp = update ? rv[p] : Tensor();
      auto mv = at::batch_norm_update_stats(u, rmp, rvp, momentum);
      Tensor is = invstd_out;
      at::rsqrt_out(is, std::get<1>(mv) + eps);
      return std::get<0>(mv);
    }
    if (training) {
      ew::channel_mean_var(u, mean_s, var_s);
      Tensor is = invstd_out;
      at::rsqrt_out(is, var_s + eps);
      if (update) {
        const double M = static_cast<double>(u.numel() / u.size(1));
        const double unbias = M > 1 ? M / (M - 1) : 1.0;
        Tensor rmp = rm[p], rvp = rv[p];
        rmp.mul_(1.0 - momentum).add_(mean_s.to(rm.scalar_type()), momentum);
        rvp.mul_(1.0 - momentum).add_(var_s.to(rv.scalar_type()), momentum * unbias);
      }
      return mean_s;
    }
    const auto acc = acc_dtype(u.scalar_type());
    Tensor is = invstd_out;
    at::rsqrt_out(is, rv[p].to(acc) + eps);
    return rm[p].to(acc);
  }

  void eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
            ConvCtx& ctx, bool update_stats) {
    const int64_t p = idx(n);
    if (!ctx.stored) {
      ctx.x = x;
    } else if (ctx.x.data_ptr() != x.data_ptr()) {
      ctx.x.copy_(x);  // only the stage input; later states are written in place
    }
    if (update_stats && training) counts[p] += 1;
    const std::array<int64_t, 2> one{1, 1}, zero{0, 0};
    Tensor u1 = at::convolution(x, w1s[p], b1[p], one, one, one, false, zero, 1);
    Tensor mean1 = stats(u1, p, rm1, rv1, ctx.invstd1, update_stats);
    ew::bn_apply(u1, mean1, ctx.invstd1, g1[p], be1[p], /*relu=*/true, ctx.xhat1, ctx.a1,
                 Tensor(), 1.0);
    Tensor u2 = at::convolution(ctx.a1, w2s[p], b2[p], one, one, one, false, zero, 1);
    Tensor mean2 = stats(u2, p, rm2, rv2, ctx.invstd2, update_stats);
    ew::bn_apply(u2, mean2, ctx.invstd2, g2[p], be2[p], /*relu=*/false, ctx.xhat2, out, base, c);
  }

  void finish_backward() {}

  void prepare_backward(const Tensor& x) {
    gw1 = at::zeros_like(w1);
    gb1 = at::zeros_like(b1);
    gg1 = at::zeros_like(g1);
    gbe1 = at::zeros_like(be1);
    gw2 = at::zeros_like(w2);
    gb2 = at::zeros_like(b2);
    gg2 = at::zeros_like(g2);
    gbe2 = at::zeros_like(be2);
    gu = at::empty_like(x);
    auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
    s_go = at::empty({x.size(1)}, acc);
    s_goxh = at::empty({x.size(1)}, acc);
  }

  void vjp(int64_t n, const ConvCtx& ctx, const Tensor& g, double scale, const Tensor& gx,
           bool accumulate) {
    const int64_t p = idx(n);
    const int64_t C = w1.size(1);
    const std::array<int64_t, 2> one{1, 1}, zero{0, 0};
    const std::array<int64_t, 1> bias_sizes{C};
    // BN2 (no ReLU after it)
    ew::bn_backward_reduce(g, Tensor(), ctx.xhat2, s_go, s_goxh);
    gg2[p].add_(s_goxh.to(gg2.scalar_type()), scale);
    gbe2[p].add_(s_go.to(gbe2.scalar_type()), scale);
    ew::bn_backward_apply(g, Tensor(), ctx.xhat2, g2[p], ctx.invstd2, s_go, s_goxh, scale,
                          training, gu);
    auto r2 = at::convolution_backward(gu, ctx.a1, w2s[p], bias_sizes, one, one, one, false,
                                       zero, 1, {true, true, true});
    gw2[p].add_(std::get<1>(r2));
    gb2[p].add_(std::get<2>(r2));
    const Tensor& ga1 = std::get<0>(r2);
    // ReLU (mask from its output a1) + BN1
    ew::bn_backward_reduce(ga1, ctx.a1, ctx.xhat1, s_go, s_goxh);
    gg1[p].add_(s_goxh.to(gg1.scalar_type()));
    gbe1[p].add_(s_go.to(gbe1.scalar_type()));
    ew::bn_backward_apply(ga1, ctx.a1, ctx.xhat1, g1[p], ctx.invstd1, s_go, s_goxh, 1.0,
                          training, gu);
    auto r1 = at::convolution_backward(gu, ctx.x, w1s[p], bias_sizes, one, one, one, false, zero,
                                       1, {true, true, true});
    gw1[p].add_(std::get<1>(r1));
    gb1[p].add_(std::get<2>(r1));
    Tensor gxm = gx;
    if (accumulate) {
      gxm.add_(std::get<0>(r1));
    } else {
      gxm.copy_(std::get<0>(r1));
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Stored contexts for the exact ("autograd") backward: one per block evaluation, one tensor per
// evaluation and kind (separate allocations, like autograd's: large single buffers would be
// mmap'ed and page-faulted again at every step by glibc). Group 0 holds the evaluation inputs,
// so store[e] is the input of evaluation e.
// MLP: inputs (B, D) x E, activations (B, H) x E [, pre-activations (B, H) x E for gelu]
std::vector<Tensor> alloc_store(const MLPBlock& blk, const Tensor& x, int64_t E) {
  const int64_t B = x.size(0), D = x.size(1), H = blk.w1.size(1);
  const int64_t K = blk.needs_z() ? 3 : 2;
  std::vector<Tensor> s;
  s.reserve(K * E);
  for (int64_t e = 0; e < E; ++e) s.push_back(at::empty({B, D}, x.options()));
  for (int64_t e = 0; e < (K - 1) * E; ++e) s.push_back(at::empty({B, H}, x.options()));
  return s;
}

int64_t store_size(const MLPBlock& blk, int64_t E) { return (blk.needs_z() ? 3 : 2) * E; }

MLPCtx stored_ctx(const MLPBlock& blk, const std::vector<Tensor>& s, int64_t e) {
  const int64_t E = static_cast<int64_t>(s.size()) / (blk.needs_z() ? 3 : 2);
  MLPCtx c;
  c.x = s[e];
  c.a = s[E + e];
  c.z = blk.needs_z() ? s[2 * E + e] : c.a;
  c.stored = true;
  return c;
}

// conv: inputs, xhat1, relu outputs, xhat2 (B, C, H, W) x E each, then invstd1, invstd2 (E, C)
std::vector<Tensor> alloc_store(const ConvBlock&, const Tensor& x, int64_t E) {
  auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  std::vector<Tensor> s;
  s.reserve(4 * E + 2);
  for (int64_t e = 0; e < 4 * E; ++e) s.push_back(at::empty_like(x));
  s.push_back(at::empty({E, x.size(1)}, acc));
  s.push_back(at::empty({E, x.size(1)}, acc));
  return s;
}

int64_t store_size(const ConvBlock&, int64_t E) { return 4 * E + 2; }

ConvCtx stored_ctx(const ConvBlock&, const std::vector<Tensor>& s, int64_t e) {
  const int64_t E = (static_cast<int64_t>(s.size()) - 2) / 4;
  ConvCtx c;
  c.x = s[e];
  c.xhat1 = s[E + e];
  c.a1 = s[2 * E + e];
  c.xhat2 = s[3 * E + e];
  c.invstd1 = s[4 * E][e];
  c.invstd2 = s[4 * E + 1][e];
  c.stored = true;
  return c;
}

// ----------------------------------------------------------------------------------------------
// Loops.
template <class Block>
std::tuple<Tensor, std::vector<Tensor>> forward_loop(Block& blk, const Tensor& x0,
                                                     int64_t scheme, double h, int64_t depth,
                                                     bool save, bool update_stats) {
  const int64_t E = num_evals(scheme, depth);
  std::vector<Tensor> store;
  if (save) store = alloc_store(blk, x0, E);
  Tensor result = at::empty_like(x0);
  std::array<Tensor, 2> bufs{at::empty_like(x0), at::empty_like(x0)};
  auto ctx0 = blk.scratch_ctx(x0);
  auto ctx1 = blk.scratch_ctx(x0);
  Tensor x = x0;
  // With `save`, the states are written straight into the store (the input slot of the
  // evaluation that reads them), so the stored contexts need no copy.
  if (scheme == kEuler) {
    for (int64_t n = 0; n < depth; ++n) {
      auto ctx = save ? stored_ctx(blk, store, n) : ctx0;
      Tensor out = (n == depth - 1) ? result : (save ? store[n + 1] : bufs[n % 2]);
      blk.eval(n, x, out, x, h, ctx, update_stats);
      x = out;
    }
  } else {
    Tensor f0 = at::empty_like(x0), f1 = at::empty_like(x0), ybuf = at::empty_like(x0);
    for (int64_t n = 0; n + 1 < depth; ++n) {
      auto c0 = save ? stored_ctx(blk, store, 2 * n) : ctx0;
      auto c1 = save ? stored_ctx(blk, store, 2 * n + 1) : ctx1;
      blk.eval(n, x, f0, Tensor(), 1.0, c0, update_stats);
      Tensor y = save ? store[2 * n + 1] : ybuf;
      ew::axpby(y, x, 1.0, f0, h);
      blk.eval(n + 1, y, f1, Tensor(), 1.0, c1, update_stats);
      Tensor out = (n == depth - 2) ? result : (save ? store[2 * n + 2] : bufs[n % 2]);
      ew::heun_combine(out, x, f0, f1, 0.5 * h);
      x = out;
    }
  }
  return {result, store};
}

// Heun backward of one step given both contexts: g <- dL/dx_n from g = dL/dx_{n+1}.
template <class Block, class Ctx>
void heun_step_vjp(Block& blk, int64_t n, const Ctx& c0, const Ctx& c1, const Tensor& g,
                   const Tensor& gy, const Tensor& gf0, double h) {
  blk.vjp(n + 1, c1, g, 0.5 * h, gy, /*accumulate=*/false);  // gy = d(h/2 <g, f1(y)>)/dy
  ew::axpby(gf0, g, 0.5 * h, gy, h);                         // grad w.r.t. f0's output
  ew::axpby(g, g, 1.0, gy, 1.0);
  blk.vjp(n, c0, gf0, 1.0, g, /*accumulate=*/true);
}

template <class Block>
Tensor backward_stored(Block& blk, const Tensor& grad, const std::vector<Tensor>& store,
                       int64_t scheme, double h, int64_t depth) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  if (scheme == kEuler) {
    for (int64_t n = depth - 1; n >= 0; --n) {
      auto ctx = stored_ctx(blk, store, n);
      blk.vjp(n, ctx, g, h, g, /*accumulate=*/true);
    }
  } else {
    Tensor gy = at::empty_like(g), gf0 = at::empty_like(g);
    for (int64_t n = depth - 2; n >= 0; --n) {
      auto c0 = stored_ctx(blk, store, 2 * n);
      auto c1 = stored_ctx(blk, store, 2 * n + 1);
      heun_step_vjp(blk, n, c0, c1, g, gy, gf0, h);
    }
  }
  blk.finish_backward();
  return g;
}

// Reconstruction adjoint: rebuild the states backwards in depth from the output, recompute
// each step at the rebuilt state and take its vector-Jacobian product. Approximate gradients
// (O(h) Euler, O(h^2) Heun with depth-smooth weights); never updates running statistics.
//
// With `states` (the stored forward states, diagnostic mode "adjoint_stored", the paper's public
// code), each x_n is rebuilt from the *stored* x_{n+1} instead of the chained reconstruction.
template <class Block>
Tensor backward_adjoint(Block& blk, const Tensor& grad, const Tensor& out, int64_t scheme,
                        double h, int64_t depth,
                        const std::vector<Tensor>* states = nullptr) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  std::array<Tensor, 2> xb{at::empty_like(out), at::empty_like(out)};
  auto ctx0 = blk.scratch_ctx(out);
  auto ctx1 = blk.scratch_ctx(out);
  Tensor x = out;  // x_{n+1}; never written while it is `out`
  if (scheme == kEuler) {
    int64_t it = 0;
    for (int64_t n = depth - 1; n >= 0; --n, ++it) {
      if (states && n + 1 < depth) x = (*states)[n + 1];
      Tensor xp = xb[it % 2];
      blk.eval(n, x, xp, x, -h, ctx0, false);          // x_n ~ x_{n+1} - h f_n(x_{n+1})
      blk.eval(n, xp, Tensor(), Tensor(), 1.0, ctx0, false);  // recompute f_n at x_n
      blk.vjp(n, ctx0, g, h, g, /*accumulate=*/true);
      x = xp;
    }
  } else {
    std::array<Tensor, 2> fb{at::empty_like(out), at::empty_like(out)};
    Tensor yrev = at::empty_like(out), fy = at::empty_like(out), y = at::empty_like(out);
    Tensor gy = at::empty_like(out), gf0 = at::empty_like(out);
    Tensor fnext;  // f_{n+1}(x_{n+1}) at the rebuilt x_{n+1} (cached from the previous step)
    int64_t it = 0;
    for (int64_t n = depth - 2; n >= 0; --n, ++it) {
      if (states && n + 1 < depth - 1) {
        x = (*states)[2 * (n + 1)];  // stored x_{n+1} (input of evaluation 2(n+1))
        fnext = Tensor();
      }
      if (!fnext.defined()) {
        fnext = fb[1];
        blk.eval(n + 1, x, fnext, Tensor(), 1.0, ctx1, false);
      }
      ew::axpby(yrev, x, 1.0, fnext, -h);                   // y = x_{n+1} - h f_{n+1}(x_{n+1})
      blk.eval(n, yrev, fy, Tensor(), 1.0, ctx1, false);    // f_n(y)
      Tensor xp = xb[it % 2];
      ew::heun_combine(xp, x, fnext, fy, -0.5 * h);         // x_n
      Tensor f0 = fb[it % 2];
      blk.eval(n, xp, f0, Tensor(), 1.0, ctx0, false);      // recompute step n at x_n
      ew::axpby(y, xp, 1.0, f0, h);
      blk.eval(n + 1, y, Tensor(), Tensor(), 1.0, ctx1, false);
      heun_step_vjp(blk, n, ctx0, ctx1, g, gy, gf0, h);
      fnext = f0;
      x = xp;
    }
  }
  blk.finish_backward();
  return g;
}

// ----------------------------------------------------------------------------------------------
// Ops.
MLPBlock make_mlp(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                  const Tensor& w2, const std::optional<Tensor>& b2, int64_t act,
                  int64_t depth) {
  TORCH_CHECK_VALUE(x.dim() == 2, "resode.mlp: input must be 2-D (batch, dim), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(act == kTanh || act == kRelu || act == kGelu,
                    "resode.mlp: activation must be 0 (tanh), 1 (relu) or 2 (gelu), got ", act);
  const int64_t D = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 3, "resode.mlp: w1 must be (P, hidden, dim), got ", w1.sizes());
  const int64_t H = w1.size(1), P = w1.size(0);
  check_param(w1, x, "w1", {H, D}, depth);
  check_param(w2, x, "w2", {D, H}, depth);
  TORCH_CHECK_VALUE(w2.size(0) == P, "resode.mlp: w1 and w2 disagree on the number of blocks");
  MLPBlock blk;
  blk.w1 = w1.contiguous();
  blk.w2 = w2.contiguous();
  blk.b1 = opt_or_undef(b1);
  blk.b2 = opt_or_undef(b2);
  if (blk.b1.defined()) {
    check_param(blk.b1, x, "b1", {H}, depth);
    TORCH_CHECK_VALUE(blk.b1.size(0) == P, "resode.mlp: b1 has the wrong number of blocks");
  }
  if (blk.b2.defined()) {
    check_param(blk.b2, x, "b2", {D}, depth);
    TORCH_CHECK_VALUE(blk.b2.size(0) == P, "resode.mlp: b2 has the wrong number of blocks");
  }
  blk.act = act;
  blk.P = P;
  return blk;
}

std::tuple<Tensor, std::vector<Tensor>> mlp_forward(const Tensor& x_, const Tensor& w1,
                                                    const std::optional<Tensor>& b1,
                                                    const Tensor& w2,
                                                    const std::optional<Tensor>& b2, int64_t act,
                                                    int64_t scheme, double h, int64_t depth,
                                                    bool save) {
  c10::OptionalDeviceGuard guard(x_.device());
  // The ops differentiate themselves (resode/fused.py): their ATen calls must not record
  // autograd history, even when called directly with tensors that require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(x_, scheme, h, depth);
  const Tensor x = x_.contiguous();
  MLPBlock blk = make_mlp(x, w1, b1, w2, b2, act, depth);
  return forward_loop(blk, x, scheme, h, depth, save, false);
}

std::vector<Tensor> mlp_backward(const Tensor& grad_, const Tensor& out, at::TensorList saved,
                                 const Tensor& w1, const std::optional<Tensor>& b1,
                                 const Tensor& w2, const std::optional<Tensor>& b2, int64_t act,
                                 int64_t scheme, double h, int64_t depth, int64_t mode) {
  c10::OptionalDeviceGuard guard(grad_.device());
  // The ops differentiate themselves (resode/fused.py): their ATen calls must not record
  // autograd history, even when called directly with tensors that require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(grad_, scheme, h, depth);
  const Tensor grad = grad_.contiguous();
  MLPBlock blk = make_mlp(grad, w1, b1, w2, b2, act, depth);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2,
                    "resode.mlp: backward mode must be 0 (exact), 1 (adjoint) or 2 "
                    "(adjoint_stored), got ", mode);
  const int64_t n_store = store_size(blk, num_evals(scheme, depth));
  TORCH_CHECK_VALUE(mode == 1 || static_cast<int64_t>(saved.size()) == n_store,
                    "resode.mlp: expected ", n_store, " stored tensors, got ", saved.size());
  const std::vector<Tensor> store = saved.vec();
  Tensor gx;
  if (mode == 0) {
    gx = backward_stored(blk, grad, store, scheme, h, depth);
  } else {
    TORCH_CHECK_VALUE(out.sizes() == grad.sizes(), "resode.mlp: output/grad shape mismatch");
    gx = backward_adjoint(blk, grad, out.contiguous(), scheme, h, depth,
                          mode == 2 ? &store : nullptr);
  }
  // absent biases come back as empty tensors (a Tensor[] cannot hold undefined tensors)
  const Tensor none = at::empty({0}, grad.options());
  return {gx, blk.gw1, blk.gb1.defined() ? blk.gb1 : none, blk.gw2,
          blk.gb2.defined() ? blk.gb2 : none};
}

ConvBlock make_conv(const Tensor& x, at::TensorList params, at::TensorList running, bool training,
                    double momentum, double eps, int64_t depth) {
  TORCH_CHECK_VALUE(x.dim() == 4, "resode.conv: input must be 4-D (batch, C, H, W), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(params.size() == 8, "resode.conv: expected 8 parameter tensors, got ",
                    params.size());
  TORCH_CHECK_VALUE(running.size() == 4, "resode.conv: expected 4 running-stat tensors, got ",
                    running.size());
  const int64_t C = x.size(1);
  ConvBlock blk;
  const char* names[8] = {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                          "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"};
  const int64_t P = params[0].dim() > 0 ? params[0].size(0) : -1;
  for (int i = 0; i < 8; ++i) {
    if (i == 0 || i == 4) {
      check_param(params[i], x, names[i], {C, C, 3, 3}, depth);
    } else {
      check_param(params[i], x, names[i], {C}, depth);
    }
    TORCH_CHECK_VALUE(params[i].size(0) == P, "resode.conv: parameter ", names[i],
                      " has leading size ", params[i].size(0), ", expected ", P);
  }
  const char* rnames[4] = {"bn1.running_mean", "bn1.running_var", "bn2.running_mean",
                           "bn2.running_var"};
  for (int i = 0; i < 4; ++i) {
    const Tensor& r = running[i];
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == P && r.size(1) == C, "resode.conv: ",
                      rnames[i], " must have shape (", P, ", ", C, "), got ", r.sizes());
    TORCH_CHECK_TYPE(r.device() == x.device(), "resode.conv: ", rnames[i], " is on ",
                     r.device(), " but the input is on ", x.device());
    TORCH_CHECK_VALUE(r.is_contiguous(), "resode.conv: ", rnames[i], " must be contiguous");
  }
  blk.w1 = params[0].contiguous();
  blk.b1 = params[1].contiguous();
  blk.g1 = params[2].contiguous();
  blk.be1 = params[3].contiguous();
  blk.w2 = params[4].contiguous();
  blk.b2 = params[5].contiguous();
  blk.g2 = params[6].contiguous();
  blk.be2 = params[7].contiguous();
  blk.rm1 = running[0];
  blk.rv1 = running[1];
  blk.rm2 = running[2];
  blk.rv2 = running[3];
  blk.training = training;
  blk.momentum = momentum;
  blk.eps = eps;
  blk.P = P;
  for (int64_t p = 0; p < P; ++p) {
    blk.w1s.push_back(blk.w1[p].clone());
    blk.w2s.push_back(blk.w2[p].clone());
  }
  blk.counts.assign(P, 0);
  blk.init_scratch(x);
  return blk;
}

std::tuple<Tensor, std::vector<Tensor>, Tensor> conv_forward(
    const Tensor& x_, at::TensorList params, at::TensorList running, int64_t scheme, double h,
    int64_t depth, bool training, bool update_stats, double momentum, double eps, bool save) {
  c10::OptionalDeviceGuard guard(x_.device());
  // The ops differentiate themselves (resode/fused.py): their ATen calls must not record
  // autograd history, even when called directly with tensors that require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(x_, scheme, h, depth);
  const Tensor x = x_.contiguous();
  ConvBlock blk = make_conv(x, params, running, training, momentum, eps, depth);
  auto [y, store] = forward_loop(blk, x, scheme, h, depth, save, update_stats && training);
  // number of running-stat updates per block (the caller adds it to num_batches_tracked)
  Tensor counts = at::tensor(blk.counts, at::TensorOptions().dtype(at::kLong));
  return {y, store, counts};
}

std::vector<Tensor> conv_backward(const Tensor& grad_, const Tensor& out, at::TensorList saved,
                                  at::TensorList params, at::TensorList running, int64_t scheme,
                                  double h, int64_t depth, bool training, double eps,
                                  int64_t mode) {
  c10::OptionalDeviceGuard guard(grad_.device());
  // The ops differentiate themselves (resode/fused.py): their ATen calls must not record
  // autograd history, even when called directly with tensors that require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_common(grad_, scheme, h, depth);
  const Tensor grad = grad_.contiguous();
  ConvBlock blk = make_conv(grad, params, running, training, 0.0, eps, depth);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2,
                    "resode.conv: backward mode must be 0 (exact), 1 (adjoint) or 2 "
                    "(adjoint_stored), got ", mode);
  const int64_t n_store = store_size(blk, num_evals(scheme, depth));
  TORCH_CHECK_VALUE(mode == 1 || static_cast<int64_t>(saved.size()) == n_store,
                    "resode.conv: expected ", n_store, " stored tensors, got ", saved.size());
  const std::vector<Tensor> store = saved.vec();
  Tensor gx;
  if (mode == 0) {
    gx = backward_stored(blk, grad, store, scheme, h, depth);
  } else {
    TORCH_CHECK_VALUE(out.sizes() == grad.sizes(), "resode.conv: output/grad shape mismatch");
    gx = backward_adjoint(blk, grad, out.contiguous(), scheme, h, depth,
                          mode == 2 ? &store : nullptr);
  }
  return {gx, blk.gw1, blk.gb1, blk.gg1, blk.gbe1, blk.gw2, blk.gb2, blk.gg2, blk.gbe2};
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(resode, m) {
  m.def(
      "mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act, int scheme, "
      "float h, int depth, bool save) -> (Tensor, Tensor[])");
  m.def(
      "mlp_backward(Tensor grad, Tensor out, Tensor[] saved, Tensor w1, Tensor? b1, Tensor w2, "
      "Tensor? b2, int act, int scheme, float h, int depth, int mode) -> Tensor[]");
  m.def(
      "conv_forward(Tensor x, Tensor[] params, Tensor(a!)[] running, int scheme, float h, "
      "int depth, bool training, bool update_stats, float momentum, float eps, bool save) "
      "-> (Tensor, Tensor[], Tensor)");
  m.def(
      "conv_backward(Tensor grad, Tensor out, Tensor[] saved, Tensor[] params, Tensor[] running, "
      "int scheme, float h, int depth, bool training, float eps, int mode) -> Tensor[]");
  m.def("has_cuda() -> bool", &has_cuda);
}

TORCH_LIBRARY_IMPL(resode, CPU, m) {
  m.impl("mlp_forward", &mlp_forward);
  m.impl("mlp_backward", &mlp_backward);
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(resode, CUDA, m) {
  m.impl("mlp_forward", &mlp_forward);
  m.impl("mlp_backward", &mlp_backward);
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
#endif

}  // namespace resode

// A Python module so that `import resode._C` loads the library (and registers the ops).
#ifndef RESODE_NO_PYINIT
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
