// The ops of resode._C (TORCH_LIBRARY(resode, m)): one forward, one backward and one reverse op
// per block, the table of the op interface, and has_cuda. Every schema is functional (no input
// is mutated or aliased by an output), so torch.compile can functionalize and trace them. The same depth loops (loops.h) serve
// the CPU and the CUDA dispatch keys; the elementwise kernels they call dispatch on their own
// (kernels.h). Python side: resode/_ops.py (wrappers, fake kernels, autograd formulas);
// docs/design.md, "The extension".
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "graphs.h"
#include "loops.h"
#include "table.h"
#ifdef WITH_CUDA
#include "mlp_persistent.h"
#endif

namespace resode {
namespace {

// The prologue of every op: device guard, ATen calls below autograd (the ops are
// differentiated by the formulas registered from Python, resode/_ops.py, and must not record
// autograd history even when called directly with tensors that require grad), and the checks
// common to all ops.
struct OpScope {
  c10::OptionalDeviceGuard device;
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  OpScope(const char* op, const Tensor& x, int64_t scheme, double h, int64_t depth)
      : device(x.device()) {
    const SchemeInfo* s = find_id(kSchemes, scheme);
    TORCH_CHECK_VALUE(s != nullptr, "resode::", op, ": unknown scheme id ", scheme,
                      " (see resode::table())");
    TORCH_CHECK_VALUE(depth >= s->min_depth, "resode::", op, ": scheme ", s->name, " needs depth >= ",
                      s->min_depth, ", got ", depth);
    TORCH_CHECK_VALUE(std::isfinite(h), "resode::", op, ": step h must be finite, got ", h);
    const auto dt = x.scalar_type();
    if (x.is_cuda()) {
      TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, "resode::",
                       op, ": CUDA fused stages support float32, float64 and bfloat16, got ", dt);
    } else {
      TORCH_CHECK_TYPE(x.device().is_cpu(), "resode::", op, ": unsupported device ", x.device());
      TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, "resode::", op,
                       ": CPU fused stages support float32 and float64, got ", dt);
    }
  }
};

void check_refine(const char* op, int64_t refine) {
  TORCH_CHECK_VALUE(refine >= 0, "resode::", op, ": refine must be >= 0, got ", refine);
}

bool stores_contexts(const char* op, int64_t mode) {
  const ModeInfo* m = find_id(kModes, mode);
  TORCH_CHECK_VALUE(m != nullptr, "resode::", op, ": unknown backward mode id ", mode,
                    " (see resode::table())");
  return m->stores_contexts;
}

// ---------------------------------------------------------------------------------------------
// MLP stage
std::tuple<Tensor, std::vector<Tensor>> mlp_forward(const Tensor& x_, const Tensor& w1,
                                                    const OptTensor& b1, const Tensor& w2,
                                                    const OptTensor& b2, int64_t act,
                                                    int64_t scheme, double h, int64_t depth,
                                                    int64_t mode, bool save) {
  OpScope scope("mlp_forward", x_, scheme, h, depth);
  const Tensor x = x_.contiguous();
  MLPBlock blk(x, w1, b1, w2, b2, act, depth);
  save = stores_contexts("mlp_forward", mode) && save;
#ifdef WITH_CUDA  // one launch for the whole loop: no graph needed
  if (!save && persistent_mlp_applies(x, blk.w1, blk.w2, act, scheme, PersistentPass::forward)) {
    return {persistent_mlp_forward(x, blk.w1, blk.b1, blk.w2, blk.b2, act, scheme, h, depth), {}};
  }
#endif
  if (!save && graphs::wanted(x)) {
    graphs::Key key("mlp_forward");
    key.input(x).param(w1).param(b1).param(w2).param(b2).values(act, scheme, h, depth, mode, save);
    return graphs::run<std::tuple<Tensor, std::vector<Tensor>>>(key, {x}, [&](const auto& in) {
      return mlp_forward(in[0], w1, b1, w2, b2, act, scheme, h, depth, mode, save);
    });
  }
  return forward_loop(blk, x, scheme, h, depth, save, /*update_stats=*/false);
}

