// Persistent CUDA kernels of narrow MLP stages (mlp_persistent.h): one launch per depth loop.
//
// Grid: one CTA (kThreads threads) per tile of R batch rows (R = 8, or 16 for large batches).
// Dynamic shared memory, float32, every row padded by one float against bank conflicts:
//   weight slots   slots x [W1 (H, D+1) | W2 (D, H+1) | b1 (H) | b2 (D)]  (absent biases: 0)
//   state buffers  nstate x (R, D+1)    x, rebuilt states, g, scratch
//   hidden buffers nhidden x (R, H+1)   z, a (one pair per context), ga
//   reduction      kWarps floats
// The weights of block p are staged (as float) when the evaluated block changes; with two slots
// (Heun, untied, when they fit) the alternating blocks n / n + 1 stay resident (least recently
// used slot replaced). Every phase (a loop over a tile buffer) ends with __syncthreads(); rows
// past the batch are never read or written. All arithmetic is float32 (bfloat16 inputs and
// weights are converted when loaded, the results rounded when stored).
//
// The loops below follow loops.h (forward_steps, rebuild_euler / rebuild_heun,
// backward_adjoint, heun_step_vjp, reverse_loop) operation by operation, and the block
// arithmetic follows MLPBlock::eval / vjp (blocks.cpp) and the act_forward / act_backward
// formulas of kernels_cuda.cu, so the results equal the cuBLAS path's up to float32 summation
// order. The parameter gradients are float32 accumulators zeroed before the launch: each tile
// adds its part of every evaluation's gradient with one atomicAdd per element; the squared
// per-step inconsistency of each tile is added to a (steps,) float32 buffer whose maximum is taken
// after the kernel. docs/design.md, "The extension".
#include "mlp_persistent.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "env.h"
#include "table.h"

namespace resode {
namespace {

constexpr int kThreads = 256;  // a multiple of 32 (the reduction of sqdist)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxWidth = 128;  // dim and hidden covered (narrow stages)

// The shared-memory layout of one CTA, in floats (computed on the host, passed by value).
struct Layout {
  int R = 0, D = 0, H = 0, ldD = 0, ldH = 0, slots = 0, nstate = 0, nhidden = 0;
  int64_t slot_floats = 0, state_off = 0, hidden_off = 0, red_off = 0, total = 0;

