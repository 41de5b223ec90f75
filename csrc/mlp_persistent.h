// The persistent CUDA kernels of narrow MLP stages (mlp_persistent.cu): one launch runs the whole
// depth loop of the forward without stored contexts, of the reconstruction adjoint pass and of
// the reverse op, one CTA per batch tile, states and block weights in shared memory (float32
// arithmetic for float32 and bfloat16). The same semantics and operation order as the depth loops
// of loops.h (forward_steps, backward_adjoint, reverse_loop); the ops (ops.cpp) call them when
// persistent_mlp_applies() holds and keep the cuBLAS path otherwise. RESODE_PERSISTENT_MLP=0
// (read at every call) turns them off. docs/design.md, "The extension".
#pragma once

#ifdef WITH_CUDA

#include <ATen/ATen.h>

#include <vector>

namespace resode {

using at::Tensor;

// Which depth loop a persistent kernel runs (it sets the shared-memory buffers it needs).
enum class PersistentPass { forward, adjoint, reverse };

// The persistent kernel covers this call: x a 2-D CUDA float32 / bfloat16 tensor with at least
// one row, dim and hidden (w1 (P, hidden, dim)) at most 128 and the tile's buffers fitting the
// device's shared memory, a known activation and scheme, and RESODE_PERSISTENT_MLP is not 0.
// The parameters are those MLPBlock validated (same device and dtype, contiguous).
bool persistent_mlp_applies(const Tensor& x, const Tensor& w1, const Tensor& w2, int64_t act,
                            int64_t scheme, PersistentPass pass);

// The forward pass without stored contexts: the stage output (mlp_forward, save == false).
// b1 / b2 undefined when absent.
Tensor persistent_mlp_forward(const Tensor& x, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, int64_t act, int64_t scheme,
                              double h, int64_t depth);

// The reconstruction adjoint pass from the output (loops.h backward_adjoint without stored
// states): dL/dx0, the rebuilt input, the running maximum of the squared per-step
// inconsistencies summed over the batch ((1,) float32) and the parameter gradients in
// MLPBlock::grads() order and shapes (absent biases: empty tensors).
struct PersistentAdjoint {
  Tensor gx, x0_hat, sq_step_error;
  std::vector<Tensor> grads;
};

PersistentAdjoint persistent_mlp_adjoint(const Tensor& grad, const Tensor& out, const Tensor& w1,
                                         const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                         int64_t act, int64_t scheme, double h, int64_t depth,
                                         int64_t refine);

// The reverse op (loops.h reverse_loop): the input rebuilt from the output y.
Tensor persistent_mlp_reverse(const Tensor& y, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, int64_t act, int64_t scheme,
                              double h, int64_t depth, int64_t refine);

}  // namespace resode

#endif  // WITH_CUDA
