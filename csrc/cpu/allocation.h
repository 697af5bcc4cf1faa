// Allocation of the CPU kernels' large outputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace colorquant {
namespace cpu {

// at::empty, asking Linux for transparent huge pages on the tensor's memory.
// A fresh output of tens of MiB (probs, grad_logits: [B,K,H,W]) is new
// anonymous memory that the kernel would otherwise fault in and zero 4 KiB at
// a time; those faults cost the soft op about as much as its arithmetic.
// With 2 MiB pages there are 512x fewer. PyTorch's own allocator does the same
// under THP_MEM_ALLOC_ENABLE=1. Only the whole 2 MiB pages inside the tensor
// are advised, so no other allocation is affected. It is a hint: where THP is
// off or unsupported madvise fails and nothing changes, so its result is not
// checked.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (out.device().is_cpu() && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace cpu
}  // namespace colorquant
