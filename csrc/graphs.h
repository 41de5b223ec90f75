// CUDA-graph replay of the graphable op calls on CUDA tensors (docs/design.md, "The extension").
//
// At the sizes of a fused stage on a GPU, one op call is thousands of tiny launches (cuBLAS /
// cuDNN and the kernels of kernels_cuda.cu): launch-bound. The graphable calls are captured
// once in a CUDA graph and replayed:
//   - the forward without stored contexts (save == false, or a mode that stores none),
//   - the device part of the reconstruction-adjoint backward (modes "adjoint" and "auto":
//     adjoint_part of loops.h; "auto"'s drift check and exact fallback stay eager, after the
//     replay),
//   - the reverse pass.
// The modes that store contexts ("autograd", "adjoint_stored") read the stored lists and stay
// eager.
//
// The graphs live in a bounded cache (16 entries, least recently used out), like cuDNN's plan
// cache; resode::clear_graph_cache() empties it, resode::graph_cache_stats() counts its work.
// The key is the op, every scalar argument, and per tensor argument its sizes, strides, dtype
// and device, plus the data pointer of the parameters and running statistics: the graph reads
// them in place, so in-place updates (optimizer steps) are seen by the next replay; and the
// global numerics settings a capture bakes in (TF32, cuBLAS reductions, cuDNN flags). The
// per-call tensors (x, grad, out, x0, y) are copied into the entry's static input buffers.
// A new key runs eagerly (warm-up: cuBLAS workspaces, cuDNN algorithm choice); the second call
// captures (on a side stream) and replays; later calls replay. Outputs are cloned after the
// replay (the next replay rewrites the graph's buffers). Any failure to capture marks the key
// as not graphable and runs eagerly. RESODE_CUDA_GRAPHS=0 (read at every call) turns it off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "blocks.h"
#include "loops.h"
#include "table.h"

namespace resode {
namespace graphs {

// Does this call go through the graph cache? A CUDA tensor, RESODE_CUDA_GRAPHS not off, not
// inside a body that the cache runs, and the current stream not being captured by someone else
// (e.g. torch.compile's CUDA graphs: the op is then simply part of their graph). Always false
// in a CPU-only build.
bool wanted(const Tensor& x);

// Is backward mode `mode` graphable (the adjoint, without stored contexts)? false for an
// unknown mode (the eager op raises).
bool graphable_backward(int64_t mode);

// The cache key of one call, built argument by argument.
class Key {
 public:
  explicit Key(const char* op) : s_(op) {}
  Key& value(int64_t v);
  Key& value(double v);
  Key& value(bool v);
  template <class... T>
  Key& values(T... v) {
    (value(v), ...);
    return *this;
  }
  // a per-call tensor: sizes, strides, dtype, device
  Key& input(const Tensor& t);
  // a parameter / running statistic: the same and its data pointer (read in place)
  Key& param(const Tensor& t);
  Key& param(const OptTensor& t) { return param(t.has_value() ? *t : Tensor()); }
  Key& params(at::TensorList ts);
  const std::string& str() const { return s_; }

 private:
  void tensor(const Tensor& t, bool pointer);
  std::string s_;
};

// Flat outputs: the tensors of a Tensor / Tensor[] / tuple result and the length of each
// component.
struct Flat {
  std::vector<Tensor> t;
  std::vector<size_t> lens;
};
using Body = std::function<Flat(const std::vector<Tensor>&)>;

// Runs body(inputs) through the cache entry of `key`: eagerly (warm-up, failed capture, or
// graphs off), or by replaying its graph with `inputs` copied into the static inputs (the
// outputs cloned).
Flat run_flat(const std::string& key, const std::vector<Tensor>& inputs, const Body& body);

namespace detail {
inline void put(Flat& f, const Tensor& t) {
  f.t.push_back(t);
  f.lens.push_back(1);
}
inline void put(Flat& f, const std::vector<Tensor>& v) {
  f.t.insert(f.t.end(), v.begin(), v.end());
  f.lens.push_back(v.size());
}
template <class... T>
void put(Flat& f, const std::tuple<T...>& t) {
  std::apply([&](const auto&... e) { (put(f, e), ...); }, t);
}

inline void take(const Flat& f, size_t& i, size_t& k, Tensor& out) {
  out = f.t[i];
  i += f.lens[k++];
}
inline void take(const Flat& f, size_t& i, size_t& k, std::vector<Tensor>& out) {
  out.assign(f.t.begin() + i, f.t.begin() + i + f.lens[k]);
  i += f.lens[k++];
}
template <class... T>
void take(const Flat& f, size_t& i, size_t& k, std::tuple<T...>& t) {
  std::apply([&](auto&... e) { (take(f, i, k, e), ...); }, t);
}
}  // namespace detail

// body(inputs) -> Out (a Tensor, Tensor[] or tuple of them) through the cache (run_flat).
template <class Out, class F>
Out run(const Key& key, const std::vector<Tensor>& inputs, F&& body) {
  const Flat flat = run_flat(key.str(), inputs, [&](const std::vector<Tensor>& in) {
    Flat f;
    detail::put(f, body(in));
    return f;
  });
  Out out;
  size_t i = 0, k = 0;
  detail::take(flat, i, k, out);
  return out;
}

// The backward op of a graphable mode (graphable_backward): adjoint_part through the cache,
// then finish_adjoint eagerly (the drift check of "auto" and its exact fallback).
// make(grad) builds the block (its constructor checks the parameters).
template <class MakeBlock>
std::tuple<std::vector<Tensor>, Tensor> backward(const Key& key, MakeBlock&& make,
                                                 const Tensor& grad, const Tensor& out,
                                                 const Tensor& x0, int64_t scheme, double h,
                                                 int64_t depth, int64_t mode, int64_t refine,
                                                 double tol) {
  using Block = decltype(make(grad));
  const ModeInfo& info = check_backward_args(Block::kName, mode, refine, tol);
  auto part = run<std::vector<Tensor>>(key, {grad, out, x0}, [&](const std::vector<Tensor>& in) {
    const Tensor g = in[0].contiguous();
    Block blk = make(g);
    return adjoint_part(blk, g, in[1], in[2], nullptr, scheme, h, depth, refine);
  });
  return finish_adjoint(std::move(part), info.falls_back, tol, [&] {
    const Tensor g = grad.contiguous();
    Block blk = make(g);
    return exact_from_input(blk, g, x0, scheme, h, depth);
  });
}

}  // namespace graphs
}  // namespace resode
