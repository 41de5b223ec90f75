// The depth loops of the fused stages, written once for both blocks (blocks.h) and both devices:
// the forward (optionally storing the contexts of the exact backward), the exact backward from
// the stored contexts, the reconstruction adjoint and the plain reverse pass. The reverse steps
// are defined once (reverse_step_euler / reverse_step_heun) and used by the adjoint and the
// reverse pass. docs/design.md, "The extension".
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "kernels.h"
#include "table.h"

namespace resode {

// Forward pass: returns the output and, with `save`, the stored contexts (one per evaluation).
template <class Block>
std::tuple<Tensor, std::vector<Tensor>> forward_loop(Block& blk, const Tensor& x0,
                                                     int64_t scheme, double h, int64_t depth,
                                                     bool save, bool update_stats) {
  Store store;
  if (save) store = blk.make_store(x0, num_evals(scheme, depth));
  Tensor result = at::empty_like(x0);
  std::array<Tensor, 2> bufs{at::empty_like(x0), at::empty_like(x0)};
  auto ctx0 = blk.scratch_ctx(x0);
  auto ctx1 = blk.scratch_ctx(x0);
  Tensor x = x0;
  // With `save`, the states are written straight into the store (the input slot of the
  // evaluation that reads them), so the stored contexts need no copy.
  auto input_slot = [&](int64_t e) { return store.of(0, e); };
  if (scheme == schemes::euler) {
    for (int64_t n = 0; n < depth; ++n) {
      auto ctx = save ? blk.stored_ctx(store, n) : ctx0;
      Tensor out = (n == depth - 1) ? result : (save ? input_slot(n + 1) : bufs[n % 2]);
      blk.eval(n, x, out, x, h, ctx, update_stats);
      x = out;
    }
  } else {
    Tensor f0 = at::empty_like(x0), f1 = at::empty_like(x0), ybuf = at::empty_like(x0);
    for (int64_t n = 0; n + 1 < depth; ++n) {
      auto c0 = save ? blk.stored_ctx(store, 2 * n) : ctx0;
      auto c1 = save ? blk.stored_ctx(store, 2 * n + 1) : ctx1;
      blk.eval(n, x, f0, Tensor(), 1.0, c0, update_stats);
      Tensor y = save ? input_slot(2 * n + 1) : ybuf;
      kernels::axpby(y, x, 1.0, f0, h);
      blk.eval(n + 1, y, f1, Tensor(), 1.0, c1, update_stats);
      Tensor out = (n == depth - 2) ? result : (save ? input_slot(2 * n + 2) : bufs[n % 2]);
      kernels::heun_combine(out, x, f0, f1, 0.5 * h);
      x = out;
    }
  }
  return {result, std::move(store.tensors)};
}

// Heun backward of one step given both contexts: g <- dL/dx_n from g = dL/dx_{n+1}.
template <class Block, class Ctx>
void heun_step_vjp(Block& blk, int64_t n, const Ctx& c0, const Ctx& c1, const Tensor& g,
                   const Tensor& gy, const Tensor& gf0, double h) {
  blk.vjp(n + 1, c1, g, 0.5 * h, gy, /*accumulate=*/false);  // gy = d(h/2 <g, f1(y)>)/dy
  kernels::axpby(gf0, g, 0.5 * h, gy, h);                    // grad w.r.t. f0's output
  kernels::axpby(g, g, 1.0, gy, 1.0);
  blk.vjp(n, c0, gf0, 1.0, g, /*accumulate=*/true);
}

// Exact backward from the stored contexts.
template <class Block>
Tensor backward_stored(Block& blk, const Tensor& grad, const Store& store, int64_t scheme,
                       double h, int64_t depth) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  if (scheme == schemes::euler) {
    for (int64_t n = depth - 1; n >= 0; --n) {
      auto ctx = blk.stored_ctx(store, n);
      blk.vjp(n, ctx, g, h, g, /*accumulate=*/true);
    }
  } else {
    Tensor gy = at::empty_like(g), gf0 = at::empty_like(g);
    for (int64_t n = depth - 2; n >= 0; --n) {
      auto c0 = blk.stored_ctx(store, 2 * n);
      auto c1 = blk.stored_ctx(store, 2 * n + 1);
      heun_step_vjp(blk, n, c0, c1, g, gy, gf0, h);
    }
  }
  blk.finish_backward();
  return g;
}

// Euler's reverse step: x_n ~ x_{n+1} - h f_n(x_{n+1}), into xp (ctx is scratch).
template <class Block, class Ctx>
void reverse_step_euler(Block& blk, int64_t n, const Tensor& x, const Tensor& xp, double h,
                        Ctx& ctx) {
  blk.eval(n, x, xp, x, -h, ctx, /*update_stats=*/false);
}

// Heun's reverse step (Heun run backwards in depth): y = x_{n+1} - h f_{n+1}(x_{n+1});
// x_n ~ x_{n+1} - h/2 (f_{n+1}(x_{n+1}) + f_n(y)), into xp. fnext = f_{n+1}(x_{n+1}) is given
// (cached by the adjoint from its previous step); yrev and fy are scratch.
template <class Block, class Ctx>
void reverse_step_heun(Block& blk, int64_t n, const Tensor& x, const Tensor& fnext,
                       const Tensor& xp, double h, Ctx& ctx, const Tensor& yrev,
                       const Tensor& fy) {
  kernels::axpby(yrev, x, 1.0, fnext, -h);
  blk.eval(n, yrev, fy, Tensor(), 1.0, ctx, /*update_stats=*/false);
  kernels::heun_combine(xp, x, fnext, fy, -0.5 * h);
}

