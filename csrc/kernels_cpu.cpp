// CPU implementations of the fused elementwise kernels: at::parallel_for over contiguous
// chunks, plain inner loops the compiler vectorises (-O3), float32 / float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "resode.h"

namespace resode {
namespace cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task: small tensors run on one thread

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void act_forward(const at::Tensor& z, const at::Tensor& a, int64_t act) {
  // tanh / gelu: ATen's kernels, vectorised with SLEEF for the CPU found at run time (this file
  // is compiled for the baseline ISA, where scalar std::tanh costs ~10x more). Same numbers as
  // nn.Tanh / nn.GELU of the generic engine. z and a may alias.
  if (act == kTanh) {
    at::Tensor out = a;
    at::tanh_out(out, z);
    return;
  }
  if (act == kGelu) {
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

void act_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, int64_t act,
                  double scale) {
  if (act == kGelu) {  // rare: ATen's vectorised erf / exp
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
      if (act == kTanh) {
        for (int64_t i = b; i < e; ++i) gp[i] = s * (gp[i] * (scalar_t(1) - ap[i] * ap[i]));
      } else {
        for (int64_t i = b; i < e; ++i) gp[i] = ap[i] > scalar_t(0) ? s * gp[i] : scalar_t(0);
      }
    });
  });
}

void axpby(const at::Tensor& out, const at::Tensor& x, double alpha, const at::Tensor& y,
           double beta) {
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

void heun_combine(const at::Tensor& out, const at::Tensor& x, const at::Tensor& f0,
                  const at::Tensor& f1, double c) {
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

void add_row_bias(const at::Tensor& out, const at::Tensor& x, const at::Tensor& bias, double c) {
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

// The BN kernels below work on rows (b, c) of HW contiguous elements. Inner loops are
// branch-free (flags are template parameters) and `omp simd` lets the compiler reassociate the
// reductions (-fopenmp), so they vectorise.
void channel_mean_var(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var) {
  const int64_t B = u.size(0), C = u.size(1), HW = u.numel() / (B * C);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "resode_channel_mean_var", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const double inv_m = 1.0 / static_cast<double>(B * HW);
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      // rows visited in memory order (b outer, c inner) for streaming access
      std::vector<double> s(ce - cb, 0.0), q(ce - cb, 0.0);
      std::vector<acc_t> m(ce - cb);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = cb; c < ce; ++c) {
          const scalar_t* p = up + (b * C + c) * HW;
          acc_t r = 0;
          _Pragma("omp simd reduction(+ : r)") for (int64_t i = 0; i < HW; ++i) r += p[i];
          s[c - cb] += r;
        }
      }
      for (int64_t c = cb; c < ce; ++c) m[c - cb] = static_cast<acc_t>(s[c - cb] * inv_m);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = cb; c < ce; ++c) {
          const scalar_t* p = up + (b * C + c) * HW;
          const acc_t mc = m[c - cb];
          acc_t r = 0;
          _Pragma("omp simd reduction(+ : r)") for (int64_t i = 0; i < HW; ++i) {
            const acc_t d = p[i] - mc;
            r += d * d;
          }
          q[c - cb] += r;
        }
      }
      for (int64_t c = cb; c < ce; ++c) {
        mp[c] = m[c - cb];
        vp[c] = static_cast<acc_t>(q[c - cb] * inv_m);
      }
    });
  });
}

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
void bn_apply_typed(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
                    const at::Tensor& gamma, const at::Tensor& beta, bool relu,
                    const at::Tensor& xhat, const at::Tensor& out, const at::Tensor& base,
                    double c) {
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

void bn_apply(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, bool relu, const at::Tensor& xhat,
              const at::Tensor& out, const at::Tensor& base, double c) {
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

void bn_backward_reduce(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                        const at::Tensor& sum_go, const at::Tensor& sum_goxhat) {
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
void bn_backward_apply_typed(const at::Tensor& go, const at::Tensor& mask,
                             const at::Tensor& xhat, const at::Tensor& gamma,
                             const at::Tensor& invstd, const at::Tensor& sum_go,
                             const at::Tensor& sum_goxhat, double scale, bool training,
                             const at::Tensor& gx) {
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

void bn_backward_apply(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                       const at::Tensor& gamma, const at::Tensor& invstd,
                       const at::Tensor& sum_go, const at::Tensor& sum_goxhat, double scale,
                       bool training, const at::Tensor& gx) {
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "resode_bn_backward_apply", [&] {
    bn_backward_apply_typed<scalar_t>(go, mask, xhat, gamma, invstd, sum_go, sum_goxhat, scale,
                                      training, gx);
  });
}

}  // namespace cpu

// ----------------------------------------------------------------------------------------------
// Device dispatch.
namespace ew {

#ifdef WITH_CUDA
#define RESODE_DISPATCH(t, name, ...)    \
  do {                                   \
    if ((t).is_cuda()) {                 \
      cuda::name(__VA_ARGS__);           \
    } else {                             \
      cpu::name(__VA_ARGS__);            \
    }                                    \
  } while (0)
#else
#define RESODE_DISPATCH(t, name, ...)                                               \
  do {                                                                              \
    TORCH_CHECK(!(t).is_cuda(), "resode._C was built without CUDA support; "        \
                "rebuild with a CUDA toolkit (or RESODE_FORCE_CUDA=1)");            \
    cpu::name(__VA_ARGS__);                                                         \
  } while (0)
#endif

void act_forward(const at::Tensor& z, const at::Tensor& a, int64_t act) {
  RESODE_DISPATCH(z, act_forward, z, a, act);
}
void act_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, int64_t act,
                  double scale) {
  RESODE_DISPATCH(g, act_backward, g, z, a, act, scale);
}
void axpby(const at::Tensor& out, const at::Tensor& x, double alpha, const at::Tensor& y,
           double beta) {
  RESODE_DISPATCH(out, axpby, out, x, alpha, y, beta);
}
void heun_combine(const at::Tensor& out, const at::Tensor& x, const at::Tensor& f0,
                  const at::Tensor& f1, double c) {
  RESODE_DISPATCH(out, heun_combine, out, x, f0, f1, c);
}
void add_row_bias(const at::Tensor& out, const at::Tensor& x, const at::Tensor& b, double c) {
  RESODE_DISPATCH(out, add_row_bias, out, x, b, c);
}
void channel_mean_var(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& var) {
  RESODE_DISPATCH(u, channel_mean_var, u, mean, var);
}
void bn_apply(const at::Tensor& u, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, bool relu, const at::Tensor& xhat,
              const at::Tensor& out, const at::Tensor& base, double c) {
  RESODE_DISPATCH(u, bn_apply, u, mean, invstd, gamma, beta, relu, xhat, out, base, c);
}
void bn_backward_reduce(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                        const at::Tensor& sum_go, const at::Tensor& sum_goxhat) {
  RESODE_DISPATCH(go, bn_backward_reduce, go, mask, xhat, sum_go, sum_goxhat);
}
void bn_backward_apply(const at::Tensor& go, const at::Tensor& mask, const at::Tensor& xhat,
                       const at::Tensor& gamma, const at::Tensor& invstd,
                       const at::Tensor& sum_go, const at::Tensor& sum_goxhat, double scale,
                       bool training, const at::Tensor& gx) {
  RESODE_DISPATCH(go, bn_backward_apply, go, mask, xhat, gamma, invstd, sum_go, sum_goxhat,
                  scale, training, gx);
}

#undef RESODE_DISPATCH

}  // namespace ew
}  // namespace resode
