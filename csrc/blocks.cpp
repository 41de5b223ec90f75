// The MLP and conv blocks of the fused stages (blocks.h): parameter checks, evaluation with
// ATen GEMMs / convolutions and the fused elementwise kernels, and vector-Jacobian products.
#include "blocks.h"

#include <array>
#include <tuple>

namespace resode {
namespace {

// p: (P, *tail) with P = 1 (tied) or depth, on x's device, with x's dtype.
void check_param(const char* op, const Tensor& p, const Tensor& x, const char* name,
                 std::vector<int64_t> tail, int64_t depth) {
  TORCH_CHECK_TYPE(p.device() == x.device(), "resode::", op, ": parameter ", name, " is on ",
                   p.device(), " but the input is on ", x.device());
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type(), "resode::", op, ": parameter ", name,
                   " has dtype ", p.scalar_type(), " but the input has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(p.dim() == static_cast<int64_t>(tail.size()) + 1, "resode::", op,
                    ": parameter ", name, " must have ", tail.size() + 1,
                    " dims (P, ...), got shape ", p.sizes());
  TORCH_CHECK_VALUE(p.size(0) == 1 || p.size(0) == depth, "resode::", op, ": parameter ", name,
                    " has leading size ", p.size(0), "; expected 1 (tied) or depth=", depth);
  for (size_t i = 0; i < tail.size(); ++i) {
    TORCH_CHECK_VALUE(p.size(i + 1) == tail[i], "resode::", op, ": parameter ", name,
                      " has shape ", p.sizes(), ", expected (P, ", c10::IntArrayRef(tail), ")");
  }
}

// Every parameter has the leading size P of the first one.
void check_blocks(const char* op, const Tensor& p, const char* name, const char* first,
                  int64_t P) {
  TORCH_CHECK_VALUE(p.size(0) == P, "resode::", op, ": parameter ", name, " has leading size ",
                    p.size(0), " but ", first, " has ", P,
                    "; every parameter needs the same number of blocks");
}

const std::array<int64_t, 2> kOne{1, 1}, kZero{0, 0};

}  // namespace

// ---------------------------------------------------------------------------------------------
// MLP block
MLPBlock::MLPBlock(const Tensor& x, const Tensor& w1_, const OptTensor& b1_, const Tensor& w2_,
                   const OptTensor& b2_, int64_t act_, int64_t depth)
    : act(act_) {
  const char* op = "mlp";
  TORCH_CHECK_VALUE(x.dim() == 2, "resode::", op, ": input must be 2-D (batch, dim), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(find_id(kActivations, act) != nullptr, "resode::", op,
                    ": unknown activation id ", act, " (see resode::table())");
  TORCH_CHECK_VALUE(w1_.dim() == 3, "resode::", op, ": ", kMLPParams[0].name,
                    " must be (P, hidden, dim), got ", w1_.sizes());
  const int64_t D = x.size(1), H = w1_.size(1);
  P = w1_.size(0);
  const Tensor* given[4] = {&w1_, check::get(b1_), &w2_, check::get(b2_)};
  const std::vector<int64_t> tails[4] = {{H, D}, {H}, {D, H}, {D}};
  Tensor* dest[4] = {&w1, &b1, &w2, &b2};
  for (int i = 0; i < 4; ++i) {
    if (given[i] == nullptr) continue;  // absent bias
    check_param(op, *given[i], x, kMLPParams[i].name, tails[i], depth);
    check_blocks(op, *given[i], kMLPParams[i].name, kMLPParams[0].name, P);
    *dest[i] = given[i]->contiguous();
  }
}

MLPCtx MLPBlock::scratch_ctx(const Tensor& x) const {
  MLPCtx c;
  c.z = at::empty({x.size(0), w1.size(1)}, x.options());
  c.a = needs_z() ? at::empty_like(c.z) : c.z;
  return c;
}

