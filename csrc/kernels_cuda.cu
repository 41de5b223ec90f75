// CUDA implementations of the fused elementwise kernels (kernels.h), registered for the CUDA
// dispatch key (float32, float64, bfloat16; math in at::opmath_type, i.e. float for bfloat16).
// Launched on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"

namespace resode {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // power of two (block reductions below rely on it)

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535)));
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

#define RESODE_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename T>
__device__ __forceinline__ T gelu_f(T z) {
  return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
}

template <typename T>
__device__ __forceinline__ T gelu_grad_f(T z) {
  const T cdf = T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
  const T pdf = exp(T(-0.5) * z * z) * T(0.3989422804014327);
  return cdf + z * pdf;
}

template <typename scalar_t>
__global__ void act_forward_kernel(const scalar_t* z, scalar_t* a,  // may alias (in place)
                                   int64_t n, int64_t act) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const acc_t v = static_cast<acc_t>(z[i]);
    acc_t r;
    if (act == acts::tanh) {
      r = tanh(v);
    } else if (act == acts::relu) {
      r = v > acc_t(0) ? v : acc_t(0);
    } else {
      r = gelu_f(v);
    }
    a[i] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t>
__global__ void act_backward_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ z,
                                    const scalar_t* __restrict__ a, int64_t n, int64_t act,
                                    at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    acc_t r;
    if (act == acts::tanh) {
      const acc_t av = static_cast<acc_t>(a[i]);
      r = scale * (gv * (acc_t(1) - av * av));
    } else if (act == acts::relu) {
      r = static_cast<acc_t>(a[i]) > acc_t(0) ? scale * gv : acc_t(0);
    } else {
      r = scale * (gv * gelu_grad_f(static_cast<acc_t>(z[i])));
    }
    g[i] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t>
__global__ void axpby_kernel(scalar_t* out, const scalar_t* x, const scalar_t* y, int64_t n,
                             at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> beta) {
  using acc_t = at::opmath_type<scalar_t>;
  // out may alias x or y: each element is read before it is written by the same thread
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    out[i] = static_cast<scalar_t>(alpha * static_cast<acc_t>(x[i]) +
                                   beta * static_cast<acc_t>(y[i]));
  }
}

template <typename scalar_t>
__global__ void heun_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ f0, const scalar_t* __restrict__ f1,
                            int64_t n, at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) +
                                   c * (static_cast<acc_t>(f0[i]) + static_cast<acc_t>(f1[i])));
  }
}

template <typename scalar_t>
__global__ void row_bias_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ b, int64_t n, int64_t cols,
                                at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    acc_t v = static_cast<acc_t>(x[i]);
    if (b != nullptr) v += c * static_cast<acc_t>(b[i % cols]);
    out[i] = static_cast<scalar_t>(v);
  }
}

// Sum over the block; every thread gets the result. sh holds kThreads values.
template <typename T>
__device__ T block_sum(T v, T* sh) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();
  return r;
}

// Per-channel reductions of a (B, C, HW) tensor, split over the batch so that the grid fills
// the GPU (one block per channel left most SMs idle: C = 16 gives 16 blocks): block (c, s)
// reduces channel c over the batch rows of chunk s, [s * rows, min(B, (s + 1) * rows)), and a
// finish kernel (one thread per channel) combines the S chunks in a fixed order
// (deterministic). The split is chosen by ChannelSplit on the host.
struct ChannelSplit {
  int64_t B, C, HW, rows, S;

  ChannelSplit(int64_t B_, int64_t C_, int64_t HW_) : B(B_), C(C_), HW(HW_) {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t want = std::max<int64_t>(1, (2 * sms + C - 1) / C);  // ~2 blocks per SM
    const int64_t chunks = std::min(want, B);
    rows = (B + chunks - 1) / chunks;
    S = (B + rows - 1) / rows;  // no empty chunk
    TORCH_CHECK(rows * HW < (int64_t(1) << 31), "resode: a batch chunk of ", rows * HW,
                " elements per channel is too large for the CUDA channel reductions");
  }
  dim3 grid() const { return dim3(static_cast<unsigned>(C), static_cast<unsigned>(S)); }
  // batch rows of chunk s (>= 1)
  __host__ __device__ int64_t chunk_rows(int64_t s) const {
    return (s + 1) * rows <= B ? rows : B - s * rows;
  }
};