// Reverse pass: the scheme's reverse steps from the stage output y back to an estimate of the
// stage input (running statistics untouched).
template <class Block>
Tensor reverse_loop(Block& blk, const Tensor& y, int64_t scheme, double h, int64_t depth) {
  std::array<Tensor, 2> xb{at::empty_like(y), at::empty_like(y)};
  auto ctx = blk.scratch_ctx(y);
  Tensor x = y;  // x_{n+1}; never written while it is `y`
  int64_t it = 0;
  if (scheme == schemes::euler) {
    for (int64_t n = depth - 1; n >= 0; --n, ++it) {
      reverse_step_euler(blk, n, x, xb[it % 2], h, ctx);
      x = xb[it % 2];
    }
  } else {
    Tensor fnext = at::empty_like(y), yrev = at::empty_like(y), fy = at::empty_like(y);
    for (int64_t n = depth - 2; n >= 0; --n, ++it) {
      blk.eval(n + 1, x, fnext, Tensor(), 1.0, ctx, /*update_stats=*/false);
      reverse_step_heun(blk, n, x, fnext, xb[it % 2], h, ctx, yrev, fy);
      x = xb[it % 2];
    }
  }
  return x.is_same(y) ? y.clone() : x;
}

// Reconstruction adjoint: rebuild the states backwards in depth from the output, recompute
// each step at the rebuilt state and take its vector-Jacobian product. Approximate gradients
// (O(h) Euler, O(h^2) Heun with depth-smooth weights); never updates running statistics.
//
// With `states` (the stored forward contexts, diagnostic mode "adjoint_stored", the paper's
// public code), each x_n is rebuilt from the *stored* x_{n+1} instead of the chained
// reconstruction.
template <class Block>
Tensor backward_adjoint(Block& blk, const Tensor& grad, const Tensor& out, int64_t scheme,
                        double h, int64_t depth, const Store* states = nullptr) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  std::array<Tensor, 2> xb{at::empty_like(out), at::empty_like(out)};
  auto ctx0 = blk.scratch_ctx(out);
  auto ctx1 = blk.scratch_ctx(out);
  Tensor x = out;  // x_{n+1}; never written while it is `out`
  if (scheme == schemes::euler) {
    int64_t it = 0;
    for (int64_t n = depth - 1; n >= 0; --n, ++it) {
      if (states && n + 1 < depth) x = states->of(0, n + 1);
      Tensor xp = xb[it % 2];
      reverse_step_euler(blk, n, x, xp, h, ctx0);
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
        x = states->of(0, 2 * (n + 1));  // stored x_{n+1} (input of evaluation 2(n+1))
        fnext = Tensor();
      }
      if (!fnext.defined()) {
        fnext = fb[1];
        blk.eval(n + 1, x, fnext, Tensor(), 1.0, ctx1, false);
      }
      Tensor xp = xb[it % 2];
      reverse_step_heun(blk, n, x, fnext, xp, h, ctx1, yrev, fy);
      Tensor f0 = fb[it % 2];
      blk.eval(n, xp, f0, Tensor(), 1.0, ctx0, false);  // recompute step n at x_n
      kernels::axpby(y, xp, 1.0, f0, h);
      blk.eval(n + 1, y, Tensor(), Tensor(), 1.0, ctx1, false);
      heun_step_vjp(blk, n, ctx0, ctx1, g, gy, gf0, h);
      fnext = f0;
      x = xp;
    }
  }
  blk.finish_backward();
  return g;
}

// The backward op of either block: the exact backward (mode autograd) from the stored
// contexts, or the reconstruction adjoint from the output. Returns the input gradient followed
// by the parameter gradients (Block::grads, op order).
template <class Block>
std::vector<Tensor> run_backward(Block& blk, const Tensor& grad, const Tensor& out,
                                 at::TensorList saved, int64_t scheme, double h, int64_t depth,
                                 int64_t mode) {
  const ModeInfo* info = find_id(kModes, mode);
  TORCH_CHECK_VALUE(info != nullptr, "resode::", Block::kName, "_backward: unknown backward mode ",
                    mode, " (see resode::table())");
  Store store;
  if (info->stores_contexts) {
    const std::vector<Tensor> given = saved.vec();
    store = blk.make_store(grad, num_evals(scheme, depth), &given);
  }
  Tensor gx;
  if (!info->needs_output) {
    gx = backward_stored(blk, grad, store, scheme, h, depth);
  } else {
    TORCH_CHECK_VALUE(out.sizes() == grad.sizes(), "resode::", Block::kName,
                      "_backward: the output has shape ", out.sizes(), " but its gradient ",
                      grad.sizes());
    gx = backward_adjoint(blk, grad, out.contiguous(), scheme, h, depth,
                          info->stores_contexts ? &store : nullptr);
  }
  std::vector<Tensor> result{gx};
  for (Tensor& t : blk.grads()) result.push_back(std::move(t));
  return result;
}

}  // namespace resode
