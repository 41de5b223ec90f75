// The depth loops of the fused stages, written once for both blocks (blocks.h) and both devices:
// the forward over a range of steps (optionally storing the contexts of the exact backward), the
// exact backward of a range of steps from its stored contexts, the reconstruction adjoint (with
// `refine` fixed-point iterations per reverse step and the drift check), the exact fallback of
// backward="auto" (ceil(sqrt(steps)) segments recomputed from the stored input) and the plain
// reverse pass. A reverse step is written once (rebuild_euler / rebuild_heun) for the adjoint
// and the reverse pass. The generic engine (resode/_adjoint.py, resode/_auto.py) is the
// reference of every number here; docs/design.md, "The extension".
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "kernels.h"
#include "table.h"

namespace resode {

// Three state-sized buffers for the rebuilt states: other(a, b) is one that is neither a nor b
// (a reverse step reads x_{n+1} while it writes x_n and, with refine, the next iterate).
struct StateBuffers {
  std::array<Tensor, 3> t;

  explicit StateBuffers(const Tensor& like)
      : t{at::empty_like(like), at::empty_like(like), at::empty_like(like)} {}

  const Tensor& other(const Tensor& a, const Tensor& b = Tensor()) const {
    for (const Tensor& x : t) {
      if (!x.is_same(a) && !x.is_same(b)) return x;
    }
    TORCH_INTERNAL_ASSERT(false, "resode: no free state buffer");
  }
};

// Segment length of the exact fallback: L = ceil(sqrt(steps)) (resode/_auto.py,
// checkpoint_every), so ceil(steps / L) <= ceil(sqrt(steps)) stored segment starts.
inline int64_t checkpoint_every(int64_t steps) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(double(steps)))));
}

// Steps [first, last) of the forward pass from x0 (not written); returns the state after the
// last of them. With `store` (the contexts of these steps' evaluations; the first evaluation of
// step `first` at index 0) the contexts of the exact backward are stored, and the states are
// written straight into the store (the input slot of the evaluation that reads them): no copy.
template <class Block>
Tensor forward_steps(Block& blk, const Tensor& x0, int64_t scheme, double h, int64_t first,
                     int64_t last, const Store* store, bool update_stats) {
  const bool save = store != nullptr;
  Tensor result = at::empty_like(x0);
  std::array<Tensor, 2> bufs;
  typename Block::Ctx ctx0, ctx1;
  if (!save) {
    bufs = {at::empty_like(x0), at::empty_like(x0)};
    ctx0 = blk.scratch_ctx(x0);
  }
  auto input_slot = [&](int64_t e) { return store->of(0, e); };
  Tensor x = x0;
  if (scheme == schemes::euler) {
    for (int64_t n = first; n < last; ++n) {
      const int64_t e = n - first;
      auto ctx = save ? blk.stored_ctx(*store, e) : ctx0;
      Tensor out = (n == last - 1) ? result : (save ? input_slot(e + 1) : bufs[e % 2]);
      blk.eval(n, x, out, x, h, ctx, update_stats);
      x = out;
    }
    return result;
  }
  if (!save) ctx1 = blk.scratch_ctx(x0);
  Tensor f0 = at::empty_like(x0), f1 = at::empty_like(x0);
  Tensor ybuf = save ? Tensor() : at::empty_like(x0);
  for (int64_t n = first; n < last; ++n) {
    const int64_t e = 2 * (n - first);
    auto c0 = save ? blk.stored_ctx(*store, e) : ctx0;
    auto c1 = save ? blk.stored_ctx(*store, e + 1) : ctx1;
    blk.eval(n, x, f0, Tensor(), 1.0, c0, update_stats);
    Tensor y = save ? input_slot(e + 1) : ybuf;
    kernels::axpby(y, x, 1.0, f0, h);
    blk.eval(n + 1, y, f1, Tensor(), 1.0, c1, update_stats);
    Tensor out = (n == last - 1) ? result : (save ? input_slot(e + 2) : bufs[(n - first) % 2]);
    kernels::heun_combine(out, x, f0, f1, 0.5 * h);
    x = out;
  }
  return result;
}