std::tuple<std::vector<Tensor>, Tensor> mlp_backward(
    const Tensor& grad_, const Tensor& out, const Tensor& x0, at::TensorList saved,
    const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2, int64_t act,
    int64_t scheme, double h, int64_t depth, int64_t mode, int64_t refine, double tol) {
  OpScope scope("mlp_backward", grad_, scheme, h, depth);
  const Tensor grad = grad_.contiguous();
  MLPBlock blk(grad, w1, b1, w2, b2, act, depth);
  AdjointPass pass;
#ifdef WITH_CUDA  // one launch for the whole adjoint pass: no graph needed
  if (persistent_mlp_applies(grad, blk.w1, blk.w2, act, scheme, PersistentPass::adjoint)) {
    pass = [&](const Tensor& g, const Tensor& y) {
      PersistentAdjoint r = persistent_mlp_adjoint(g, y, blk.w1, blk.b1, blk.w2, blk.b2, act,
                                                   scheme, h, depth, refine);
      return Reconstruction{r.gx, r.x0_hat, r.sq_step_error, std::move(r.grads)};
    };
  }
#endif
  if (!pass && graphs::wanted(grad) && graphs::graphable_backward(mode)) {
    graphs::Key key("mlp_backward");
    key.input(grad).input(out).input(x0).param(w1).param(b1).param(w2).param(b2);
    key.values(act, scheme, h, depth, mode, refine, tol);
    auto make = [&](const Tensor& g) { return MLPBlock(g, w1, b1, w2, b2, act, depth); };
    return graphs::backward(key, make, grad, out, x0, scheme, h, depth, mode, refine, tol);
  }
  return run_backward(blk, grad, out, x0, saved, scheme, h, depth, mode, refine, tol, pass);
}

Tensor mlp_reverse(const Tensor& y_, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                   const OptTensor& b2, int64_t act, int64_t scheme, double h, int64_t depth,
                   int64_t refine) {
  OpScope scope("mlp_reverse", y_, scheme, h, depth);
  check_refine("mlp_reverse", refine);
  const Tensor y = y_.contiguous();
  MLPBlock blk(y, w1, b1, w2, b2, act, depth);
#ifdef WITH_CUDA
  if (persistent_mlp_applies(y, blk.w1, blk.w2, act, scheme, PersistentPass::reverse)) {
    return persistent_mlp_reverse(y, blk.w1, blk.b1, blk.w2, blk.b2, act, scheme, h, depth,
                                  refine);
  }
#endif
  if (graphs::wanted(y)) {
    graphs::Key key("mlp_reverse");
    key.input(y).param(w1).param(b1).param(w2).param(b2).values(act, scheme, h, depth, refine);
    return graphs::run<Tensor>(key, {y}, [&](const auto& in) {
      return mlp_reverse(in[0], w1, b1, w2, b2, act, scheme, h, depth, refine);
    });
  }
  return reverse_loop(blk, y, scheme, h, depth, refine);
}

// ---------------------------------------------------------------------------------------------
// Conv stage

// The update counts per parameter slot as a long tensor on `device`, filled run by run on the
// device (no host-to-device copy: capturable in a CUDA graph, no synchronisation).
Tensor counts_tensor(const std::vector<int64_t>& counts, const c10::Device& device) {
  const int64_t n = static_cast<int64_t>(counts.size());
  Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && counts[j] == counts[i]) ++j;
    t.slice(0, i, j).fill_(counts[i]);
    i = j;
  }
  return t;
}

