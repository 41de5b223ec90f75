// CPU implementations of the fused elementwise kernels (kernels.h), registered for the CPU
// dispatch key: at::parallel_for over contiguous chunks, plain inner loops the compiler
// vectorises (-O3, `omp simd`), float32 / float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace resode {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task: small tensors run on one thread

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

void check_cpu_dtype(const char* op, const Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "resode::_", op, " on CPU supports float32 and float64, got ", t.scalar_type());
}

}  // namespace

void act_forward(const Tensor& z, const Tensor& a, int64_t act) {
  check::same_as("act_forward", z, a);
  check_cpu_dtype("act_forward", z);
  check::activation("act_forward", act);
  // tanh / gelu: ATen's kernels, vectorised with SLEEF for the CPU found at run time (this file
  // is compiled for the baseline ISA, where scalar std::tanh costs ~10x more). Same numbers as
  // nn.Tanh / nn.GELU of the generic engine. z and a may alias.
  if (act == acts::tanh) {
    at::Tensor out = a;
    at::tanh_out(out, z);
    return;
  }
  if (act == acts::gelu) {
    at::Tensor out = a;
    at::gelu_out(out, z);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "resode_act_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) ap[i] = zp[i] > scalar_t(0) ? zp[i] : scalar_t(0);
    });
  });
}

void act_backward(const Tensor& g, const Tensor& z, const Tensor& a, int64_t act, double scale) {
  check::same_as("act_backward", g, z, a);
  check_cpu_dtype("act_backward", g);
  check::activation("act_backward", act);
  if (act == acts::gelu) {  // rare: ATen's vectorised erf / exp
    at::Tensor out = g;
    at::gelu_backward_out(out, g, z);
    if (scale != 1.0) out.mul_(scale);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "resode_act_backward", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (act == acts::tanh) {
        for (int64_t i = b; i < e; ++i) gp[i] = s * (gp[i] * (scalar_t(1) - ap[i] * ap[i]));
      } else {
        for (int64_t i = b; i < e; ++i) gp[i] = ap[i] > scalar_t(0) ? s * gp[i] : scalar_t(0);
      }
    });
  });
}

void axpby(const Tensor& out, const Tensor& x, double alpha, const Tensor& y, double beta) {
  check::same_as("axpby", out, x, y);
  check_cpu_dtype("axpby", out);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "resode_axpby", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t al = static_cast<scalar_t>(alpha), be = static_cast<scalar_t>(beta);
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (al == scalar_t(1)) {
_Pragma("omp simd")
        for (int64_t i = b; i < e; ++i) op[i] = xp[i] + be * yp[i];
      } else {
_Pragma("omp simd")
        for (int64_t i = b; i < e; ++i) op[i] = al * xp[i] + be * yp[i];
      }
    });
  });
}

void heun_combine(const Tensor& out, const Tensor& x, const Tensor& f0, const Tensor& f1,
                  double c) {
  check::same_as("heun_combine", out, x, f0, f1);
  check_cpu_dtype("heun_combine", out);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "resode_heun_combine", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = f0.data_ptr<scalar_t>();
    const scalar_t* bp = f1.data_ptr<scalar_t>();
    const scalar_t cc = static_cast<scalar_t>(c);
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
_Pragma("omp simd")
      for (int64_t i = b; i < e; ++i) op[i] = xp[i] + cc * (ap[i] + bp[i]);
    });
  });
}