  size_t bytes() const { return static_cast<size_t>(total) * sizeof(float); }
};

Layout make_layout(int R, int D, int H, int slots, int nstate, int nhidden) {
  Layout L;
  L.R = R;
  L.D = D;
  L.H = H;
  L.ldD = D + 1;
  L.ldH = H + 1;
  L.slots = slots;
  L.nstate = nstate;
  L.nhidden = nhidden;
  L.slot_floats = int64_t(H) * L.ldD + int64_t(D) * L.ldH + H + D;
  L.state_off = slots * L.slot_floats;
  L.hidden_off = L.state_off + int64_t(nstate) * R * L.ldD;
  L.red_off = L.hidden_off + int64_t(nhidden) * R * L.ldH;
  L.total = L.red_off + kWarps;
  return L;
}

// State and hidden buffers of each pass (indices used by the kernels below).
void buffer_counts(PersistentPass pass, int64_t scheme, int* nstate, int* nhidden) {
  const bool heun = scheme == schemes::heun;
  switch (pass) {
    case PersistentPass::forward:  // x, out (ping-pong); Heun: f0, f1, y
      *nstate = heun ? 5 : 2;
      *nhidden = 2;  // z, a
      return;
    case PersistentPass::reverse:  // 3 rebuilt states; Heun: yrev, fy / k1, k2, fnext
      *nstate = heun ? 7 : 3;
      *nhidden = 2;
      return;
    case PersistentPass::adjoint:  // 3 rebuilt states, g; Heun: s.a/b/c, fb[2], y, gy, gf0
      *nstate = heun ? 12 : 4;
      *nhidden = heun ? 5 : 3;  // z0, a0, ga; Heun: z1, a1
      return;
  }
}

// The layout for this call, or false when none fits the device's shared memory.
bool choose_layout(int64_t B, int64_t D, int64_t H, int64_t P, int64_t scheme,
                   PersistentPass pass, Layout* out) {
  if (B < 1 || D < 1 || H < 1 || D > kMaxWidth || H > kMaxWidth) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = prop->sharedMemPerBlockOptin;
  int nstate = 0, nhidden = 0;
  buffer_counts(pass, scheme, &nstate, &nhidden);
  // R = 16 only when the batch still gives every SM a tile; two weight slots only where the
  // evaluated blocks alternate (Heun, untied)
  const int R0 = B >= 16 * int64_t(prop->multiProcessorCount) ? 16 : 8;
  const int max_slots = (scheme == schemes::heun && P > 1) ? 2 : 1;
  for (int slots = max_slots; slots >= 1; --slots) {
    for (int R = R0; R >= 8; R /= 2) {
      const Layout L = make_layout(R, int(D), int(H), slots, nstate, nhidden);
      if (L.bytes() <= limit) {
        *out = L;
        return true;
      }
    }
  }
  return false;
}

template <typename scalar_t>
struct Args {
  const scalar_t* in = nullptr;   // x0 (forward), grad (adjoint), y (reverse): (B, D)
  const scalar_t* in2 = nullptr;  // out (adjoint)
  scalar_t* out = nullptr;        // y (forward), gx (adjoint), rebuilt x0 (reverse)
  scalar_t* out2 = nullptr;       // rebuilt x0 (adjoint)
  const scalar_t *w1 = nullptr, *b1 = nullptr, *w2 = nullptr, *b2 = nullptr;  // b: null if absent
  float *gw1 = nullptr, *gb1 = nullptr, *gw2 = nullptr, *gb2 = nullptr;  // adjoint, zeroed
  float* err = nullptr;  // adjoint: (steps,) squared inconsistencies, zeroed
  int64_t B = 0, P = 1, steps = 0, refine = 0;
  int act = 0, scheme = 0;
  double h = 0.0;
  Layout L;
};

__device__ __forceinline__ float gelu_f(float z) {
  return 0.5f * z * (1.0f + erf(z * 0.70710678118654752440f));
}

__device__ __forceinline__ float gelu_grad_f(float z) {
  const float cdf = 0.5f * (1.0f + erf(z * 0.70710678118654752440f));
  const float pdf = exp(-0.5f * z * z) * 0.3989422804014327f;
  return cdf + z * pdf;
}

__device__ __forceinline__ float act_f(float z, int act) {
  if (act == acts::tanh) return tanh(z);
  if (act == acts::relu) return z > 0.0f ? z : 0.0f;
  return gelu_f(z);
}

// scale * g * act'(z), a = act(z) (kernels_cuda.cu act_backward_kernel)
__device__ __forceinline__ float act_grad(float g, float z, float a, int act, float scale) {
  if (act == acts::tanh) return scale * (g * (1.0f - a * a));
  if (act == acts::relu) return a > 0.0f ? scale * g : 0.0f;
  return scale * (g * gelu_grad_f(z));
}

// One staged block: pointers into a weight slot.
struct Weights {
  const float *w1, *w2, *b1, *b2;
};

// The CTA's view of its tile: buffers, the weight cache and the block operations (blocks.h
// semantics on (rows, D) float buffers with row stride L.ldD, hidden ones with L.ldH).
template <typename scalar_t>
class Tile {
 public:
  __device__ Tile(const Args<scalar_t>& a, float* smem) : a_(a), s_(smem) {
    row0_ = int64_t(blockIdx.x) * a.L.R;
    rows_ = static_cast<int>(min(int64_t(a.L.R), a.B - row0_));
  }

  __device__ float* state(int i) const {
    return s_ + a_.L.state_off + int64_t(i) * a_.L.R * a_.L.ldD;
  }
  __device__ float* hidden(int i) const {
    return s_ + a_.L.hidden_off + int64_t(i) * a_.L.R * a_.L.ldH;
  }

  // dst <- the tile's rows of the (B, D) tensor src
  __device__ void load(const scalar_t* src, float* dst) const {
    const int D = a_.L.D;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int r = i / D, k = i % D;
      dst[r * a_.L.ldD + k] = static_cast<float>(src[(row0_ + r) * D + k]);
    }
    __syncthreads();
  }

  // the tile's rows of the (B, D) tensor dst <- src
  __device__ void store(const float* src, scalar_t* dst) const {
    const int D = a_.L.D;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int r = i / D, k = i % D;
      dst[(row0_ + r) * D + k] = static_cast<scalar_t>(src[r * a_.L.ldD + k]);
    }
    __syncthreads();
  }

