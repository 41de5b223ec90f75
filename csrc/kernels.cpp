// The internal elementwise ops resode::_<name> (kernels.h): their schemas, and the calls the
// depth loops make through cached typed dispatcher handles. PyTorch's dispatcher picks the CPU
// (kernels_cpu.cpp) or CUDA (kernels_cuda.cu) implementation from the tensors' device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "kernels.h"

namespace resode {
namespace kernels {

#define RESODE_DEFINE_KERNEL(name, params, args, schema)                              \
  void name params {                                                                  \
    static const auto op = c10::Dispatcher::singleton()                               \
                               .findSchemaOrThrow("resode::_" #name, "")              \
                               .typed<void params>();                                 \
    op.call args;                                                                     \
  }
RESODE_KERNELS(RESODE_DEFINE_KERNEL)
#undef RESODE_DEFINE_KERNEL

}  // namespace kernels

TORCH_LIBRARY_FRAGMENT(resode, m) {
#define RESODE_DEF_KERNEL(name, params, args, schema) m.def("_" #name schema);
  RESODE_KERNELS(RESODE_DEF_KERNEL)
#undef RESODE_DEF_KERNEL
}

}  // namespace resode
