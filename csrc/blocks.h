// The two residual functions of the fused stages, as "blocks" the depth loops (loops.h) run:
//
//   eval(n, x, out, base, c, ctx, update_stats):  out = base + c * f_n(x)   (base undefined:
//       out = f_n(x); out undefined: only the context needed by vjp is filled)
//   vjp(n, ctx, g, scale, gx, accumulate):  gradient of scale * <g, f_n(x)> w.r.t. the
//       parameters of f_n (accumulated) and x (added to gx, or written when !accumulate).
//       g is read completely before gx is written, so gx may alias g.
//   scratch_ctx(x), make_store(x, evals[, &given]), stored_ctx(store, e):
//       contexts, in scratch buffers or in the store of the exact backward (table.h)
//   prepare_backward(x), finish_backward(), grads(): parameter gradients, in op order
//
// Parameters are stacked over blocks (leading size P = 1 if tied, else depth).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "table.h"

namespace resode {

inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The stored contexts of the exact backward, laid out by a store table of table.h: group g
// starts at start[g] (-1: not stored); per-evaluation groups hold one tensor per evaluation,
// stacked groups one (evaluations, ...) tensor.
struct Store {
  std::vector<Tensor> tensors;
  std::vector<int64_t> start;

  const Tensor& of(int group, int64_t e) const { return tensors[start[group] + e]; }
  Tensor row(int group, int64_t e) const { return tensors[start[group]][e]; }
};

// Plans the store of `evals` evaluations for the groups whose flag holds (flag(only_if)):
// the start index of each stored group (-1: not stored); the total tensor count goes to *size.
template <size_t N, class Flag>
std::vector<int64_t> plan_store(const StoreGroup (&groups)[N], int64_t evals, Flag flag,
                                int64_t* size) {
  std::vector<int64_t> start(N, -1);
  int64_t k = 0;
  for (size_t g = 0; g < N; ++g) {
    if (std::strcmp(groups[g].only_if, "always") != 0 && !flag(groups[g].only_if)) continue;
    start[g] = k;
    k += groups[g].stacked ? 1 : evals;
  }
  *size = k;
  return start;
}

// The store of `evals` evaluations: freshly allocated (given == nullptr; the tensors have the
// group's shape, sizes(shape name), and dtype) or the tensors the forward returned (checked).
template <size_t N, class Flag, class Sizes>
Store build_store(const char* op, const StoreGroup (&groups)[N], int64_t evals, Flag flag,
                  Sizes sizes, const Tensor& x, const std::vector<Tensor>* given) {
  Store s;
  int64_t size = 0;
  s.start = plan_store(groups, evals, flag, &size);
  if (given != nullptr) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(given->size()) == size, "resode::", op,
                      ": expected ", size, " stored tensors, got ", given->size());
    s.tensors = *given;
    return s;
  }
  s.tensors.reserve(size);
  for (size_t g = 0; g < N; ++g) {
    if (s.start[g] < 0) continue;
    std::vector<int64_t> shape = sizes(groups[g].shape);
    const bool acc = std::strcmp(groups[g].dtype, "acc") == 0;
    auto options = x.options().dtype(acc ? acc_dtype(x.scalar_type()) : x.scalar_type());
    if (groups[g].stacked) {
      shape.insert(shape.begin(), evals);
      s.tensors.push_back(at::empty(shape, options));
    } else {
      for (int64_t e = 0; e < evals; ++e) s.tensors.push_back(at::empty(shape, options));
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// MLP block: f(x) = W2 act(W1 x + b1) + b2.  W1 (P, H, D), b1 (P, H), W2 (P, D, H), b2 (P, D).
struct MLPCtx {
  Tensor x, z, a;  // input (B, D), pre-activation and activation (B, H)
  bool stored = false;
};

struct MLPBlock {
  using Ctx = MLPCtx;
  static constexpr const char* kName = "mlp";

  Tensor w1, b1, w2, b2;  // b1, b2 undefined when absent
  int64_t act = acts::tanh, P = 1;

  // Validated parameters (ops.cpp); x is the (B, D) input or output gradient.
  MLPBlock(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
           const OptTensor& b2, int64_t act, int64_t depth);

  int64_t idx(int64_t n) const { return P == 1 ? 0 : n; }
  // tanh / relu derivatives need only the activation a, so the preactivation z is not stored
  // (it is computed in place into a); other activations keep z too (table.h).
  bool needs_z() const { return find_id(kActivations, act)->needs_preactivation; }

  Ctx scratch_ctx(const Tensor& x) const;
  Store make_store(const Tensor& x, int64_t evals,
                   const std::vector<Tensor>* given = nullptr) const;
  Ctx stored_ctx(const Store& s, int64_t e) const;

  void eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
            Ctx& ctx, bool update_stats);
  void prepare_backward(const Tensor& x);
  void vjp(int64_t n, const Ctx& ctx, const Tensor& g, double scale, const Tensor& gx,
           bool accumulate);
  void finish_backward();
  std::vector<Tensor> grads() const;

 private:
  Tensor gw1, gb1, gw2, gb2, ones, ga;
  // Parameter gradients start uninitialised: the first contribution to block p is written
  // with beta = 0 (no zero-fill pass over the (P, ...) gradients), later ones accumulate.
  std::vector<char> touched;
};

// ---------------------------------------------------------------------------------------------
// Conv block: f(x) = BN2(conv2(ReLU(BN1(conv1(x))))), 3x3 convs with bias, padding 1.
struct ConvCtx {
  Tensor x, xhat1, a1, xhat2;  // (B, C, H, W)
  Tensor invstd1, invstd2;     // (C,) acc dtype
  bool stored = false;
};

struct ConvBlock {
  using Ctx = ConvCtx;
  static constexpr const char* kName = "conv";

  // params (op order, table.h): w1 (P,C,C,3,3), b1 (P,C), g1, be1 (P,C), w2, b2, g2, be2
  Tensor w1, b1, g1, be1, w2, b2, g2, be2;
  Tensor rm1, rv1, rm2, rv2;  // running statistics (P, C); updated in place (the forward op
                              // passes copies)
  bool training = true;
  double momentum = 0.1, eps = 1e-5;
  int64_t P = 1;
  std::vector<int64_t> counts;  // evaluations per parameter index (num_batches_tracked)

  ConvBlock(const Tensor& x, at::TensorList params, at::TensorList running, bool training,
            double momentum, double eps, int64_t depth);

  int64_t idx(int64_t n) const { return P == 1 ? 0 : n; }

  Ctx scratch_ctx(const Tensor& x) const;
  Store make_store(const Tensor& x, int64_t evals,
                   const std::vector<Tensor>* given = nullptr) const;
  Ctx stored_ctx(const Store& s, int64_t e) const;

  void eval(int64_t n, const Tensor& x, const Tensor& out, const Tensor& base, double c,
            Ctx& ctx, bool update_stats);
  void prepare_backward(const Tensor& x);
  void vjp(int64_t n, const Ctx& ctx, const Tensor& g, double scale, const Tensor& gx,
           bool accumulate);
  void finish_backward() {}
  std::vector<Tensor> grads() const;

 private:
  // per-block conv weights as separate allocations: oneDNN/mkldnn is ~2x slower on weights
  // that are views at a storage offset (measured on CPU)
  std::vector<Tensor> w1s, w2s;
  Tensor mean_s, var_s;  // (C,) acc scratch
  Tensor gw1, gb1, gg1, gbe1, gw2, gb2, gg2, gbe2, gu, s_go, s_goxh;

  Tensor stats(const Tensor& u, int64_t p, const Tensor& rm, const Tensor& rv,
               const Tensor& invstd_out, bool update);
};

}  // namespace resode