void add_row_bias(const Tensor& out, const Tensor& x, const OptTensor& bias, double c) {
  check::same_as("add_row_bias", out, x);
  check_cpu_dtype("add_row_bias", out);
  TORCH_CHECK_VALUE(out.dim() >= 1, "resode::_add_row_bias: expected rows, got a scalar");
  if (const Tensor* b = check::get(bias)) {
    TORCH_CHECK_VALUE(b->is_contiguous() && b->numel() == out.size(-1) &&
                          b->scalar_type() == out.scalar_type() && b->device() == out.device(),
                      "resode::_add_row_bias: the bias must be a contiguous (", out.size(-1),
                      ",) ", out.scalar_type(), " vector on ", out.device(), ", got ", b->sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "resode_add_row_bias", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = opt_ptr<scalar_t>(bias);
    const scalar_t cc = static_cast<scalar_t>(c);
    const int64_t cols = out.size(-1);
    const int64_t rows = out.numel() / cols;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* o = op + r * cols;
        const scalar_t* xr = xp + r * cols;
        if (bp) {
          for (int64_t j = 0; j < cols; ++j) o[j] = xr[j] + cc * bp[j];
        } else {
          for (int64_t j = 0; j < cols; ++j) o[j] = xr[j];
        }
      }
    });
  });
}

void batch_stats(const Tensor& u, const OptTensor& running_mean, const OptTensor& running_var,
                 double momentum, const Tensor& mean, const Tensor& var) {
  check::same_as("batch_stats", u);
  check_cpu_dtype("batch_stats", u);
  check::channels_of("batch_stats", u, acc_dtype(u.scalar_type()), mean, var);
  if (const Tensor* rm = check::get(running_mean)) check::channels_of("batch_stats", u, rm->scalar_type(), *rm);
  if (const Tensor* rv = check::get(running_var)) check::channels_of("batch_stats", u, rv->scalar_type(), *rv);
  // ATen's vectorised channel statistics, which also update the running statistics with the
  // formula of nn.BatchNorm2d: the generic engine's numbers exactly.
  auto mv = at::batch_norm_update_stats(u, running_mean, running_var, momentum);
  Tensor m = mean, v = var;
  m.copy_(std::get<0>(mv));
  v.copy_(std::get<1>(mv));
}

// The BN kernels below work on rows (b, c) of HW contiguous elements. Inner loops are
// branch-free (flags are template parameters) and `omp simd` lets the compiler reassociate the
// reductions (-fopenmp-simd), so they vectorise.
namespace {
template <typename T, bool XH, bool RELU, bool OUT, bool BASE>
void bn_apply_rows(const T* up, const T* mp, const T* sp, const T* gp, const T* bp, T* xh, T* op,
                   const T* basep, T c, int64_t rows, int64_t C, int64_t HW) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / HW), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t ch = r % C;
      const T m = mp[ch], is = sp[ch], g = gp[ch], be = bp[ch];
      const int64_t off = r * HW;
      const T* u = up + off;
_Pragma("omp simd")
      for (int64_t i = 0; i < HW; ++i) {
        const T xv = (u[i] - m) * is;
        if constexpr (XH) xh[off + i] = xv;
        T y = g * xv + be;
        if constexpr (RELU) y = y > T(0) ? y : T(0);
        if constexpr (OUT) {
          if constexpr (BASE) {
            op[off + i] = basep[off + i] + c * y;
          } else {
            op[off + i] = y;
          }
        }
      }
    }
  });
}
}  // namespace

namespace {
template <typename T>
void bn_apply_typed(const Tensor& u, const Tensor& mean, const Tensor& invstd,
                    const Tensor& gamma, const Tensor& beta, bool relu, const OptTensor& xhat,
                    const OptTensor& out, const OptTensor& base, double c) {
  const int64_t B = u.size(0), C = u.size(1), HW = u.numel() / (B * C);
  // acc dtype == T for float / double (the only CPU dtypes)
  const T* up = u.data_ptr<T>();
  const T* mp = mean.data_ptr<T>();
  const T* sp = invstd.data_ptr<T>();
  const T* gp = gamma.data_ptr<T>();
  const T* bp = beta.data_ptr<T>();
  T* xh = opt_mut_ptr<T>(xhat);
  T* op = opt_mut_ptr<T>(out);
  const T* basep = opt_ptr<T>(base);
  const T cc = static_cast<T>(c);
  const int64_t rows = B * C;
#define RESODE_BN_APPLY(XH, RELU, OUT, BASE) \
  bn_apply_rows<T, XH, RELU, OUT, BASE>(up, mp, sp, gp, bp, xh, op, basep, cc, rows, C, HW)
  TORCH_CHECK(!(relu && basep), "resode: bn_apply with relu and a residual base is not used");
  if (xh && relu && op) {
    RESODE_BN_APPLY(true, true, true, false);
  } else if (xh && op && basep) {
    RESODE_BN_APPLY(true, false, true, true);
  } else if (xh && op) {
    RESODE_BN_APPLY(true, false, true, false);
  } else if (xh) {
    RESODE_BN_APPLY(true, false, false, false);
  } else if (relu && op) {
    RESODE_BN_APPLY(false, true, true, false);
  } else if (op && basep) {
    RESODE_BN_APPLY(false, false, true, true);
  } else if (op) {
    RESODE_BN_APPLY(false, false, true, false);
  }
#undef RESODE_BN_APPLY
}
}  // namespace