Store MLPBlock::make_store(const Tensor& x, int64_t evals, const std::vector<Tensor>* given) const {
  const int64_t B = x.size(0), D = x.size(1), H = w1.size(1);
  auto flag = [this](const char* name) {
    return std::strcmp(name, "needs_preactivation") == 0 && needs_z();
  };
  auto sizes = [&](const char* shape) {
    return std::strcmp(shape, "hidden") == 0 ? std::vector<int64_t>{B, H}
                                             : std::vector<int64_t>{B, D};
  };
  return build_store("mlp", kMLPStore, evals, flag, sizes, x, given);
}

MLPCtx MLPBlock::stored_ctx(const Store& s, int64_t e) const {
  MLPCtx c;
  c.x = s.of(mlp_store::input, e);
  c.a = s.of(mlp_store::activation, e);
  c.z = needs_z() ? s.of(mlp_store::preactivation, e) : c.a;
  c.stored = true;
  return c;
}

void MLPBlock::eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
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
  kernels::act_forward(ctx.z, ctx.a, act);
  if (!out.defined()) return;
  const Tensor w2t = w2[p].t();
  if (base.defined()) {
    kernels::add_row_bias(out, base, b2.defined() ? opt(b2[p]) : std::nullopt, c);
    Tensor o = out;
    o.addmm_(ctx.a, w2t, 1.0, c);
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

void MLPBlock::prepare_backward(const Tensor& x) {
  gw1 = at::empty_like(w1);
  gw2 = at::empty_like(w2);
  if (b1.defined()) gb1 = at::empty_like(b1);
  if (b2.defined()) gb2 = at::empty_like(b2);
  touched.assign(P, 0);
  ones = at::ones({x.size(0)}, x.options());
  ga = at::empty({x.size(0), w1.size(1)}, x.options());
}

void MLPBlock::finish_backward() {
  for (int64_t p = 0; p < P; ++p) {
    if (touched[p]) continue;
    gw1[p].zero_();
    gw2[p].zero_();
    if (b1.defined()) gb1[p].zero_();
    if (b2.defined()) gb2[p].zero_();
  }
}

void MLPBlock::vjp(int64_t n, const MLPCtx& ctx, const Tensor& g, double scale, const Tensor& gx,
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
  kernels::act_backward(ga, ctx.z, ctx.a, act, scale);
  Tensor gw1p = gw1[p];
  gw1p.addmm_(ga.t(), ctx.x, beta, 1.0);
  if (b1.defined()) {
    Tensor gb1p = gb1[p];
    gb1p.addmv_(ga.t(), ones, beta, 1.0);
  }
  Tensor gxm = gx;
  gxm.addmm_(ga, w1[p], accumulate ? 1.0 : 0.0, 1.0);
}

std::vector<Tensor> MLPBlock::grads() const {
  // absent biases come back as empty tensors (a Tensor[] cannot hold undefined tensors)
  const Tensor none = at::empty({0}, gw1.options());
  return {gw1, gb1.defined() ? gb1 : none, gw2, gb2.defined() ? gb2 : none};
}

// ---------------------------------------------------------------------------------------------
// Conv block
ConvBlock::ConvBlock(const Tensor& x, at::TensorList params, at::TensorList running,
                     bool training_, double momentum_, double eps_, int64_t depth)
    : training(training_), momentum(momentum_), eps(eps_) {
  const char* op = "conv";
  constexpr size_t kP = sizeof(kConvParams) / sizeof(kConvParams[0]);
  constexpr size_t kR = sizeof(kConvRunning) / sizeof(kConvRunning[0]);
  TORCH_CHECK_VALUE(x.dim() == 4, "resode::", op,
                    ": input must be 4-D (batch, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(params.size() == kP, "resode::", op, ": expected ", kP,
                    " parameter tensors, got ", params.size());
  TORCH_CHECK_VALUE(running.size() == kR, "resode::", op, ": expected ", kR,
                    " running-stat tensors, got ", running.size());
  const int64_t C = x.size(1);
  P = params[0].dim() > 0 ? params[0].size(0) : -1;
  Tensor* dest[kP] = {&w1, &b1, &g1, &be1, &w2, &b2, &g2, &be2};
  for (size_t i = 0; i < kP; ++i) {
    const bool conv_weight = std::strcmp(kConvParams[i].shape, "(C, C, 3, 3)") == 0;
    check_param(op, params[i], x, kConvParams[i].name,
                conv_weight ? std::vector<int64_t>{C, C, 3, 3} : std::vector<int64_t>{C}, depth);
    check_blocks(op, params[i], kConvParams[i].name, kConvParams[0].name, P);
    *dest[i] = params[i].contiguous();
  }
  Tensor* rdest[kR] = {&rm1, &rv1, &rm2, &rv2};
  for (size_t i = 0; i < kR; ++i) {
    const Tensor& r = running[i];
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == P && r.size(1) == C, "resode::", op, ": ",
                      kConvRunning[i].name, " must have shape (", P, ", ", C, "), got ",
                      r.sizes());
    TORCH_CHECK_TYPE(r.device() == x.device(), "resode::", op, ": ", kConvRunning[i].name,
                     " is on ", r.device(), " but the input is on ", x.device());
    TORCH_CHECK_VALUE(r.is_contiguous(), "resode::", op, ": ", kConvRunning[i].name,
                      " must be contiguous");
    *rdest[i] = r;
  }
  for (int64_t p = 0; p < P; ++p) {
    w1s.push_back(w1[p].clone());
    w2s.push_back(w2[p].clone());
  }
  counts.assign(P, 0);
  auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  mean_s = at::empty({C}, acc);
  var_s = at::empty({C}, acc);
}