// The schema is functional (torch.compile can trace it): the running statistics are not
// updated in place; in training mode (update_stats) their updated values come back as new
// tensors, which the caller stores (resode/_ops.py), with the number of updates per block
// (for num_batches_tracked).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, Tensor> conv_forward(
    const Tensor& x_, at::TensorList params, at::TensorList running, int64_t scheme, double h,
    int64_t depth, bool training, bool update_stats, double momentum, double eps, int64_t mode,
    bool save) {
  OpScope scope("conv_forward", x_, scheme, h, depth);
  if (graphs::wanted(x_) && !(save && stores_contexts("conv_forward", mode))) {
    graphs::Key key("conv_forward");
    key.input(x_).params(params).params(running);
    key.values(scheme, h, depth, training, update_stats, momentum, eps, mode, save);
    using Out = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, Tensor>;
    return graphs::run<Out>(key, {x_}, [&](const auto& in) {
      return conv_forward(in[0], params, running, scheme, h, depth, training, update_stats,
                          momentum, eps, mode, save);
    });
  }
  const Tensor x = x_.contiguous();
  const bool update = update_stats && training;
  std::vector<Tensor> new_running;
  if (update) {
    for (const Tensor& r : running) new_running.push_back(r.clone(at::MemoryFormat::Contiguous));
  }
  ConvBlock blk(x, params, update ? at::TensorList(new_running) : running, training, momentum,
                eps, depth);
  save = stores_contexts("conv_forward", mode) && save;
  auto [y, store] = forward_loop(blk, x, scheme, h, depth, save, update);
  return {y, store, new_running, counts_tensor(blk.counts, x.device())};
}

// `training`: batch statistics in the backward's recomputations (the forward's rule), or the
// running statistics (eval mode; also the paper code's adjoint, resode/_ops.py).
std::tuple<std::vector<Tensor>, Tensor> conv_backward(
    const Tensor& grad_, const Tensor& out, const Tensor& x0, at::TensorList saved,
    at::TensorList params, at::TensorList running, int64_t scheme, double h, int64_t depth,
    bool training, double eps, int64_t mode, int64_t refine, double tol) {
  OpScope scope("conv_backward", grad_, scheme, h, depth);
  if (graphs::wanted(grad_) && graphs::graphable_backward(mode)) {
    graphs::Key key("conv_backward");
    key.input(grad_).input(out).input(x0).params(params).params(running);
    key.values(scheme, h, depth, training, eps, mode, refine, tol);
    auto make = [&](const Tensor& g) {
      return ConvBlock(g, params, running, training, 0.0, eps, depth);
    };
    return graphs::backward(key, make, grad_, out, x0, scheme, h, depth, mode, refine, tol);
  }
  const Tensor grad = grad_.contiguous();
  ConvBlock blk(grad, params, running, training, 0.0, eps, depth);
  return run_backward(blk, grad, out, x0, saved, scheme, h, depth, mode, refine, tol);
}

Tensor conv_reverse(const Tensor& y_, at::TensorList params, at::TensorList running,
                    int64_t scheme, double h, int64_t depth, bool training, double eps,
                    int64_t refine) {
  OpScope scope("conv_reverse", y_, scheme, h, depth);
  check_refine("conv_reverse", refine);
  if (graphs::wanted(y_)) {
    graphs::Key key("conv_reverse");
    key.input(y_).params(params).params(running).values(scheme, h, depth, training, eps, refine);
    return graphs::run<Tensor>(key, {y_}, [&](const auto& in) {
      return conv_reverse(in[0], params, running, scheme, h, depth, training, eps, refine);
    });
  }
  const Tensor y = y_.contiguous();
  ConvBlock blk(y, params, running, training, 0.0, eps, depth);
  return reverse_loop(blk, y, scheme, h, depth, refine);
}

// ---------------------------------------------------------------------------------------------
// The table of table.h as JSON (read once by resode/_ops.py).
template <class T, size_t N, class F>
void json_list(std::ostringstream& o, const char* key, const T (&items)[N], F item) {
  o << '"' << key << "\": [";
  for (size_t i = 0; i < N; ++i) {
    o << (i ? ", " : "") << '{';
    item(items[i]);
    o << '}';
  }
  o << ']';
}