// Offset of element i (0 <= i < chunk rows * HW) of chunk s of channel c (32-bit division).
__device__ __forceinline__ int64_t chunk_offset(uint32_t i, uint32_t HW, int64_t b0, int64_t C,
                                                int64_t c) {
  const uint32_t r = i / HW;
  return ((b0 + r) * C + c) * int64_t(HW) + (i - r * HW);
}

// Chunk (c, s): its mean and its sum of squared deviations from that mean (two passes over the
// chunk, which stays in cache).
template <typename scalar_t, typename acc_t>
__global__ void channel_moments_partial_kernel(const scalar_t* __restrict__ u,
                                               acc_t* __restrict__ pmean,
                                               acc_t* __restrict__ pm2, ChannelSplit sp) {
  __shared__ acc_t sh[kThreads];
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t b0 = s * sp.rows, nrows = sp.chunk_rows(s);
  const uint32_t n = static_cast<uint32_t>(nrows * sp.HW), HW = static_cast<uint32_t>(sp.HW);
  acc_t sum = 0;
  for (uint32_t i = threadIdx.x; i < n; i += kThreads) {
    sum += static_cast<acc_t>(u[chunk_offset(i, HW, b0, sp.C, c)]);
  }
  const acc_t m = block_sum(sum, sh) / static_cast<acc_t>(n);
  acc_t q = 0;
  for (uint32_t i = threadIdx.x; i < n; i += kThreads) {
    const acc_t d = static_cast<acc_t>(u[chunk_offset(i, HW, b0, sp.C, c)]) - m;
    q += d * d;
  }
  q = block_sum(q, sh);
  if (threadIdx.x == 0) {
    pmean[c * sp.S + s] = m;
    pm2[c * sp.S + s] = q;
  }
}

// mean[c] and the biased variance var[c] from the chunks' moments (Chan et al.'s pairwise
// combination, chunk after chunk).
template <typename acc_t>
__global__ void channel_moments_finish_kernel(const acc_t* __restrict__ pmean,
                                              const acc_t* __restrict__ pm2,
                                              acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                              ChannelSplit sp) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= sp.C) return;
  acc_t n = 0, m = 0, m2 = 0;
  for (int64_t s = 0; s < sp.S; ++s) {
    const acc_t nb = static_cast<acc_t>(sp.chunk_rows(s) * sp.HW);
    const acc_t mb = pmean[c * sp.S + s], nt = n + nb, d = mb - m;
    m += d * (nb / nt);
    m2 += pm2[c * sp.S + s] + d * d * (n * (nb / nt));
    n = nt;
  }
  mean[c] = m;
  var[c] = m2 / n;
}

template <typename scalar_t, typename acc_t>
__global__ void bn_apply_kernel(const scalar_t* __restrict__ u, const acc_t* __restrict__ mean,
                                const acc_t* __restrict__ invstd,
                                const scalar_t* __restrict__ gamma,
                                const scalar_t* __restrict__ beta, bool relu,
                                scalar_t* __restrict__ xhat, scalar_t* __restrict__ out,
                                const scalar_t* __restrict__ base, acc_t c, int64_t n, int64_t C,
                                int64_t HW) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t ch = (i / HW) % C;
    const acc_t xv = (static_cast<acc_t>(u[i]) - mean[ch]) * invstd[ch];
    if (xhat != nullptr) xhat[i] = static_cast<scalar_t>(xv);
    acc_t y = static_cast<acc_t>(gamma[ch]) * xv + static_cast<acc_t>(beta[ch]);
    if (relu) y = y > acc_t(0) ? y : acc_t(0);
    if (out != nullptr) {
      out[i] = static_cast<scalar_t>(base != nullptr ? static_cast<acc_t>(base[i]) + c * y : y);
    }
  }
}

