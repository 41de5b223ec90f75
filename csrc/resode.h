// resode._C: fused residual stages (Euler / Heun forward, exact and reconstruction-adjoint
// backward) for the MLP block Linear-act-Linear and the conv block conv-BN-ReLU-conv-BN.
//
// The depth loops (stack_ops.cpp) are device-agnostic: they call ATen for GEMMs and convolutions
// and the fused elementwise kernels declared below, which dispatch on the tensor's device to the
// CPU implementation (kernels_cpu.cpp) or the CUDA one (kernels_cuda.cu, built with WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

namespace resode {

enum ActKind : int64_t { kTanh = 0, kRelu = 1, kGelu = 2 };
enum SchemeKind : int64_t { kEuler = 0, kHeun = 1 };

// Per-channel statistics (mean, invstd, reductions) use this dtype: double for double tensors,
// float otherwise (float32, bfloat16).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Elementwise kernels. All tensors are contiguous and on the same device. "Optional" tensors
// are passed undefined when absent.
namespace ew {
// a = act(z)
void act_forward(const at::Tensor& z, const at::Tensor& a, int64_t act);
// g = scale * g * act'(z)   (a = act(z) is used for tanh / relu)
void act_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, int64_t act,
                  double scale);
// out = alpha * x + beta * y   (out may alias x or y)
void axpby(const at::Tensor& out, const at::Tensor& x, double alpha, const at::Tensor& y,
           double beta);
// out = x + c * (f0 + f1)     (Heun's combination)
void heun_combine(const at::Tensor& out, const at::Tensor& x, const at::Tensor& f0,
                  const at::Tensor& f1, double c);
// out[i, j] = x[i, j] + c * b[j]   (b optional: plain copy)
void add_row_bias(const at::Tensor& out, const at::Tensor& x, const at::Tensor& b, double c);
// u: (B, C, H, W). mean, var: (C,) acc dtype; var is the biased batch variance.
void channel_mean_var(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var);
// y = gamma * (u - mean) * invstd + beta, optionally ReLU'd; writes xhat (optional) and
// out = base + c * y (base optional: out = y; out optional).
void bn_apply(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, bool relu, const at::Tensor& xhat,
              const at::Tensor& out, const at::Tensor& base, double c);
// With go_m = go * (mask > 0) (mask optional): sum_go[c] = sum go_m, sum_goxhat[c] = sum go_m xhat
void bn_backward_reduce(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                        const at::Tensor& sum_go, const at::Tensor& sum_goxhat);
// training: gx = scale * gamma * invstd * (go_m - sum_go / M - xhat * sum_goxhat / M)
// eval:     gx = scale * gamma * invstd * go_m
void bn_backward_apply(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                       const at::Tensor& gamma, const at::Tensor& invstd,
                       const at::Tensor& sum_go, const at::Tensor& sum_goxhat, double scale,
                       bool training, const at::Tensor& gx);
}  // namespace ew

namespace cpu {
void act_forward(const at::Tensor& z, const at::Tensor& a, int64_t act);
void act_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, int64_t act,
                  double scale);
void axpby(const at::Tensor& out, const at::Tensor& x, double alpha, const at::Tensor& y,
           double beta);
void heun_combine(const at::Tensor& out, const at::Tensor& x, const at::Tensor& f0,
                  const at::Tensor& f1, double c);
void add_row_bias(const at::Tensor& out, const at::Tensor& x, const at::Tensor& b, double c);
void channel_mean_var(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var);
void bn_apply(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, bool relu, const at::Tensor& xhat,
              const at::Tensor& out, const at::Tensor& base, double c);
void bn_backward_reduce(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                        const at::Tensor& sum_go, const at::Tensor& sum_goxhat);
void bn_backward_apply(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                       const at::Tensor& gamma, const at::Tensor& invstd,
                       const at::Tensor& sum_go, const at::Tensor& sum_goxhat, double scale,
                       bool training, const at::Tensor& gx);
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
void act_forward(const at::Tensor& z, const at::Tensor& a, int64_t act);
void act_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, int64_t act,
                  double scale);
void axpby(const at::Tensor& out, const at::Tensor& x, double alpha, const at::Tensor& y,
           double beta);
void heun_combine(const at::Tensor& out, const at::Tensor& x, const at::Tensor& f0,
                  const at::Tensor& f1, double c);
void add_row_bias(const at::Tensor& out, const at::Tensor& x, const at::Tensor& b, double c);
void channel_mean_var(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var);
void bn_apply(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, bool relu, const at::Tensor& xhat,
              const at::Tensor& out, const at::Tensor& base, double c);
void bn_backward_reduce(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                        const at::Tensor& sum_go, const at::Tensor& sum_goxhat);
void bn_backward_apply(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                       const at::Tensor& gamma, const at::Tensor& invstd,
                       const at::Tensor& sum_go, const at::Tensor& sum_goxhat, double scale,
                       bool training, const at::Tensor& gx);
}  // namespace cuda
#endif

}  // namespace resode