  // out = alpha * x + beta * y (out may alias x or y: read before written, same thread)
  __device__ void axpby(float* out, const float* x, float alpha, const float* y,
                        float beta) const {
    const int D = a_.L.D;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int o = (i / D) * a_.L.ldD + i % D;
      out[o] = alpha * x[o] + beta * y[o];
    }
    __syncthreads();
  }

  // out = x + c * (f0 + f1)
  __device__ void heun_combine(float* out, const float* x, const float* f0, const float* f1,
                               float c) const {
    const int D = a_.L.D;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int o = (i / D) * a_.L.ldD + i % D;
      out[o] = x[o] + c * (f0[o] + f1[o]);
    }
    __syncthreads();
  }

  // err[step] += sum over the tile of (a - b)^2
  __device__ void sqdist(const float* a, const float* b, int64_t step) const {
    const int D = a_.L.D;
    float s = 0.0f;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int o = (i / D) * a_.L.ldD + i % D;
      const float d = a[o] - b[o];
      s += d * d;
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    float* red = s_ + a_.L.red_off;
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.0f;
      for (int w = 0; w < kWarps; ++w) t += red[w];
      atomicAdd(a_.err + step, t);
    }
    __syncthreads();
  }

  // MLPBlock::eval: z = x W1^T + b1, a = act(z); with out: out = base + c f_n(x)
  // (base + c b2, then + c (a W2^T)), or without base out = (a W2^T + b2), times c if c != 1.
  // out must alias neither x nor z / a; it may alias base.
  __device__ void eval(int64_t n, const float* x, float* out, const float* base, float c,
                       float* z, float* av) {
    const Weights w = weights(n);
    const int D = a_.L.D, H = a_.L.H, ldD = a_.L.ldD, ldH = a_.L.ldH;
    for (int i = threadIdx.x; i < rows_ * H; i += blockDim.x) {
      const int r = i / H, j = i % H;
      const float* xr = x + r * ldD;
      const float* wj = w.w1 + j * ldD;
      float s = 0.0f;
      for (int k = 0; k < D; ++k) s += xr[k] * wj[k];
      const float zv = w.b1[j] + s;
      z[r * ldH + j] = zv;
      av[r * ldH + j] = act_f(zv, a_.act);
    }
    __syncthreads();
    if (out == nullptr) return;
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int r = i / D, k = i % D;
      const float* ar = av + r * ldH;
      const float* wk = w.w2 + k * ldH;
      float s = 0.0f;
      for (int j = 0; j < H; ++j) s += ar[j] * wk[j];
      float v;
      if (base != nullptr) {
        v = base[r * ldD + k] + c * w.b2[k];
        v = v + c * s;
      } else {
        v = s + w.b2[k];
        if (c != 1.0f) v = v * c;
      }
      out[r * ldD + k] = v;
    }
    __syncthreads();
  }

  // MLPBlock::vjp of scale * <g, f_n(x)> with the context (x, z, a): parameter gradients added
  // to the float32 accumulators, the input gradient added to gx (accumulate) or written to it.
  // gx may alias g (g is read completely before gx is written); ga is scratch (rows, H).
  __device__ void vjp(int64_t n, const float* x, const float* z, const float* av, const float* g,
                      float scale, float* gx, bool accumulate, float* ga) {
    const Weights w = weights(n);
    const int64_t p = a_.P == 1 ? 0 : n;
    const int D = a_.L.D, H = a_.L.H, ldD = a_.L.ldD, ldH = a_.L.ldH;
    // phase 1: ga = scale * (g W2) * act'(z); W2 and b2 gradients (read g and a)
    for (int i = threadIdx.x; i < rows_ * H; i += blockDim.x) {
      const int r = i / H, j = i % H;
      const float* gr = g + r * ldD;
      float s = 0.0f;
      for (int k = 0; k < D; ++k) s += gr[k] * w.w2[k * ldH + j];
      ga[r * ldH + j] = act_grad(s, z[r * ldH + j], av[r * ldH + j], a_.act, scale);
    }
    float* gw2 = a_.gw2 + p * D * H;
    for (int i = threadIdx.x; i < D * H; i += blockDim.x) {
      const int k = i / H, j = i % H;
      float s = 0.0f;
      for (int r = 0; r < rows_; ++r) s += g[r * ldD + k] * av[r * ldH + j];
      atomicAdd(gw2 + i, scale * s);
    }
    if (a_.gb2 != nullptr) {
      for (int k = threadIdx.x; k < D; k += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < rows_; ++r) s += g[r * ldD + k];
        atomicAdd(a_.gb2 + p * D + k, scale * s);
      }
    }
    __syncthreads();
    // phase 2: W1 and b1 gradients (read ga and x); gx (+)= ga W1
    float* gw1 = a_.gw1 + p * H * D;
    for (int i = threadIdx.x; i < H * D; i += blockDim.x) {
      const int j = i / D, k = i % D;
      float s = 0.0f;
      for (int r = 0; r < rows_; ++r) s += ga[r * ldH + j] * x[r * ldD + k];
      atomicAdd(gw1 + i, s);
    }
    if (a_.gb1 != nullptr) {
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < rows_; ++r) s += ga[r * ldH + j];
        atomicAdd(a_.gb1 + p * H + j, s);
      }
    }
    for (int i = threadIdx.x; i < rows_ * D; i += blockDim.x) {
      const int r = i / D, k = i % D;
      const float* gar = ga + r * ldH;
      float s = 0.0f;
      for (int j = 0; j < H; ++j) s += gar[j] * w.w1[j * ldD + k];
      const int o = r * ldD + k;
      gx[o] = accumulate ? gx[o] + s : s;
    }
    __syncthreads();
  }

 private:
  const Args<scalar_t>& a_;
  float* s_;
  int64_t row0_ = 0;
  int rows_ = 0;
  int64_t cached_[2] = {-1, -1};  // block index held by each weight slot
  int last_ = 0;                  // the slot used last

  // The weights of block n, staged into a slot unless one holds them already. Uniform over
  // the CTA (every thread keeps the same cache state).
  __device__ Weights weights(int64_t n) {
    const int64_t p = a_.P == 1 ? 0 : n;
    int slot = -1;
    for (int sl = 0; sl < a_.L.slots; ++sl) {
      if (cached_[sl] == p) slot = sl;
    }
    if (slot < 0) {
      slot = a_.L.slots > 1 ? 1 - last_ : 0;
      stage(p, slot);
      cached_[slot] = p;
    }
    last_ = slot;
    const float* base = s_ + slot * a_.L.slot_floats;
    const int D = a_.L.D, H = a_.L.H;
    Weights w;
    w.w1 = base;
    w.w2 = w.w1 + int64_t(H) * a_.L.ldD;
    w.b1 = w.w2 + int64_t(D) * a_.L.ldH;
    w.b2 = w.b1 + H;
    return w;
  }

  __device__ void stage(int64_t p, int slot) {
    const int D = a_.L.D, H = a_.L.H, ldD = a_.L.ldD, ldH = a_.L.ldH;
    __syncthreads();  // no thread still reads the slot
    float* w1 = s_ + slot * a_.L.slot_floats;
    float* w2 = w1 + int64_t(H) * ldD;
    float* b1 = w2 + int64_t(D) * ldH;
    float* b2 = b1 + H;
    const scalar_t* g1 = a_.w1 + p * H * D;
    const scalar_t* g2 = a_.w2 + p * D * H;
    for (int i = threadIdx.x; i < H * D; i += blockDim.x) {
      w1[(i / D) * ldD + i % D] = static_cast<float>(g1[i]);
      w2[(i / H) * ldH + i % H] = static_cast<float>(g2[i]);
    }
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
      b1[j] = a_.b1 != nullptr ? static_cast<float>(a_.b1[p * H + j]) : 0.0f;
    }
    for (int k = threadIdx.x; k < D; k += blockDim.x) {
      b2[k] = a_.b2 != nullptr ? static_cast<float>(a_.b2[p * D + k]) : 0.0f;
    }
    __syncthreads();
  }
};