ConvCtx ConvBlock::scratch_ctx(const Tensor& x) const {
  ConvCtx c;
  c.xhat1 = at::empty_like(x);
  c.a1 = at::empty_like(x);
  c.xhat2 = at::empty_like(x);
  auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  c.invstd1 = at::empty({x.size(1)}, acc);
  c.invstd2 = at::empty({x.size(1)}, acc);
  return c;
}

Store ConvBlock::make_store(const Tensor& x, int64_t evals,
                            const std::vector<Tensor>* given) const {
  auto flag = [](const char*) { return false; };
  auto sizes = [&](const char* shape) {
    return std::strcmp(shape, "channels") == 0 ? std::vector<int64_t>{x.size(1)}
                                               : x.sizes().vec();
  };
  return build_store("conv", kConvStore, evals, flag, sizes, x, given);
}

ConvCtx ConvBlock::stored_ctx(const Store& s, int64_t e) const {
  ConvCtx c;
  c.x = s.of(conv_store::input, e);
  c.xhat1 = s.of(conv_store::bn1_xhat, e);
  c.a1 = s.of(conv_store::relu1, e);
  c.xhat2 = s.of(conv_store::bn2_xhat, e);
  c.invstd1 = s.row(conv_store::bn1_invstd, e);
  c.invstd2 = s.row(conv_store::bn2_invstd, e);
  c.stored = true;
  return c;
}

// Batch (training) or running (eval) statistics of u for one BN layer; writes invstd and
// returns the mean (acc dtype). Updates the running statistics once when asked.
Tensor ConvBlock::stats(const Tensor& u, int64_t p, const Tensor& rm, const Tensor& rv,
                        const Tensor& invstd_out, bool update) {
  Tensor is = invstd_out;
  if (training) {
    kernels::batch_stats(u, update ? opt(rm[p]) : std::nullopt,
                         update ? opt(rv[p]) : std::nullopt, momentum, mean_s, var_s);
    at::rsqrt_out(is, var_s + eps);
    return mean_s;
  }
  const auto acc = acc_dtype(u.scalar_type());
  at::rsqrt_out(is, rv[p].to(acc) + eps);
  return rm[p].to(acc);
}