void bn_apply(const Tensor& u, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,
              const Tensor& beta, bool relu, const OptTensor& xhat, const OptTensor& out,
              const OptTensor& base, double c) {
  check::same_as("bn_apply", u, xhat, out, base);
  check_cpu_dtype("bn_apply", u);
  check::channels_of("bn_apply", u, u.scalar_type(), mean, invstd, gamma, beta);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "resode_bn_apply", [&] {
    bn_apply_typed<scalar_t>(u, mean, invstd, gamma, beta, relu, xhat, out, base, c);
  });
}

namespace {
template <typename T, bool MASK>
void bn_reduce_channels(const T* gp, const T* mk, const T* xp, T* s1, T* s2, int64_t B, int64_t C,
                        int64_t HW) {
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    std::vector<double> a1(ce - cb, 0.0), a2(ce - cb, 0.0);
    for (int64_t b = 0; b < B; ++b) {  // memory order
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t off = (b * C + c) * HW;
        T r1 = 0, r2 = 0;
        _Pragma("omp simd reduction(+ : r1, r2)") for (int64_t i = 0; i < HW; ++i) {
          T g = gp[off + i];
          if constexpr (MASK) g = mk[off + i] > T(0) ? g : T(0);
          r1 += g;
          r2 += g * xp[off + i];
        }
        a1[c - cb] += r1;
        a2[c - cb] += r2;
      }
    }
    for (int64_t c = cb; c < ce; ++c) {
      s1[c] = static_cast<T>(a1[c - cb]);
      s2[c] = static_cast<T>(a2[c - cb]);
    }
  });
}

template <typename T, bool MASK, bool TRAIN>
void bn_backward_rows(const T* gp, const T* mk, const T* xp, const T* gam, const T* isp,
                      const T* s1, const T* s2, T scale, T inv_m, T* out, int64_t rows, int64_t C,
                      int64_t HW) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / HW), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t ch = r % C;
      const T k = scale * gam[ch] * isp[ch];
      const T mg = TRAIN ? s1[ch] * inv_m : T(0);
      const T mgx = TRAIN ? s2[ch] * inv_m : T(0);
      const int64_t off = r * HW;
_Pragma("omp simd")
      for (int64_t i = 0; i < HW; ++i) {
        T g = gp[off + i];
        if constexpr (MASK) g = mk[off + i] > T(0) ? g : T(0);
        if constexpr (TRAIN) {
          out[off + i] = k * (g - mg - xp[off + i] * mgx);
        } else {
          out[off + i] = k * g;
        }
      }
    }
  });
}
}  // namespace

void bn_backward_reduce(const Tensor& go, const OptTensor& mask, const Tensor& xhat,
                        const Tensor& sum_go, const Tensor& sum_goxhat) {
  check::same_as("bn_backward_reduce", go, mask, xhat);
  check_cpu_dtype("bn_backward_reduce", go);
  check::channels_of("bn_backward_reduce", go, go.scalar_type(), sum_go, sum_goxhat);
  const int64_t B = go.size(0), C = go.size(1), HW = go.numel() / (B * C);
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "resode_bn_backward_reduce", [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* mk = opt_ptr<scalar_t>(mask);
    const scalar_t* xp = xhat.data_ptr<scalar_t>();
    scalar_t* s1 = sum_go.data_ptr<scalar_t>();
    scalar_t* s2 = sum_goxhat.data_ptr<scalar_t>();
    if (mk) {
      bn_reduce_channels<scalar_t, true>(gp, mk, xp, s1, s2, B, C, HW);
    } else {
      bn_reduce_channels<scalar_t, false>(gp, mk, xp, s1, s2, B, C, HW);
    }
  });
}