// One of the three rebuilt-state buffers that is neither a nor b (loops.h StateBuffers).
__device__ __forceinline__ int other(int a, int b = -1) {
  for (int i = 0; i < 3; ++i) {
    if (i != a && i != b) return i;
  }
  return -1;  // unreachable: three buffers, at most two excluded
}

// The step constants as the cuBLAS path rounds them (double expressions cast to float).
struct Consts {
  float h, nh, hh, nhh;
  __device__ explicit Consts(double step)
      : h(float(step)), nh(float(-step)), hh(float(0.5 * step)), nhh(float(-0.5 * step)) {}
};

// loops.h rebuild_euler: x_n from state `start` (buffers 0..2); returns the buffer of x_n.
template <typename scalar_t>
__device__ int rebuild_euler(Tile<scalar_t>& t, int64_t n, int start, const Consts& c,
                             int64_t refine, float* z, float* av) {
  int x = other(start);
  t.eval(n, t.state(start), t.state(x), t.state(start), c.nh, z, av);
  for (int64_t k = 0; k < refine; ++k) {
    const int next = other(start, x);
    t.eval(n, t.state(x), t.state(next), t.state(start), c.nh, z, av);
    x = next;
  }
  return x;
}

// loops.h rebuild_heun with HeunScratch (sa, sb, sc) and fnext = f_{n+1}(x_{n+1}).
template <typename scalar_t>
__device__ int rebuild_heun(Tile<scalar_t>& t, int64_t n, int start, const float* fnext,
                            const Consts& c, int64_t refine, float* z, float* av, float* sa,
                            float* sb, float* sc) {
  int x = other(start);
  t.axpby(sa, t.state(start), 1.0f, fnext, c.nh);  // yrev = x_{n+1} - h f_{n+1}
  t.eval(n, sa, sb, nullptr, 1.0f, z, av);          // fy = f_n(yrev)
  t.heun_combine(t.state(x), t.state(start), fnext, sb, c.nhh);
  for (int64_t k = 0; k < refine; ++k) {
    const int next = other(start, x);
    t.eval(n, t.state(x), sb, nullptr, 1.0f, z, av);  // k1
    t.axpby(sa, t.state(x), 1.0f, sb, c.h);           // x + h k1
    t.eval(n + 1, sa, sc, nullptr, 1.0f, z, av);      // k2
    t.heun_combine(t.state(next), t.state(start), sb, sc, c.nhh);
    x = next;
  }
  return x;
}