void ConvBlock::eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
                     ConvCtx& ctx, bool update_stats) {
  const int64_t p = idx(n);
  if (!ctx.stored) {
    ctx.x = x;
  } else if (ctx.x.data_ptr() != x.data_ptr()) {
    ctx.x.copy_(x);  // only the stage input; later states are written in place
  }
  if (update_stats && training) counts[p] += 1;
  Tensor u1 = at::convolution(x, w1s[p], b1[p], kOne, kOne, kOne, false, kZero, 1);
  Tensor mean1 = stats(u1, p, rm1, rv1, ctx.invstd1, update_stats);
  kernels::bn_apply(u1, mean1, ctx.invstd1, g1[p], be1[p], /*relu=*/true, ctx.xhat1, ctx.a1,
                    std::nullopt, 1.0);
  Tensor u2 = at::convolution(ctx.a1, w2s[p], b2[p], kOne, kOne, kOne, false, kZero, 1);
  Tensor mean2 = stats(u2, p, rm2, rv2, ctx.invstd2, update_stats);
  kernels::bn_apply(u2, mean2, ctx.invstd2, g2[p], be2[p], /*relu=*/false, ctx.xhat2, opt(out),
                    opt(base), c);
}

void ConvBlock::prepare_backward(const Tensor& x) {
  for (auto [g, p] : {std::pair<Tensor*, Tensor*>{&gw1, &w1}, {&gb1, &b1}, {&gg1, &g1},
                      {&gbe1, &be1}, {&gw2, &w2}, {&gb2, &b2}, {&gg2, &g2}, {&gbe2, &be2}}) {
    *g = at::zeros_like(*p);
  }
  gu = at::empty_like(x);
  auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  s_go = at::empty({x.size(1)}, acc);
  s_goxh = at::empty({x.size(1)}, acc);
}

void ConvBlock::vjp(int64_t n, const ConvCtx& ctx, const Tensor& g, double scale,
                    const Tensor& gx, bool accumulate) {
  const int64_t p = idx(n);
  const std::array<int64_t, 1> bias_sizes{w1.size(1)};
  // BN2 (no ReLU after it)
  kernels::bn_backward_reduce(g, std::nullopt, ctx.xhat2, s_go, s_goxh);
  gg2[p].add_(s_goxh.to(gg2.scalar_type()), scale);
  gbe2[p].add_(s_go.to(gbe2.scalar_type()), scale);
  kernels::bn_backward_apply(g, std::nullopt, ctx.xhat2, g2[p], ctx.invstd2, s_go, s_goxh, scale,
                             training, gu);
  auto r2 = at::convolution_backward(gu, ctx.a1, w2s[p], bias_sizes, kOne, kOne, kOne, false,
                                     kZero, 1, {true, true, true});
  gw2[p].add_(std::get<1>(r2));
  gb2[p].add_(std::get<2>(r2));
  const Tensor& ga1 = std::get<0>(r2);
  // ReLU (mask from its output a1) + BN1
  kernels::bn_backward_reduce(ga1, ctx.a1, ctx.xhat1, s_go, s_goxh);
  gg1[p].add_(s_goxh.to(gg1.scalar_type()));
  gbe1[p].add_(s_go.to(gbe1.scalar_type()));
  kernels::bn_backward_apply(ga1, ctx.a1, ctx.xhat1, g1[p], ctx.invstd1, s_go, s_goxh, 1.0,
                             training, gu);
  auto r1 = at::convolution_backward(gu, ctx.x, w1s[p], bias_sizes, kOne, kOne, kOne, false,
                                     kZero, 1, {true, true, true});
  gw1[p].add_(std::get<1>(r1));
  gb1[p].add_(std::get<2>(r1));
  Tensor gxm = gx;
  if (accumulate) {
    gxm.add_(std::get<0>(r1));
  } else {
    gxm.copy_(std::get<0>(r1));
  }
}

std::vector<Tensor> ConvBlock::grads() const {
  return {gw1, gb1, gg1, gbe1, gw2, gb2, gg2, gbe2};
}

}  // namespace resode
