// The one table of the op interface: schemes, backward modes, activations, the layout of the
// stored contexts and the parameter lists of each block. The C++ code is written against these
// X-macros; Python reads the same table through the op `resode::table()` (JSON, see
// table_json() in ops.cpp) -- nothing here is mirrored by hand on the Python side
// (docs/design.md, "The extension").
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace resode {

// Schemes: X(name, id, steps_offset, evals_per_step, min_depth).
// A stage of `depth` residual functions takes depth - steps_offset steps; step n evaluates the
// functions n, n + 1, ..., n + evals_per_step - 1 (Euler: f_n; Heun: f_n, f_{n+1}).
#define RESODE_SCHEMES(X) \
  X(euler, 0, 0, 1, 1)    \
  X(heun, 1, 1, 2, 2)

// Backward modes: X(identifier, name, id, stores_contexts, needs_output, falls_back).
// stores_contexts: the forward keeps one context per block evaluation (exact backward);
// needs_output: the backward rebuilds the states from the stage output (the reconstruction
// adjoint, with `refine` fixed-point iterations per reverse step and the drift check);
// falls_back: when the drift exceeds `tol`, the adjoint pass is discarded and exact gradients
// are recomputed from the stored stage input over ceil(sqrt(steps)) segments ("auto").
// (The identifier of "auto" is auto_: `auto` is a C++ keyword.)
#define RESODE_MODES(X)                                        \
  X(autograd, "autograd", 0, true, false, false)               \
  X(adjoint, "adjoint", 1, false, true, false)                 \
  X(adjoint_stored, "adjoint_stored", 2, true, true, false)    \
  X(auto_, "auto", 3, false, true, true)

// MLP activations: X(name, id, needs_preactivation). The derivative of tanh and relu is a
// function of the activation; gelu's needs the pre-activation, which is then stored too.
#define RESODE_ACTIVATIONS(X) \
  X(tanh, 0, false)           \
  X(relu, 1, false)           \
  X(gelu, 2, true)

// Stored contexts of the exact backward, group after group:
// X(name, shape, dtype, stacked, only_if)
//   shape:   input (like the stage input), hidden (batch, hidden), channels (C,)
//   dtype:   value (the input's dtype) or acc (float64 for float64 inputs, else float32)
//   stacked: false: one tensor per block evaluation (separate allocations, like autograd's:
//            glibc would mmap and page-fault a single large buffer again at every step);
//            true: one (evaluations, *shape) tensor
//   only_if: always, or the activation flag under which the group is stored
// Group `input` holds the evaluation inputs: store[e] is the input of evaluation e.
#define RESODE_MLP_STORE(X)                                   \
  X(input, input, value, false, always)                       \
  X(activation, hidden, value, false, always)                 \
  X(preactivation, hidden, value, false, needs_preactivation)

#define RESODE_CONV_STORE(X)                 \
  X(input, input, value, false, always)      \
  X(bn1_xhat, input, value, false, always)   \
  X(relu1, input, value, false, always)      \
  X(bn2_xhat, input, value, false, always)   \
  X(bn1_invstd, channels, acc, true, always) \
  X(bn2_invstd, channels, acc, true, always)

// Parameters (each stacked over blocks: leading size 1 if tied, else depth), in op order, with
// their per-block shapes. X(name, per-block shape)
#define RESODE_MLP_PARAMS(X) \
  X(w1, "(hidden, dim)")     \
  X(b1, "(hidden,)")         \
  X(w2, "(dim, hidden)")     \
  X(b2, "(dim,)")

#define RESODE_CONV_PARAMS(X)       \
  X(conv1.weight, "(C, C, 3, 3)")   \
  X(conv1.bias, "(C,)")             \
  X(bn1.weight, "(C,)")             \
  X(bn1.bias, "(C,)")               \
  X(conv2.weight, "(C, C, 3, 3)")   \
  X(conv2.bias, "(C,)")             \
  X(bn2.weight, "(C,)")             \
  X(bn2.bias, "(C,)")

#define RESODE_CONV_RUNNING(X)  \
  X(bn1.running_mean, "(C,)")   \
  X(bn1.running_var, "(C,)")    \
  X(bn2.running_mean, "(C,)")   \
  X(bn2.running_var, "(C,)")

// ---------------------------------------------------------------------------------------------
// C++ views of the table.
#define RESODE_ENUM_ENTRY(name, id, ...) name = id,
namespace schemes {
enum : int64_t { RESODE_SCHEMES(RESODE_ENUM_ENTRY) };
}
namespace modes {
#define RESODE_MODE_ENUM_ENTRY(ident, name, id, ...) ident = id,
enum : int64_t { RESODE_MODES(RESODE_MODE_ENUM_ENTRY) };
#undef RESODE_MODE_ENUM_ENTRY
}
namespace acts {
enum : int64_t { RESODE_ACTIVATIONS(RESODE_ENUM_ENTRY) };
}
#undef RESODE_ENUM_ENTRY

struct SchemeInfo {
  const char* name;
  int64_t id, steps_offset, evals_per_step, min_depth;
};
struct ModeInfo {
  const char* name;
  int64_t id;
  bool stores_contexts, needs_output, falls_back;
};
struct ActivationInfo {
  const char* name;
  int64_t id;
  bool needs_preactivation;
};
struct StoreGroup {
  const char *name, *shape, *dtype;
  bool stacked;
  const char* only_if;
};
struct ParamInfo {
  const char *name, *shape;
};

#define RESODE_INFO_ENTRY(name, ...) {#name, __VA_ARGS__},
inline constexpr SchemeInfo kSchemes[] = {RESODE_SCHEMES(RESODE_INFO_ENTRY)};
#define RESODE_MODE_INFO_ENTRY(ident, ...) {__VA_ARGS__},
inline constexpr ModeInfo kModes[] = {RESODE_MODES(RESODE_MODE_INFO_ENTRY)};
#undef RESODE_MODE_INFO_ENTRY
inline constexpr ActivationInfo kActivations[] = {RESODE_ACTIVATIONS(RESODE_INFO_ENTRY)};
#undef RESODE_INFO_ENTRY
#define RESODE_STORE_ENTRY(name, shape, dtype, stacked, only_if) \
  {#name, #shape, #dtype, stacked, #only_if},
inline constexpr StoreGroup kMLPStore[] = {RESODE_MLP_STORE(RESODE_STORE_ENTRY)};
inline constexpr StoreGroup kConvStore[] = {RESODE_CONV_STORE(RESODE_STORE_ENTRY)};
#undef RESODE_STORE_ENTRY
#define RESODE_PARAM_ENTRY(name, shape) {#name, shape},
inline constexpr ParamInfo kMLPParams[] = {RESODE_MLP_PARAMS(RESODE_PARAM_ENTRY)};
inline constexpr ParamInfo kConvParams[] = {RESODE_CONV_PARAMS(RESODE_PARAM_ENTRY)};
inline constexpr ParamInfo kConvRunning[] = {RESODE_CONV_RUNNING(RESODE_PARAM_ENTRY)};
#undef RESODE_PARAM_ENTRY

// Index of each group in its store table: mlp_store::input, conv_store::bn1_invstd, ...
#define RESODE_INDEX_ENTRY(name, ...) name,
namespace mlp_store {
enum : int { RESODE_MLP_STORE(RESODE_INDEX_ENTRY) count };
}
namespace conv_store {
enum : int { RESODE_CONV_STORE(RESODE_INDEX_ENTRY) count };
}
#undef RESODE_INDEX_ENTRY

// The entry with id `id` (ids are checked before use: OpScope and stores_contexts in ops.cpp).
template <class T, size_t N>
const T* find_id(const T (&entries)[N], int64_t id) {
  for (const T& e : entries) {
    if (e.id == id) return &e;
  }
  return nullptr;
}

inline const SchemeInfo& scheme_info(int64_t id) { return *find_id(kSchemes, id); }

inline int64_t num_steps(int64_t scheme_id, int64_t depth) {
  return depth - scheme_info(scheme_id).steps_offset;
}

// Block evaluations of one forward pass.
inline int64_t num_evals(int64_t scheme_id, int64_t depth) {
  return num_steps(scheme_id, depth) * scheme_info(scheme_id).evals_per_step;
}

// Per-channel statistics (mean, invstd, reductions) use this dtype (the store's `acc`): double
// for double tensors, float otherwise (float32, bfloat16).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace resode