// loops.h forward_steps without stored contexts: in = x0, out = the stage output.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    persistent_forward_kernel(const __grid_constant__ Args<scalar_t> a) {
  extern __shared__ float smem[];
  Tile<scalar_t> t(a, smem);
  const Consts c(a.h);
  float *z = t.hidden(0), *av = t.hidden(1);
  int x = 0;
  t.load(a.in, t.state(x));
  for (int64_t n = 0; n < a.steps; ++n) {
    const int o = 1 - x;
    if (a.scheme == schemes::euler) {
      t.eval(n, t.state(x), t.state(o), t.state(x), c.h, z, av);
    } else {
      float *f0 = t.state(2), *f1 = t.state(3), *y = t.state(4);
      t.eval(n, t.state(x), f0, nullptr, 1.0f, z, av);
      t.axpby(y, t.state(x), 1.0f, f0, c.h);
      t.eval(n + 1, y, f1, nullptr, 1.0f, z, av);
      t.heun_combine(t.state(o), t.state(x), f0, f1, c.hh);
    }
    x = o;
  }
  t.store(t.state(x), a.out);
}

// loops.h reverse_loop: in = y, out = the rebuilt input.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    persistent_reverse_kernel(const __grid_constant__ Args<scalar_t> a) {
  extern __shared__ float smem[];
  Tile<scalar_t> t(a, smem);
  const Consts c(a.h);
  float *z = t.hidden(0), *av = t.hidden(1);
  int x = 0;
  t.load(a.in, t.state(x));
  for (int64_t n = a.steps - 1; n >= 0; --n) {
    if (a.scheme == schemes::euler) {
      x = rebuild_euler(t, n, x, c, a.refine, z, av);
    } else {
      float* fnext = t.state(6);
      t.eval(n + 1, t.state(x), fnext, nullptr, 1.0f, z, av);
      x = rebuild_heun(t, n, x, fnext, c, a.refine, z, av, t.state(3), t.state(4), t.state(5));
    }
  }
  t.store(t.state(x), a.out);
}