// The whole forward pass: the output and, with `save`, the stored contexts (one per evaluation).
template <class Block>
std::tuple<Tensor, std::vector<Tensor>> forward_loop(Block& blk, const Tensor& x0,
                                                     int64_t scheme, double h, int64_t depth,
                                                     bool save, bool update_stats) {
  Store store;
  if (save) store = blk.make_store(x0, num_evals(scheme, depth));
  Tensor y = forward_steps(blk, x0, scheme, h, 0, num_steps(scheme, depth),
                           save ? &store : nullptr, update_stats);
  return {y, std::move(store.tensors)};
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

// Exact backward of steps [first, last) from their stored contexts (forward_steps):
// g <- dL/dx_first from g = dL/dx_last; parameter gradients accumulated.
template <class Block>
void backward_steps(Block& blk, const Tensor& g, const Store& store, int64_t scheme, double h,
                    int64_t first, int64_t last) {
  if (scheme == schemes::euler) {
    for (int64_t n = last - 1; n >= first; --n) {
      auto ctx = blk.stored_ctx(store, n - first);
      blk.vjp(n, ctx, g, h, g, /*accumulate=*/true);
    }
    return;
  }
  Tensor gy = at::empty_like(g), gf0 = at::empty_like(g);
  for (int64_t n = last - 1; n >= first; --n) {
    auto c0 = blk.stored_ctx(store, 2 * (n - first));
    auto c1 = blk.stored_ctx(store, 2 * (n - first) + 1);
    heun_step_vjp(blk, n, c0, c1, g, gy, gf0, h);
  }
}

// Exact backward from the contexts the forward stored (backward mode "autograd").
template <class Block>
Tensor backward_stored(Block& blk, const Tensor& grad, const Store& store, int64_t scheme,
                       double h, int64_t depth) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  backward_steps(blk, g, store, scheme, h, 0, num_steps(scheme, depth));
  blk.finish_backward();
  return g;
}