// Chunk (c, s) of sum_go and sum_goxhat (ChannelSplit); go_m = go * (mask > 0).
template <typename scalar_t, typename acc_t>
__global__ void bn_backward_partial_kernel(const scalar_t* __restrict__ go,
                                           const scalar_t* __restrict__ mask,
                                           const scalar_t* __restrict__ xhat,
                                           acc_t* __restrict__ p1, acc_t* __restrict__ p2,
                                           ChannelSplit sp) {
  __shared__ acc_t sh[kThreads];
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t b0 = s * sp.rows, nrows = sp.chunk_rows(s);
  const uint32_t n = static_cast<uint32_t>(nrows * sp.HW), HW = static_cast<uint32_t>(sp.HW);
  acc_t a1 = 0, a2 = 0;
  for (uint32_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t k = chunk_offset(i, HW, b0, sp.C, c);
    acc_t g = static_cast<acc_t>(go[k]);
    if (mask != nullptr && !(static_cast<acc_t>(mask[k]) > acc_t(0))) g = 0;
    a1 += g;
    a2 += g * static_cast<acc_t>(xhat[k]);
  }
  a1 = block_sum(a1, sh);
  a2 = block_sum(a2, sh);
  if (threadIdx.x == 0) {
    p1[c * sp.S + s] = a1;
    p2[c * sp.S + s] = a2;
  }
}

// out1[c] = sum_s p1[c, s], out2[c] = sum_s p2[c, s], in chunk order.
template <typename acc_t>
__global__ void channel_sums_finish_kernel(const acc_t* __restrict__ p1,
                                           const acc_t* __restrict__ p2, acc_t* __restrict__ out1,
                                           acc_t* __restrict__ out2, ChannelSplit sp) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= sp.C) return;
  acc_t a1 = 0, a2 = 0;
  for (int64_t s = 0; s < sp.S; ++s) {
    a1 += p1[c * sp.S + s];
    a2 += p2[c * sp.S + s];
  }
  out1[c] = a1;
  out2[c] = a2;
}

template <typename scalar_t, typename acc_t>
__global__ void bn_backward_apply_kernel(const scalar_t* go, const scalar_t* mask,
                                         const scalar_t* xhat, const scalar_t* gamma,
                                         const acc_t* invstd, const acc_t* sum_go,
                                         const acc_t* sum_goxhat, acc_t scale, bool training,
                                         scalar_t* gx, int64_t n, int64_t C, int64_t HW,
                                         acc_t inv_m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t ch = (i / HW) % C;
    acc_t g = static_cast<acc_t>(go[i]);
    if (mask != nullptr && !(static_cast<acc_t>(mask[i]) > acc_t(0))) g = 0;
    const acc_t k = scale * static_cast<acc_t>(gamma[ch]) * invstd[ch];
    acc_t r;
    if (training) {
      r = k * (g - sum_go[ch] * inv_m - static_cast<acc_t>(xhat[i]) * sum_goxhat[ch] * inv_m);
    } else {
      r = k * g;
    }
    gx[i] = static_cast<scalar_t>(r);
  }
}

// sum((a - b)^2): one partial sum per block (grid-stride), then sqdist_finish_kernel adds
// them in a fixed order (deterministic) and takes the max with acc[0].
constexpr int kMaxPartials = 1024;

template <typename scalar_t, typename acc_t>
__global__ void sqdist_partial_kernel(const scalar_t* __restrict__ a,
                                      const scalar_t* __restrict__ b, acc_t* __restrict__ partial,
                                      int64_t n) {
  __shared__ acc_t sh[kThreads];
  acc_t s = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const acc_t d = static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i]);
    s += d * d;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename acc_t>
__global__ void sqdist_finish_kernel(const acc_t* __restrict__ partial, int nparts,
                                     acc_t* __restrict__ acc) {
  __shared__ acc_t sh[kThreads];
  acc_t s = 0;
  for (int i = threadIdx.x; i < nparts; i += kThreads) s += partial[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0 && (isnan(s) || s > acc[0])) acc[0] = s;  // nan propagates
}

template <typename T>
const T* opt_ptr(const OptTensor& t) {
  const Tensor* p = check::get(t);
  return p ? p->data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(const OptTensor& t) {
  const Tensor* p = check::get(t);
  return p ? p->data_ptr<T>() : nullptr;
}

void check_cuda_dtype(const char* op, const Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, "resode::_",
                   op, " on CUDA supports float32, float64 and bfloat16, got ", dt);
}

}  // namespace