// loops.h backward_adjoint (states == nullptr): in = grad, in2 = out; out = dL/dx0,
// out2 = the rebuilt input; parameter gradients and per-step errors accumulated.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    persistent_adjoint_kernel(const __grid_constant__ Args<scalar_t> a) {
  extern __shared__ float smem[];
  Tile<scalar_t> t(a, smem);
  const Consts c(a.h);
  float *z0 = t.hidden(0), *a0 = t.hidden(1), *ga = t.hidden(2);
  float* g = t.state(3);
  t.load(a.in, g);
  int x = 0;  // x^_{n+1}
  t.load(a.in2, t.state(x));
  if (a.scheme == schemes::euler) {
    for (int64_t n = a.steps - 1; n >= 0; --n) {
      const int start = x;
      const int xn = rebuild_euler(t, n, start, c, a.refine, z0, a0);
      const int phi = other(start, xn);
      t.eval(n, t.state(xn), t.state(phi), t.state(xn), c.h, z0, a0);  // Phi_n(x^_n)
      t.sqdist(t.state(phi), t.state(start), n);
      t.vjp(n, t.state(xn), z0, a0, g, c.h, g, /*accumulate=*/true, ga);
      x = xn;
    }
  } else {
    float *z1 = t.hidden(3), *a1 = t.hidden(4);
    float *sa = t.state(4), *sb = t.state(5), *sc = t.state(6);
    const int fb[2] = {7, 8};
    float *y = t.state(9), *gy = t.state(10), *gf0 = t.state(11);
    int fnext = -1;  // buffer of f_{n+1}(x^_{n+1}) (cached from the previous step)
    for (int64_t n = a.steps - 1; n >= 0; --n) {
      const int start = x;
      if (fnext < 0) {
        fnext = fb[1];
        t.eval(n + 1, t.state(start), t.state(fnext), nullptr, 1.0f, z1, a1);
      }
      const int xn =
          rebuild_heun(t, n, start, t.state(fnext), c, a.refine, z1, a1, sa, sb, sc);
      const int f0 = fnext == fb[0] ? fb[1] : fb[0];
      t.eval(n, t.state(xn), t.state(f0), nullptr, 1.0f, z0, a0);  // recompute step n
      t.axpby(y, t.state(xn), 1.0f, t.state(f0), c.h);
      t.eval(n + 1, y, sc, nullptr, 1.0f, z1, a1);
      const int phi = other(start, xn);
      t.heun_combine(t.state(phi), t.state(xn), t.state(f0), sc, c.hh);  // Phi_n(x^_n)
      t.sqdist(t.state(phi), t.state(start), n);
      // loops.h heun_step_vjp
      t.vjp(n + 1, y, z1, a1, g, c.hh, gy, /*accumulate=*/false, ga);
      t.axpby(gf0, g, c.hh, gy, c.h);
      t.axpby(g, g, 1.0f, gy, 1.0f);
      t.vjp(n, t.state(xn), z0, a0, gf0, 1.0f, g, /*accumulate=*/true, ga);
      fnext = f0;
      x = xn;
    }
  }
  t.store(g, a.out);
  t.store(t.state(x), a.out2);
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

float* fptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename scalar_t>
Args<scalar_t> make_args(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                         const Tensor& b2, int64_t act, int64_t scheme, double h, int64_t depth,
                         int64_t refine, PersistentPass pass) {
  Args<scalar_t> a;
  a.w1 = w1.data_ptr<scalar_t>();
  a.w2 = w2.data_ptr<scalar_t>();
  a.b1 = ptr_or_null<scalar_t>(b1);
  a.b2 = ptr_or_null<scalar_t>(b2);
  a.B = x.size(0);
  a.P = w1.size(0);
  a.steps = num_steps(scheme, depth);
  a.refine = refine;
  a.act = static_cast<int>(act);
  a.scheme = static_cast<int>(scheme);
  a.h = h;
  const bool ok = choose_layout(x.size(0), x.size(1), w1.size(1), w1.size(0), scheme, pass, &a.L);
  TORCH_INTERNAL_ASSERT(ok, "resode: persistent MLP kernel called for a shape it does not cover");
  return a;
}

template <typename scalar_t>
void launch(void (*kernel)(const Args<scalar_t>), const Args<scalar_t>& a) {
  const size_t bytes = a.L.bytes();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  const int64_t grid = (a.B + a.L.R - 1) / a.L.R;
  kernel<<<static_cast<unsigned>(grid), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f<float>() or f<at::BFloat16>() by x's dtype.
template <class F>
void dispatch_dtype(const Tensor& x, F f) {
  if (x.scalar_type() == at::kFloat) {
    f(float());
  } else {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kBFloat16);
    f(at::BFloat16());
  }
}

}  // namespace

