// The fused elementwise kernels around the GEMMs and convolutions of the depth loops, declared
// once here. Each is an internal op `resode::_<name>` (schema below, defined in kernels.cpp)
// with one implementation per dispatch key: kernels_cpu.cpp (CPU) and kernels_cuda.cu (CUDA)
// register theirs with TORCH_LIBRARY_IMPL; the loops call `kernels::<name>(...)`, which goes
// through a cached typed dispatcher handle. All tensors are contiguous and on one device;
// optional tensors are std::nullopt (or undefined) when absent.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "table.h"

namespace resode {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// X(name, parameter list, argument list, schema arguments)
#define RESODE_KERNELS(X)                                                                      \
  /* a = act(z); z and a may alias */                                                          \
  X(act_forward, (const Tensor& z, const Tensor& a, int64_t act), (z, a, act),                 \
    "(Tensor z, Tensor(a!) a, int act) -> ()")                                                 \
  /* g = scale * g * act'(z)   (the activation a = act(z) is used for tanh / relu) */          \
  X(act_backward, (const Tensor& g, const Tensor& z, const Tensor& a, int64_t act,            \
                   double scale),                                                              \
    (g, z, a, act, scale), "(Tensor(a!) g, Tensor z, Tensor a, int act, float scale) -> ()")   \
  /* out = alpha * x + beta * y   (out may alias x or y) */                                    \
  X(axpby, (const Tensor& out, const Tensor& x, double alpha, const Tensor& y, double beta),   \
    (out, x, alpha, y, beta),                                                                  \
    "(Tensor(a!) out, Tensor x, float alpha, Tensor y, float beta) -> ()")                     \
  /* out = x + c * (f0 + f1)   (Heun's combination) */                                         \
  X(heun_combine,                                                                              \
    (const Tensor& out, const Tensor& x, const Tensor& f0, const Tensor& f1, double c),        \
    (out, x, f0, f1, c), "(Tensor(a!) out, Tensor x, Tensor f0, Tensor f1, float c) -> ()")    \
  /* out[i, j] = x[i, j] + c * b[j]   (b absent: a plain copy) */                              \
  X(add_row_bias, (const Tensor& out, const Tensor& x, const OptTensor& b, double c),          \
    (out, x, b, c), "(Tensor(a!) out, Tensor x, Tensor? b, float c) -> ()")                    \
  /* u: (B, C, H, W); mean, var: (C,) acc dtype, var the biased batch variance; with the  */ \
  /* running statistics (P = 1 rows of (C,)), updates them like nn.BatchNorm2d (momentum,  */ \
  /* unbiased variance)                                                                     */ \
  X(batch_stats,                                                                               \
    (const Tensor& u, const OptTensor& running_mean, const OptTensor& running_var,             \
     double momentum, const Tensor& mean, const Tensor& var),                                  \
    (u, running_mean, running_var, momentum, mean, var),                                       \
    "(Tensor u, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "           \
    "Tensor(c!) mean, Tensor(d!) var) -> ()")                                                  \
  /* y = gamma * (u - mean) * invstd + beta, ReLU'd if relu; writes xhat (optional) and     */ \
  /* out = base + c * y (base absent: out = y; out optional)                                */ \
  X(bn_apply,                                                                                  \
    (const Tensor& u, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,           \
     const Tensor& beta, bool relu, const OptTensor& xhat, const OptTensor& out,               \
     const OptTensor& base, double c),                                                         \
    (u, mean, invstd, gamma, beta, relu, xhat, out, base, c),                                  \
    "(Tensor u, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, bool relu, "            \
    "Tensor(a!)? xhat, Tensor(b!)? out, Tensor? base, float c) -> ()")                         \
  /* with go_m = go * (mask > 0) (mask optional):                                           */ \
  /* sum_go[c] = sum go_m, sum_goxhat[c] = sum go_m * xhat                                  */ \
  X(bn_backward_reduce,                                                                        \
    (const Tensor& go, const OptTensor& mask, const Tensor& xhat, const Tensor& sum_go,        \
     const Tensor& sum_goxhat),                                                                \
    (go, mask, xhat, sum_go, sum_goxhat),                                                      \
    "(Tensor go, Tensor? mask, Tensor xhat, Tensor(a!) sum_go, Tensor(b!) sum_goxhat) -> ()")  \
  /* training: gx = scale * gamma * invstd * (go_m - sum_go / M - xhat * sum_goxhat / M)    */ \
  /* eval:     gx = scale * gamma * invstd * go_m                                           */ \
  X(bn_backward_apply,                                                                         \
    (const Tensor& go, const OptTensor& mask, const Tensor& xhat, const Tensor& gamma,         \
     const Tensor& invstd, const Tensor& sum_go, const Tensor& sum_goxhat, double scale,       \
     bool training, const Tensor& gx),                                                         \
    (go, mask, xhat, gamma, invstd, sum_go, sum_goxhat, scale, training, gx),                  \
    "(Tensor go, Tensor? mask, Tensor xhat, Tensor gamma, Tensor invstd, Tensor sum_go, "      \
    "Tensor sum_goxhat, float scale, bool training, Tensor(a!) gx) -> ()")                     \
  /* acc[0] = max(acc[0], sum((a - b)^2)), summed in the acc dtype or wider; acc: (1,) of   */ \
  /* the acc dtype (the adjoint's per-step consistency check, loops.h)                      */ \
  X(sqdist_max, (const Tensor& a, const Tensor& b, const Tensor& acc), (a, b, acc),            \
    "(Tensor a, Tensor b, Tensor(a!) acc) -> ()")

// The calls used by the depth loops (kernels.cpp): kernels::axpby(out, x, alpha, y, beta), ...
namespace kernels {
#define RESODE_DECLARE_KERNEL(name, params, args, schema) void name params;
RESODE_KERNELS(RESODE_DECLARE_KERNEL)
#undef RESODE_DECLARE_KERNEL
}  // namespace kernels

// Argument checks shared by the CPU and CUDA implementations (the internal ops can be called
// from Python too: a bad call must raise, not read out of bounds).
namespace check {

inline const Tensor* get(const Tensor& t) { return t.defined() ? &t : nullptr; }
inline const Tensor* get(const OptTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// Every (present) tensor is contiguous, on ref's device, with ref's dtype and number of elements.
template <class... Ts>
void same_as(const char* op, const Tensor& ref, const Ts&... ts) {
  auto one = [&](const Tensor* t) {
    if (t == nullptr) return;
    TORCH_CHECK_VALUE(t->is_contiguous() && t->device() == ref.device() &&
                          t->scalar_type() == ref.scalar_type() && t->numel() == ref.numel(),
                      "resode::_", op, ": every tensor must be contiguous, on ", ref.device(),
                      ", of dtype ", ref.scalar_type(), " and with ", ref.numel(),
                      " elements; got one of shape ", t->sizes(), ", dtype ", t->scalar_type(),
                      " on ", t->device());
  };
  TORCH_CHECK_VALUE(ref.is_contiguous(), "resode::_", op, ": tensors must be contiguous");
  (void)one;  // unused when ts is empty
  (one(get(ts)), ...);
}

// (C,) per-channel vectors of u (B, C, ...) with the given dtype, contiguous, on u's device.
template <class... Ts>
void channels_of(const char* op, const Tensor& u, at::ScalarType dtype, const Ts&... ts) {
  TORCH_CHECK_VALUE(u.dim() >= 2, "resode::_", op, ": expected a (B, C, ...) tensor, got ",
                    u.sizes());
  auto one = [&](const Tensor& t) {
    TORCH_CHECK_VALUE(t.is_contiguous() && t.device() == u.device() &&
                          t.scalar_type() == dtype && t.numel() == u.size(1),
                      "resode::_", op, ": per-channel tensors must be contiguous (", u.size(1),
                      ",) ", dtype, " on ", u.device(), "; got ", t.sizes(), " ",
                      t.scalar_type(), " on ", t.device());
  };
  (void)one;
  (one(ts), ...);
}

// acc is a (1,) tensor of a's acc dtype on a's device.
inline void accumulator(const char* op, const Tensor& a, const Tensor& acc) {
  TORCH_CHECK_VALUE(acc.is_contiguous() && acc.numel() == 1 && acc.device() == a.device() &&
                        acc.scalar_type() == acc_dtype(a.scalar_type()),
                    "resode::_", op, ": the accumulator must be a contiguous (1,) ",
                    acc_dtype(a.scalar_type()), " tensor on ", a.device(), "; got ", acc.sizes(),
                    " ", acc.scalar_type(), " on ", acc.device());
}

inline void activation(const char* op, int64_t act) {
  TORCH_CHECK_VALUE(find_id(kActivations, act) != nullptr, "resode::_", op,
                    ": unknown activation id ", act);
}

}  // namespace check
}  // namespace resode