void act_forward(const Tensor& z, const Tensor& a, int64_t act) {
  check::same_as("act_forward", z, a);
  check_cuda_dtype("act_forward", z);
  check::activation("act_forward", act);
  const int64_t n = z.numel();
  if (n == 0) return;
  RESODE_CUDA_DISPATCH(z.scalar_type(), "resode_act_forward_cuda", [&] {
    act_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        z.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void act_backward(const Tensor& g, const Tensor& z, const Tensor& a, int64_t act, double scale) {
  check::same_as("act_backward", g, z, a);
  check_cuda_dtype("act_backward", g);
  check::activation("act_backward", act);
  const int64_t n = g.numel();
  if (n == 0) return;
  RESODE_CUDA_DISPATCH(g.scalar_type(), "resode_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    act_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, act,
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void axpby(const Tensor& out, const Tensor& x, double alpha, const Tensor& y, double beta) {
  check::same_as("axpby", out, x, y);
  check_cuda_dtype("axpby", out);
  const int64_t n = out.numel();
  if (n == 0) return;
  RESODE_CUDA_DISPATCH(out.scalar_type(), "resode_axpby_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    axpby_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n,
        static_cast<acc_t>(alpha), static_cast<acc_t>(beta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void heun_combine(const Tensor& out, const Tensor& x, const Tensor& f0, const Tensor& f1,
                  double c) {
  check::same_as("heun_combine", out, x, f0, f1);
  check_cuda_dtype("heun_combine", out);
  const int64_t n = out.numel();
  if (n == 0) return;
  RESODE_CUDA_DISPATCH(out.scalar_type(), "resode_heun_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    heun_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), f0.data_ptr<scalar_t>(),
        f1.data_ptr<scalar_t>(), n, static_cast<acc_t>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void add_row_bias(const Tensor& out, const Tensor& x, const OptTensor& b, double c) {
  check::same_as("add_row_bias", out, x);
  check_cuda_dtype("add_row_bias", out);
  TORCH_CHECK_VALUE(out.dim() >= 1, "resode::_add_row_bias: expected rows, got a scalar");
  if (const Tensor* bp = check::get(b)) {
    TORCH_CHECK_VALUE(bp->is_contiguous() && bp->numel() == out.size(-1) &&
                          bp->scalar_type() == out.scalar_type() && bp->device() == out.device(),
                      "resode::_add_row_bias: the bias must be a contiguous (", out.size(-1),
                      ",) ", out.scalar_type(), " vector on ", out.device(), ", got ", bp->sizes());
  }
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t cols = out.size(-1);
  RESODE_CUDA_DISPATCH(out.scalar_type(), "resode_row_bias_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_bias_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), n, cols,
        static_cast<acc_t>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void batch_stats(const Tensor& u, const OptTensor& running_mean, const OptTensor& running_var,
                 double momentum, const Tensor& mean, const Tensor& var) {
  check::same_as("batch_stats", u);
  check_cuda_dtype("batch_stats", u);
  check::channels_of("batch_stats", u, acc_dtype(u.scalar_type()), mean, var);
  const int64_t B = u.size(0), C = u.size(1);
  if (u.numel() == 0) return;
  const int64_t HW = u.numel() / (B * C);
  RESODE_CUDA_DISPATCH(u.scalar_type(), "resode_batch_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelSplit sp(B, C, HW);
    const Tensor part = at::empty({2, C * sp.S}, mean.options());
    acc_t* pm = part.data_ptr<acc_t>();
    channel_moments_partial_kernel<scalar_t, acc_t><<<sp.grid(), kThreads, 0, stream()>>>(
        u.data_ptr<scalar_t>(), pm, pm + C * sp.S, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_moments_finish_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream()>>>(
        pm, pm + C * sp.S, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor* rm = check::get(running_mean);
  const Tensor* rv = check::get(running_var);
  if (rm != nullptr && rv != nullptr) {  // nn.BatchNorm2d's update: unbiased variance
    check::channels_of("batch_stats", u, rm->scalar_type(), *rm, *rv);
    const double M = static_cast<double>(B * HW);
    const double unbias = M > 1 ? M / (M - 1) : 1.0;
    Tensor rmv = *rm, rvv = *rv;
    rmv.mul_(1.0 - momentum).add_(mean.to(rm->scalar_type()), momentum);
    rvv.mul_(1.0 - momentum).add_(var.to(rv->scalar_type()), momentum * unbias);
  }
}

void bn_apply(const Tensor& u, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,
              const Tensor& beta, bool relu, const OptTensor& xhat, const OptTensor& out,
              const OptTensor& base, double c) {
  check::same_as("bn_apply", u, xhat, out, base);
  check_cuda_dtype("bn_apply", u);
  check::channels_of("bn_apply", u, acc_dtype(u.scalar_type()), mean, invstd);
  check::channels_of("bn_apply", u, u.scalar_type(), gamma, beta);
  const int64_t n = u.numel();
  if (n == 0) return;
  const int64_t B = u.size(0), C = u.size(1), HW = n / (B * C);
  RESODE_CUDA_DISPATCH(u.scalar_type(), "resode_bn_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_apply_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        u.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
        gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), relu, opt_mut_ptr<scalar_t>(xhat),
        opt_mut_ptr<scalar_t>(out), opt_ptr<scalar_t>(base), static_cast<acc_t>(c), n, C, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_backward_reduce(const Tensor& go, const OptTensor& mask, const Tensor& xhat,
                        const Tensor& sum_go, const Tensor& sum_goxhat) {
  check::same_as("bn_backward_reduce", go, mask, xhat);
  check_cuda_dtype("bn_backward_reduce", go);
  check::channels_of("bn_backward_reduce", go, acc_dtype(go.scalar_type()), sum_go, sum_goxhat);
  const int64_t B = go.size(0), C = go.size(1);
  if (go.numel() == 0) return;
  const int64_t HW = go.numel() / (B * C);
  RESODE_CUDA_DISPATCH(go.scalar_type(), "resode_bn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelSplit sp(B, C, HW);
    const Tensor part = at::empty({2, C * sp.S}, sum_go.options());
    acc_t* p = part.data_ptr<acc_t>();
    bn_backward_partial_kernel<scalar_t, acc_t><<<sp.grid(), kThreads, 0, stream()>>>(
        go.data_ptr<scalar_t>(), opt_ptr<scalar_t>(mask), xhat.data_ptr<scalar_t>(), p,
        p + C * sp.S, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_sums_finish_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream()>>>(
        p, p + C * sp.S, sum_go.data_ptr<acc_t>(), sum_goxhat.data_ptr<acc_t>(), sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_backward_apply(const Tensor& go, const OptTensor& mask, const Tensor& xhat,
                       const Tensor& gamma, const Tensor& invstd, const Tensor& sum_go,
                       const Tensor& sum_goxhat, double scale, bool training, const Tensor& gx) {
  check::same_as("bn_backward_apply", go, mask, xhat, gx);
  check_cuda_dtype("bn_backward_apply", go);
  check::channels_of("bn_backward_apply", go, go.scalar_type(), gamma);
  check::channels_of("bn_backward_apply", go, acc_dtype(go.scalar_type()), invstd, sum_go,
                     sum_goxhat);
  const int64_t n = go.numel();
  if (n == 0) return;
  const int64_t B = go.size(0), C = go.size(1), HW = n / (B * C);
  RESODE_CUDA_DISPATCH(go.scalar_type(), "resode_bn_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_backward_apply_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream()>>>(
        go.data_ptr<scalar_t>(), opt_ptr<scalar_t>(mask), xhat.data_ptr<scalar_t>(),
        gamma.data_ptr<scalar_t>(), invstd.data_ptr<acc_t>(), sum_go.data_ptr<acc_t>(),
        sum_goxhat.data_ptr<acc_t>(), static_cast<acc_t>(scale), training,
        gx.data_ptr<scalar_t>(), n, C, HW, acc_t(1) / static_cast<acc_t>(B * HW));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sqdist_max(const Tensor& a, const Tensor& b, const Tensor& acc) {
  check::same_as("sqdist_max", a, b);
  check_cuda_dtype("sqdist_max", a);
  check::accumulator("sqdist_max", a, acc);
  const int64_t n = a.numel();
  if (n == 0) return;
  const int parts = std::min(blocks_for(n), kMaxPartials);
  RESODE_CUDA_DISPATCH(a.scalar_type(), "resode_sqdist_max_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // == acc_dtype (float for bfloat16)
    Tensor partial = at::empty({parts}, acc.options());
    sqdist_partial_kernel<scalar_t, acc_t><<<parts, kThreads, 0, stream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sqdist_finish_kernel<acc_t><<<1, kThreads, 0, stream()>>>(partial.data_ptr<acc_t>(), parts,
                                                              acc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(resode, CUDA, m) {
#define RESODE_IMPL_KERNEL(name, params, args, schema) m.impl("_" #name, &cuda::name);
  RESODE_KERNELS(RESODE_IMPL_KERNEL)
#undef RESODE_IMPL_KERNEL
}

}  // namespace resode