bool persistent_mlp_applies(const Tensor& x, const Tensor& w1, const Tensor& w2, int64_t act,
                            int64_t scheme, PersistentPass pass) {
  if (!x.is_cuda() || !env_switch_on("RESODE_PERSISTENT_MLP")) return false;
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kBFloat16) return false;
  if (x.dim() != 2 || w1.dim() != 3 || w2.dim() != 3) return false;
  if (w1.scalar_type() != dt || w2.scalar_type() != dt) return false;
  if (find_id(kActivations, act) == nullptr || find_id(kSchemes, scheme) == nullptr) return false;
  Layout L;
  return choose_layout(x.size(0), x.size(1), w1.size(1), w1.size(0), scheme, pass, &L);
}

Tensor persistent_mlp_forward(const Tensor& x_, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, int64_t act, int64_t scheme,
                              double h, int64_t depth) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x);
  dispatch_dtype(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto a = make_args<scalar_t>(x, w1, b1, w2, b2, act, scheme, h, depth, 0,
                                 PersistentPass::forward);
    a.in = x.data_ptr<scalar_t>();
    a.out = y.data_ptr<scalar_t>();
    launch(persistent_forward_kernel<scalar_t>, a);
  });
  return y;
}

Tensor persistent_mlp_reverse(const Tensor& y_, const Tensor& w1, const Tensor& b1,
                              const Tensor& w2, const Tensor& b2, int64_t act, int64_t scheme,
                              double h, int64_t depth, int64_t refine) {
  const c10::cuda::CUDAGuard guard(y_.device());
  const Tensor y = y_.contiguous();
  Tensor x = at::empty_like(y);
  dispatch_dtype(y, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto a = make_args<scalar_t>(y, w1, b1, w2, b2, act, scheme, h, depth, refine,
                                 PersistentPass::reverse);
    a.in = y.data_ptr<scalar_t>();
    a.out = x.data_ptr<scalar_t>();
    launch(persistent_reverse_kernel<scalar_t>, a);
  });
  return x;
}

PersistentAdjoint persistent_mlp_adjoint(const Tensor& grad_, const Tensor& out_,
                                         const Tensor& w1, const Tensor& b1, const Tensor& w2,
                                         const Tensor& b2, int64_t act, int64_t scheme, double h,
                                         int64_t depth, int64_t refine) {
  const c10::cuda::CUDAGuard guard(grad_.device());
  const Tensor grad = grad_.contiguous(), out = out_.contiguous();
  const auto f32 = grad.options().dtype(at::kFloat);
  const Tensor gw1 = at::zeros(w1.sizes(), f32), gw2 = at::zeros(w2.sizes(), f32);
  const Tensor gb1 = b1.defined() ? at::zeros(b1.sizes(), f32) : Tensor();
  const Tensor gb2 = b2.defined() ? at::zeros(b2.sizes(), f32) : Tensor();
  const Tensor err = at::zeros({num_steps(scheme, depth)}, f32);
  PersistentAdjoint r;
  r.gx = at::empty_like(grad);
  r.x0_hat = at::empty_like(grad);
  dispatch_dtype(grad, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto a = make_args<scalar_t>(grad, w1, b1, w2, b2, act, scheme, h, depth, refine,
                                 PersistentPass::adjoint);
    a.in = grad.data_ptr<scalar_t>();
    a.in2 = out.data_ptr<scalar_t>();
    a.out = r.gx.data_ptr<scalar_t>();
    a.out2 = r.x0_hat.data_ptr<scalar_t>();
    a.gw1 = gw1.data_ptr<float>();
    a.gw2 = gw2.data_ptr<float>();
    a.gb1 = fptr_or_null(gb1);
    a.gb2 = fptr_or_null(gb2);
    a.err = err.data_ptr<float>();
    launch(persistent_adjoint_kernel<scalar_t>, a);
  });
  // the max over steps of the whole batch's squared inconsistency (nan propagates), acc dtype
  r.sq_step_error = at::amax(err).reshape({1});
  const auto dt = grad.scalar_type();
  const Tensor none = at::empty({0}, w1.options());  // absent biases (MLPBlock::grads)
  r.grads = {gw1.to(dt), gb1.defined() ? gb1.to(dt) : none, gw2.to(dt),
             gb2.defined() ? gb2.to(dt) : none};
  return r;
}

}  // namespace resode
