// The CUDA-graph cache of graphs.h: keys, entries (warm-up, capture, replay), the ops
// resode::clear_graph_cache() and resode::graph_cache_stats(). CPU-only builds keep the keys
// and the ops; wanted() is then always false.
#include "graphs.h"

#include <torch/library.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#ifdef WITH_CUDA
// c10/cuda/CUDAEvent.h aligns a member to std::hardware_destructive_interference_size, which
// GCC warns about (-Winterference-size) in every file that includes it
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#include "env.h"

namespace resode {
namespace graphs {
namespace {

// the body of a call that the cache runs: its inner op calls do not go through the cache
thread_local bool in_body = false;

struct BodyScope {
  bool saved = in_body;
  BodyScope() { in_body = true; }
  ~BodyScope() { in_body = saved; }
};

Flat eager(const Body& body, const std::vector<Tensor>& inputs) {
  BodyScope scope;
  return body(inputs);
}

// the counts returned by resode::graph_cache_stats()
struct Stats {
  int64_t captures = 0, replays = 0, failures = 0;
};

#ifdef WITH_CUDA
constexpr size_t kCapacity = 16;

// The global numerics settings that a capture bakes in (TF32, reduced-precision cuBLAS
// reductions, cuDNN benchmark / deterministic): part of every key, so that a change captures
// again instead of replaying the old choice.
std::string numerics_key() {
  const at::Context& c = at::globalContext();
  const int flags[] = {
      static_cast<int>(c.float32MatmulPrecision()),
      static_cast<int>(c.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)),
      static_cast<int>(c.float32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV)),
      static_cast<int>(c.allowFP16ReductionCuBLAS()),
      static_cast<int>(c.allowBF16ReductionCuBLAS()),
      static_cast<int>(c.benchmarkCuDNN()),
      static_cast<int>(c.deterministicCuDNN()),
      static_cast<int>(c.deterministicAlgorithms())};
  std::string s = ";numerics";
  for (int f : flags) s += "," + std::to_string(f);
  return s;
}

struct Entry {
  std::mutex mutex;  // one call at a time: the static buffers are shared
  int64_t eager_runs = 0;
  bool failed = false;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  std::vector<Tensor> in;  // static inputs (in the graph's memory pool)
  Flat out;                // static outputs (in the graph's memory pool)
  at::cuda::CUDAEvent done;  // after the last replay's clones
  uint64_t last_use = 0;
};

struct Cache {
  std::mutex mutex;
  std::unordered_map<std::string, std::shared_ptr<Entry>> entries;
  uint64_t clock = 0;
  Stats stats;

  // The entry of `key` (new if absent; the least recently used one goes when full). Entries
  // are shared: one evicted while in use lives until that call returns.
  std::shared_ptr<Entry> get(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = entries.find(key);
    if (it == entries.end()) {
      if (entries.size() >= kCapacity) {
        auto oldest = entries.begin();
        for (auto e = entries.begin(); e != entries.end(); ++e) {
          if (e->second->last_use < oldest->second->last_use) oldest = e;
        }
        entries.erase(oldest);
      }
      it = entries.emplace(key, std::make_shared<Entry>()).first;
    }
    it->second->last_use = ++clock;
    return it->second;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no CUDA calls at process exit
  return *c;
}

void count(int64_t Stats::*field) {
  std::lock_guard<std::mutex> lock(cache().mutex);
  ++(cache().stats.*field);
}

// Ends a capture that an exception interrupted (the stream leaves capture mode) and clears
// the non-sticky CUDA error it left.
void abort_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream, &g);
    if (g != nullptr) cudaGraphDestroy(g);
  }
  (void)cudaGetLastError();
}

// Captures body on a side stream (synchronised with the current stream both ways) into e:
// static inputs and outputs in the graph's private memory pool. Throws on failure, leaving e
// without a graph.
void capture(Entry& e, const std::vector<Tensor>& inputs, const Body& body) {
  const c10::DeviceIndex device = inputs.at(0).device().index();
  const at::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream(device);
  const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, device);
  at::cuda::CUDAEvent before, after;
  before.record(current);
  before.block(side);
  {
    const c10::cuda::CUDAStreamGuard guard(side);
    // the cuBLAS workspaces of the side stream, allocated before the capture
    at::cuda::getCurrentCUDABlasHandle();
    at::cuda::getCUDABlasLtWorkspace();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      std::vector<Tensor> in;
      for (const Tensor& t : inputs) in.push_back(at::empty(t.sizes(), t.options()));
      Flat out = eager(body, in);
      graph->capture_end();
      e.in = std::move(in);
      e.out = std::move(out);
      e.graph = std::move(graph);
    } catch (...) {
      abort_capture(side.stream());
      graph.reset();  // releases its memory pool (CUDAGraph::reset)
      e.in.clear();
      e.out = Flat();
      after.record(side);
      after.block(current);
      throw;
    }
  }
  after.record(side);
  after.block(current);
}