namespace {
template <typename T>
void bn_backward_apply_typed(const Tensor& go, const OptTensor& mask, const Tensor& xhat,
                             const Tensor& gamma, const Tensor& invstd, const Tensor& sum_go,
                             const Tensor& sum_goxhat, double scale, bool training,
                             const Tensor& gx) {
  const int64_t B = go.size(0), C = go.size(1), HW = go.numel() / (B * C);
  const T* gp = go.data_ptr<T>();
  const T* mk = opt_ptr<T>(mask);
  const T* xp = xhat.data_ptr<T>();
  const T* gam = gamma.data_ptr<T>();
  const T* isp = invstd.data_ptr<T>();
  const T* s1 = sum_go.data_ptr<T>();
  const T* s2 = sum_goxhat.data_ptr<T>();
  T* out = gx.data_ptr<T>();
  const T sc = static_cast<T>(scale);
  const T inv_m = T(1) / static_cast<T>(B * HW);
  const int64_t rows = B * C;
#define RESODE_BN_BWD(M, TR) \
  bn_backward_rows<T, M, TR>(gp, mk, xp, gam, isp, s1, s2, sc, inv_m, out, rows, C, HW)
  if (mk && training) {
    RESODE_BN_BWD(true, true);
  } else if (mk) {
    RESODE_BN_BWD(true, false);
  } else if (training) {
    RESODE_BN_BWD(false, true);
  } else {
    RESODE_BN_BWD(false, false);
  }
#undef RESODE_BN_BWD
}
}  // namespace

void bn_backward_apply(const Tensor& go, const OptTensor& mask, const Tensor& xhat,
                       const Tensor& gamma, const Tensor& invstd, const Tensor& sum_go,
                       const Tensor& sum_goxhat, double scale, bool training, const Tensor& gx) {
  check::same_as("bn_backward_apply", go, mask, xhat, gx);
  check_cpu_dtype("bn_backward_apply", go);
  check::channels_of("bn_backward_apply", go, go.scalar_type(), gamma, invstd, sum_go,
                     sum_goxhat);
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "resode_bn_backward_apply", [&] {
    bn_backward_apply_typed<scalar_t>(go, mask, xhat, gamma, invstd, sum_go, sum_goxhat, scale,
                                      training, gx);
  });
}

void sqdist_max(const Tensor& a, const Tensor& b, const Tensor& acc) {
  check::same_as("sqdist_max", a, b);
  check_cpu_dtype("sqdist_max", a);
  check::accumulator("sqdist_max", a, acc);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "resode_sqdist_max", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const double s = at::parallel_reduce(
        0, a.numel(), kGrain, 0.0,
        [&](int64_t lo, int64_t hi, double init) {
          double r = 0.0;
_Pragma("omp simd reduction(+ : r)")
          for (int64_t i = lo; i < hi; ++i) {
            const double d = static_cast<double>(ap[i]) - static_cast<double>(bp[i]);
            r += d * d;
          }
          return init + r;
        },
        [](double x, double y) { return x + y; });
    scalar_t* out = acc.data_ptr<scalar_t>();  // acc dtype == scalar_t on the CPU
    const scalar_t v = static_cast<scalar_t>(s);
    if (std::isnan(v) || v > out[0]) out[0] = v;  // nan propagates (as torch.maximum)
  });
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(resode, CPU, m) {
#define RESODE_IMPL_KERNEL(name, params, args, schema) m.impl("_" #name, &cpu::name);
  RESODE_KERNELS(RESODE_IMPL_KERNEL)
#undef RESODE_IMPL_KERNEL
}

}  // namespace resode