// Exact backward from the stage input x0 (the fallback of backward="auto"): a forward without
// stored contexts keeps the state at the start of every segment of L = ceil(sqrt(steps)) steps;
// then, from the last segment to the first, the segment's forward is run again storing its
// contexts (in one store, reused) and its exact backward is taken. Running statistics are not
// updated. Extra memory: ceil(steps / L) states and the contexts of one segment.
template <class Block>
Tensor backward_from_input(Block& blk, const Tensor& grad, const Tensor& x0, int64_t scheme,
                           double h, int64_t depth) {
  const int64_t steps = num_steps(scheme, depth), every = checkpoint_every(steps);
  const int64_t evals = scheme_info(scheme).evals_per_step;
  std::vector<Tensor> starts{x0};
  for (int64_t first = every; first < steps; first += every) {
    starts.push_back(
        forward_steps(blk, starts.back(), scheme, h, first - every, first, nullptr, false));
  }
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  // one store, for the longest segment (the first), reused by every segment
  const Store store = blk.make_store(x0, every * evals);
  for (int64_t s = static_cast<int64_t>(starts.size()) - 1; s >= 0; --s) {
    const int64_t first = s * every, last = std::min(first + every, steps);
    forward_steps(blk, starts[s], scheme, h, first, last, &store, false);
    backward_steps(blk, g, store, scheme, h, first, last);
    starts.pop_back();
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

// x_n rebuilt from start = x_{n+1} (Euler): the explicit reverse step, then `refine` fixed-point
// iterations x^{k+1} = x_{n+1} - h f_n(x^k) of x_n = x_{n+1} - h f_n(x_n)
// (resode.schemes.Scheme.reverse). Returns a buffer of `buf` other than start; ctx is scratch.
template <class Block, class Ctx>
Tensor rebuild_euler(Block& blk, int64_t n, const Tensor& start, double h, int64_t refine,
                     Ctx& ctx, const StateBuffers& buf) {
  Tensor x = buf.other(start);
  reverse_step_euler(blk, n, start, x, h, ctx);
  for (int64_t k = 0; k < refine; ++k) {
    Tensor next = buf.other(start, x);
    blk.eval(n, x, next, start, -h, ctx, /*update_stats=*/false);
    x = next;
  }
  return x;
}

// Scratch of the Heun reverse step and of its refinement.
struct HeunScratch {
  Tensor a, b, c;
  explicit HeunScratch(const Tensor& like)
      : a(at::empty_like(like)), b(at::empty_like(like)), c(at::empty_like(like)) {}
};

// x_n rebuilt from start = x_{n+1} (Heun): the explicit reverse step (fnext =
// f_{n+1}(x_{n+1})), then `refine` iterations x^{k+1} = x_{n+1} - h/2 (k1 + k2) with
// k1 = f_n(x^k), k2 = f_{n+1}(x^k + h k1). Returns a buffer of `buf` other than start.
template <class Block, class Ctx>
Tensor rebuild_heun(Block& blk, int64_t n, const Tensor& start, const Tensor& fnext, double h,
                    int64_t refine, Ctx& ctx, const StateBuffers& buf, const HeunScratch& s) {
  Tensor x = buf.other(start);
  reverse_step_heun(blk, n, start, fnext, x, h, ctx, s.a, s.b);
  for (int64_t k = 0; k < refine; ++k) {
    Tensor next = buf.other(start, x);
    blk.eval(n, x, s.b, Tensor(), 1.0, ctx, /*update_stats=*/false);      // k1
    kernels::axpby(s.a, x, 1.0, s.b, h);                                  // x + h k1
    blk.eval(n + 1, s.a, s.c, Tensor(), 1.0, ctx, /*update_stats=*/false);  // k2
    kernels::heun_combine(next, start, s.b, s.c, -0.5 * h);
    x = next;
  }
  return x;
}

// Reverse pass: the scheme's reverse steps (with `refine`) from the stage output y back to an
// estimate of the stage input (running statistics untouched).
template <class Block>
Tensor reverse_loop(Block& blk, const Tensor& y, int64_t scheme, double h, int64_t depth,
                    int64_t refine) {
  const StateBuffers buf(y);
  auto ctx = blk.scratch_ctx(y);
  Tensor x = y;  // x_{n+1}; never written while it is `y`
  const int64_t steps = num_steps(scheme, depth);
  if (scheme == schemes::euler) {
    for (int64_t n = steps - 1; n >= 0; --n) x = rebuild_euler(blk, n, x, h, refine, ctx, buf);
  } else {
    const HeunScratch s(y);
    Tensor fnext = at::empty_like(y);
    for (int64_t n = steps - 1; n >= 0; --n) {
      blk.eval(n + 1, x, fnext, Tensor(), 1.0, ctx, /*update_stats=*/false);
      x = rebuild_heun(blk, n, x, fnext, h, refine, ctx, buf, s);
    }
  }
  return x.is_same(y) ? y.clone() : x;
}

// What one reconstruction adjoint pass returns: dL/dx_0, the rebuilt input x^_0 and the running
// maximum of the squared per-step inconsistencies ||Phi_n(x^_n) - x^_{n+1}||^2 ((1,), acc dtype).
// A pass that computes the parameter gradients itself (the persistent CUDA kernel of narrow MLP
// stages, mlp_persistent.h) returns them in `grads` (Block::grads() order); else it is empty.
struct Reconstruction {
  Tensor gx, x0_hat, sq_step_error;
  std::vector<Tensor> grads;
};

// Replaces backward_adjoint (without stored states) when set: (grad, out) -> the pass's result,
// parameter gradients included.
using AdjointPass = std::function<Reconstruction(const Tensor& grad, const Tensor& out)>;

// Reconstruction adjoint: rebuild the states backwards in depth from the output (rebuild_*),
// recompute each step at the rebuilt state, measure its consistency with the state it should
// reach (free: the recomputation is needed anyway) and take its vector-Jacobian product.
// Approximate gradients (O(h^{refine+1}) Euler, O(h^2) or better Heun with depth-smooth
// weights); never updates running statistics.
//
// With `states` (the stored forward contexts, diagnostic mode "adjoint_stored", the paper's
// public code), each x_n is rebuilt from the *stored* x_{n+1} instead of the chained
// reconstruction.
template <class Block>
Reconstruction backward_adjoint(Block& blk, const Tensor& grad, const Tensor& out,
                                int64_t scheme, double h, int64_t depth, int64_t refine,
                                const Store* states = nullptr) {
  blk.prepare_backward(grad);
  Tensor g = grad.clone();
  const StateBuffers buf(out);
  Tensor err = at::zeros({1}, out.options().dtype(acc_dtype(out.scalar_type())));
  auto ctx0 = blk.scratch_ctx(out);
  auto ctx1 = blk.scratch_ctx(out);
  const int64_t steps = num_steps(scheme, depth);
  Tensor x = out;  // x^_{n+1}; never written while it is `out`
  if (scheme == schemes::euler) {
    for (int64_t n = steps - 1; n >= 0; --n) {
      const Tensor start = (states && n + 1 < steps) ? states->of(0, n + 1) : x;
      Tensor xn = rebuild_euler(blk, n, start, h, refine, ctx0, buf);
      const Tensor& phi = buf.other(start, xn);
      blk.eval(n, xn, phi, xn, h, ctx0, false);  // Phi_n(x^_n); ctx0: f_n's context at x^_n
      kernels::sqdist_max(phi, start, err);
      blk.vjp(n, ctx0, g, h, g, /*accumulate=*/true);
      x = xn;
    }
  } else {
    const HeunScratch s(out);
    const std::array<Tensor, 2> fb{at::empty_like(out), at::empty_like(out)};
    Tensor y = at::empty_like(out), gy = at::empty_like(out), gf0 = at::empty_like(out);
    Tensor fnext;  // f_{n+1}(x^_{n+1}) (cached from the previous step's recomputation)
    for (int64_t n = steps - 1; n >= 0; --n) {
      Tensor start = x;
      if (states && n + 1 < steps) {
        start = states->of(0, 2 * (n + 1));  // stored x_{n+1} (input of evaluation 2(n+1))
        fnext = Tensor();
      }
      if (!fnext.defined()) {
        fnext = fb[1];
        blk.eval(n + 1, start, fnext, Tensor(), 1.0, ctx1, false);
      }
      Tensor xn = rebuild_heun(blk, n, start, fnext, h, refine, ctx1, buf, s);
      const Tensor f0 = fb[0].is_same(fnext) ? fb[1] : fb[0];
      blk.eval(n, xn, f0, Tensor(), 1.0, ctx0, false);  // recompute step n at x^_n
      kernels::axpby(y, xn, 1.0, f0, h);
      blk.eval(n + 1, y, s.c, Tensor(), 1.0, ctx1, false);
      const Tensor& phi = buf.other(start, xn);
      kernels::heun_combine(phi, xn, f0, s.c, 0.5 * h);  // Phi_n(x^_n)
      kernels::sqdist_max(phi, start, err);
      heun_step_vjp(blk, n, ctx0, ctx1, g, gy, gf0, h);
      fnext = f0;
      x = xn;
    }
  }
  blk.finish_backward();
  return {g, x, err};
}

// ||a|| (acc dtype, 0-dim) and num / max(||b||, tiny) as in resode._adjoint.relative.
inline Tensor norm_acc(const Tensor& a) {
  return at::linalg_vector_norm(a, 2, std::nullopt, false, acc_dtype(a.scalar_type()));
}

inline Tensor relative_to(const Tensor& num, const Tensor& b) {
  const double tiny = num.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                       : std::numeric_limits<float>::min();
  return num / norm_acc(b).clamp_min(tiny);
}

// The checks of a backward op's scalar arguments; returns the mode's table entry.
inline const ModeInfo& check_backward_args(const char* op, int64_t mode, int64_t refine,
                                           double tol) {
  const ModeInfo* info = find_id(kModes, mode);
  TORCH_CHECK_VALUE(info != nullptr, "resode::", op, "_backward: unknown backward mode ", mode,
                    " (see resode::table())");
  TORCH_CHECK_VALUE(refine >= 0, "resode::", op, "_backward: refine must be >= 0, got ", refine);
  TORCH_CHECK_VALUE(tol > 0 && std::isfinite(tol), "resode::", op,
                    "_backward: tol must be a positive finite number, got ", tol);
  return *info;
}

// The device part of the reconstruction-adjoint backward (modes "adjoint", "adjoint_stored",
// "auto"): the adjoint pass and its report tensors, with no host synchronisation (graphs.h
// captures it in a CUDA graph). Returns {dL/dx0, parameter gradients (Block::grads)..., drift,
// max_step_error}: drift = ||x^_0 - x0|| / ||x0||, max_step_error = max_n ||Phi_n(x^_n) -
// x^_{n+1}|| / ||out|| (0-dim, acc dtype, on the device). `pass`, when set, replaces
// backward_adjoint without stored states ("adjoint", "auto"; not "adjoint_stored").
template <class Block>
std::vector<Tensor> adjoint_part(Block& blk, const Tensor& grad, const Tensor& out_,
                                 const Tensor& x0_, const Store* states, int64_t scheme, double h,
                                 int64_t depth, int64_t refine,
                                 const AdjointPass& pass = nullptr) {
  for (const auto& [name, t] :
       {std::pair<const char*, const Tensor*>{"output", &out_}, {"input", &x0_}}) {
    TORCH_CHECK_VALUE(t->sizes() == grad.sizes() && t->scalar_type() == grad.scalar_type() &&
                          t->device() == grad.device(),
                      "resode::", Block::kName, "_backward: the stage ", name, " is a ",
                      t->sizes(), " ", t->scalar_type(), " tensor on ", t->device(),
                      " but the gradient is ", grad.sizes(), " ", grad.scalar_type(), " on ",
                      grad.device());
  }
  const Tensor out = out_.contiguous(), x0 = x0_.contiguous();
  Reconstruction rec = (pass && states == nullptr)
                           ? pass(grad, out)
                           : backward_adjoint(blk, grad, out, scheme, h, depth, refine, states);
  std::vector<Tensor> result{rec.gx};
  for (Tensor& t : rec.grads.empty() ? blk.grads() : rec.grads) result.push_back(std::move(t));
  result.push_back(relative_to(norm_acc(rec.x0_hat - x0), x0));
  result.push_back(relative_to(rec.sq_step_error.sqrt().squeeze(0), out));
  return result;
}

// The exact gradients from the stage input (auto's fallback): {dL/dx0, parameter gradients...}.
template <class Block>
std::vector<Tensor> exact_from_input(Block& blk, const Tensor& grad, const Tensor& x0,
                                     int64_t scheme, double h, int64_t depth) {
  std::vector<Tensor> result{backward_from_input(blk, grad, x0.contiguous(), scheme, h, depth)};
  for (Tensor& t : blk.grads()) result.push_back(std::move(t));
  return result;
}

// The host part of the adjoint backward, after adjoint_part: "auto"'s drift check (the one
// synchronisation with the device) and its exact fallback (exact(): exact_from_input), then the
// report [drift, max_step_error, fell_back] ((3,), acc dtype, on the device).
template <class Exact>
std::tuple<std::vector<Tensor>, Tensor> finish_adjoint(std::vector<Tensor> part, bool falls_back,
                                                       double tol, Exact&& exact) {
  const Tensor step_error = part.back();
  part.pop_back();
  const Tensor drift = part.back();
  part.pop_back();
  bool fell_back = false;
  if (falls_back && !(drift.item<double>() <= tol)) {  // nan falls back too
    part.clear();  // the discarded pass's gradients
    part = exact();
    fell_back = true;
  }
  Tensor report =
      at::stack({drift, step_error, at::scalar_tensor(fell_back ? 1.0 : 0.0, drift.options())});
  return {std::move(part), report};
}

// The backward op of either block. Modes (table.h): the exact backward from the stored
// contexts ("autograd"); the reconstruction adjoint from the output ("adjoint",
// "adjoint_stored"); "auto": the adjoint, whose gradients are replaced by exact ones computed
// from the stored input x0 (backward_from_input) when drift > tol or is nan. Returns the input
// gradient followed by the parameter gradients (Block::grads, op order), and the report
// [drift, max_step_error, fell_back] ((3,), acc dtype, on the device; both 0 for the exact
// mode). Only "auto" synchronises with the device (to read the drift). `pass`: adjoint_part.
template <class Block>
std::tuple<std::vector<Tensor>, Tensor> run_backward(Block& blk, const Tensor& grad,
                                                     const Tensor& out, const Tensor& x0,
                                                     at::TensorList saved, int64_t scheme,
                                                     double h, int64_t depth, int64_t mode,
                                                     int64_t refine, double tol,
                                                     const AdjointPass& pass = nullptr) {
  const ModeInfo& info = check_backward_args(Block::kName, mode, refine, tol);
  Store store;
  if (info.stores_contexts) {
    const std::vector<Tensor> given = saved.vec();
    store = blk.make_store(grad, num_evals(scheme, depth), &given);
  }
  if (!info.needs_output) {
    std::vector<Tensor> result{backward_stored(blk, grad, store, scheme, h, depth)};
    for (Tensor& t : blk.grads()) result.push_back(std::move(t));
    return {result, at::zeros({3}, grad.options().dtype(acc_dtype(grad.scalar_type())))};
  }
  const Store* states = info.stores_contexts ? &store : nullptr;
  std::vector<Tensor> part =
      adjoint_part(blk, grad, out, x0, states, scheme, h, depth, refine, pass);
  return finish_adjoint(std::move(part), info.falls_back, tol,
                        [&] { return exact_from_input(blk, grad, x0, scheme, h, depth); });
}

}  // namespace resode