// Copies the inputs in, replays on the current stream, clones the outputs.
Flat replay(Entry& e, const std::vector<Tensor>& inputs) {
  const at::cuda::CUDAStream current =
      at::cuda::getCurrentCUDAStream(inputs.at(0).device().index());
  e.done.block(current);  // a replay on another stream has finished with the buffers
  for (size_t i = 0; i < inputs.size(); ++i) e.in[i].copy_(inputs[i]);
  e.graph->replay();
  Flat result;
  result.lens = e.out.lens;
  for (const Tensor& t : e.out.t) result.t.push_back(t.clone());
  e.done.record(current);
  return result;
}
#endif

}  // namespace

bool wanted(const Tensor& x) {
#ifdef WITH_CUDA
  return x.is_cuda() && !in_body && env_switch_on("RESODE_CUDA_GRAPHS") &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
#else
  (void)x;
  return false;
#endif
}

bool graphable_backward(int64_t mode) {
  const ModeInfo* m = find_id(kModes, mode);
  return m != nullptr && m->needs_output && !m->stores_contexts;
}

Key& Key::value(int64_t v) {
  s_ += ";i" + std::to_string(v);
  return *this;
}

Key& Key::value(double v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  s_ += ";d" + std::to_string(bits);
  return *this;
}

Key& Key::value(bool v) {
  s_ += v ? ";T" : ";F";
  return *this;
}

void Key::tensor(const Tensor& t, bool pointer) {
  if (!t.defined()) {
    s_ += ";-";
    return;
  }
  s_ += ";" + std::string(c10::toString(t.scalar_type())) + "@" + t.device().str() + "[";
  for (int64_t s : t.sizes()) s_ += std::to_string(s) + ",";
  s_ += "/";
  for (int64_t s : t.strides()) s_ += std::to_string(s) + ",";
  s_ += "]";
  if (pointer) s_ += "*" + std::to_string(reinterpret_cast<uintptr_t>(t.data_ptr()));
}

Key& Key::input(const Tensor& t) {
  tensor(t, false);
  return *this;
}

Key& Key::param(const Tensor& t) {
  tensor(t, true);
  return *this;
}

Key& Key::params(at::TensorList ts) {
  s_ += ";list" + std::to_string(ts.size());
  for (const Tensor& t : ts) tensor(t, true);
  return *this;
}

Flat run_flat(const std::string& key, const std::vector<Tensor>& inputs, const Body& body) {
#ifdef WITH_CUDA
  std::shared_ptr<Entry> e = cache().get(key + numerics_key());
  std::unique_lock<std::mutex> lock(e->mutex);
  if (!e->failed && e->eager_runs > 0) {
    try {
      if (!e->graph) {
        capture(*e, inputs, body);
        count(&Stats::captures);
      }
      Flat result = replay(*e, inputs);
      count(&Stats::replays);
      return result;
    } catch (const std::exception& err) {
      // not graphable: eager from now on (the eager run raises if the call itself is bad)
      e->failed = true;
      e->graph.reset();
      e->in.clear();
      e->out = Flat();
      count(&Stats::failures);
      TORCH_WARN("resode: CUDA graph of ", key.substr(0, key.find(';')),
                 " failed, running eagerly: ", err.what());
    }
  }
  lock.unlock();
  Flat result = eager(body, inputs);
  lock.lock();
  ++e->eager_runs;  // after a successful run: a call that raises does not warm the key up
  return result;
#else
  (void)key;
  return eager(body, inputs);
#endif
}

namespace {

void clear_graph_cache() {
#ifdef WITH_CUDA
  Cache& c = cache();
  std::unordered_map<std::string, std::shared_ptr<Entry>> gone;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    gone.swap(c.entries);
    c.stats = Stats();
  }
#endif
}

// [entries, captures, replays, failed captures] since the last clear_graph_cache()
std::vector<int64_t> graph_cache_stats() {
#ifdef WITH_CUDA
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.entries.size()), c.stats.captures, c.stats.replays,
          c.stats.failures};
#else
  return {0, 0, 0, 0};
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resode, m) {
  m.def("clear_graph_cache() -> ()", &clear_graph_cache);
  m.def("graph_cache_stats() -> int[]", &graph_cache_stats);
}

}  // namespace graphs
}  // namespace resode