std::string table_json() {
  std::ostringstream o;
  auto b = [](bool v) { return v ? "true" : "false"; };
  auto store = [&](const StoreGroup& g) {
    o << "\"name\": \"" << g.name << "\", \"shape\": \"" << g.shape << "\", \"dtype\": \""
      << g.dtype << "\", \"stacked\": " << b(g.stacked) << ", \"only_if\": \"" << g.only_if
      << '"';
  };
  auto param = [&](const ParamInfo& p) {
    o << "\"name\": \"" << p.name << "\", \"shape\": \"" << p.shape << '"';
  };
  o << '{';
  json_list(o, "schemes", kSchemes, [&](const SchemeInfo& s) {
    o << "\"name\": \"" << s.name << "\", \"id\": " << s.id
      << ", \"steps_offset\": " << s.steps_offset << ", \"evals_per_step\": " << s.evals_per_step
      << ", \"min_depth\": " << s.min_depth;
  });
  o << ", ";
  json_list(o, "modes", kModes, [&](const ModeInfo& m) {
    o << "\"name\": \"" << m.name << "\", \"id\": " << m.id
      << ", \"stores_contexts\": " << b(m.stores_contexts)
      << ", \"needs_output\": " << b(m.needs_output) << ", \"falls_back\": " << b(m.falls_back);
  });
  o << ", ";
  json_list(o, "activations", kActivations, [&](const ActivationInfo& a) {
    o << "\"name\": \"" << a.name << "\", \"id\": " << a.id
      << ", \"needs_preactivation\": " << b(a.needs_preactivation);
  });
  o << ", \"acc_dtype\": {";  // dtype of the per-channel statistics (store dtype "acc")
  const at::ScalarType dtypes[] = {at::kFloat, at::kDouble, at::kBFloat16};
  for (size_t i = 0; i < 3; ++i) {
    o << (i ? ", " : "") << '"' << at::toString(dtypes[i]) << "\": \""
      << at::toString(acc_dtype(dtypes[i])) << '"';
  }
  o << '}';
  o << ", \"mlp\": {";
  json_list(o, "store", kMLPStore, store);
  o << ", ";
  json_list(o, "params", kMLPParams, param);
  o << "}, \"conv\": {";
  json_list(o, "store", kConvStore, store);
  o << ", ";
  json_list(o, "params", kConvParams, param);
  o << ", ";
  json_list(o, "running", kConvRunning, param);
  o << "}}";
  return o.str();
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
      "float h, int depth, int mode, bool save) -> (Tensor, Tensor[])");
  m.def(
      "mlp_backward(Tensor grad, Tensor out, Tensor x0, Tensor[] saved, Tensor w1, Tensor? b1, "
      "Tensor w2, Tensor? b2, int act, int scheme, float h, int depth, int mode, int refine, "
      "float tol) -> (Tensor[], Tensor)");
  m.def(
      "mlp_reverse(Tensor y, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act, int scheme, "
      "float h, int depth, int refine) -> Tensor");
  m.def(
      "conv_forward(Tensor x, Tensor[] params, Tensor[] running, int scheme, float h, "
      "int depth, bool training, bool update_stats, float momentum, float eps, int mode, "
      "bool save) -> (Tensor, Tensor[], Tensor[], Tensor)");
  m.def(
      "conv_backward(Tensor grad, Tensor out, Tensor x0, Tensor[] saved, Tensor[] params, "
      "Tensor[] running, int scheme, float h, int depth, bool training, float eps, int mode, "
      "int refine, float tol) -> (Tensor[], Tensor)");
  m.def(
      "conv_reverse(Tensor y, Tensor[] params, Tensor[] running, int scheme, float h, int depth, "
      "bool training, float eps, int refine) -> Tensor");
  m.def("table() -> str", &table_json);
  m.def("has_cuda() -> bool", &has_cuda);
}

// The loops are device-agnostic: the same functions serve both dispatch keys.
#define RESODE_IMPL_OPS(m)                     \
  m.impl("mlp_forward", &mlp_forward);         \
  m.impl("mlp_backward", &mlp_backward);       \
  m.impl("mlp_reverse", &mlp_reverse);         \
  m.impl("conv_forward", &conv_forward);       \
  m.impl("conv_backward", &conv_backward);     \
  m.impl("conv_reverse", &conv_reverse)

TORCH_LIBRARY_IMPL(resode, CPU, m) { RESODE_IMPL_OPS(m); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(resode, CUDA, m) { RESODE_IMPL_OPS(m); }
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
