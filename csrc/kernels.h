// pyformer: the narrow interface between each op's host entry (csrc/host/<op>.cpp) and its
// device kernels (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu).
//
// The host entry has done everything that is not arithmetic: argument checks, contiguity,
// allocation of every output, empty inputs, the statistics dtype, the dropout draw, the mask
// layout. A kernel gets contiguous tensors (their data pointers, sizes and dtype) and writes the
// outputs it is given. Each kernel file registers its launchers at load time:
//
//     PYFORMER_REGISTER_KERNEL(masked_softmax_fwd, CPU, &masked_softmax_fwd_cpu);
//
// and the host entry finds them by the tensor's device: kernels::masked_softmax_fwd(x.device()).
// A slot a device leaves empty means "no kernel of its own": the host composes ATen ops there
// (scaled_qk on the CPU is one BLAS GEMM with the scale as alpha) or, where a kernel is the only
// way, raises a clear error (a CUDA tensor in a build without CUDA kernels).
#pragma once

#include <ATen/ATen.h>

#include "mask_layout.h"
#include "philox.h"

namespace pyformer::kernels {

// Every slot, by name, for the loader of the AVX2 CPU kernels (below).
struct SlotBase {
  const char* id;    // the slot's C++ name: "masked_softmax_fwd"
  const char* name;  // for messages: "masked_softmax forward"
  constexpr SlotBase(const char* i, const char* n) : id(i), name(n) {}
  virtual void set_cpu(void* fn) = 0;
};
// The slot whose id is `id`, or null; list_slot adds one (PYFORMER_DEFINE_SLOT does).
SlotBase* find_slot(const char* id);
bool list_slot(SlotBase* slot);

// One function pointer per device type (CPU, CUDA) for one kernel entry; defined in the op's
// host file: PYFORMER_DEFINE_SLOT(MaskedSoftmaxFwd, masked_softmax_fwd, "masked_softmax forward").
// Slots are constant-initialized, so kernels may register into them from any file's static
// initializers.
template <typename F>
struct Slot final : SlotBase {
  using Fn = F;
  Fn cpu = nullptr;
  Fn cuda = nullptr;
  constexpr Slot(const char* i, const char* n) : SlotBase(i, n) {}

  // The kernel for `device`, or null when that device has none.
  Fn operator()(const at::Device& device) const {
    if (device.is_cpu()) return cpu;
    if (device.is_cuda()) return cuda;
    return nullptr;
  }
  // As operator(), but raises when the device has no kernel.
  Fn require(const at::Device& device) const {
    Fn fn = (*this)(device);
    TORCH_CHECK_NOT_IMPLEMENTED(
        fn != nullptr, "pyformer: no ", name, " kernel for ", device,
        device.is_cuda() ? " (this build of pyformer has no CUDA kernels)" : "");
    return fn;
  }
  bool set(c10::DeviceType type, Fn fn) {
    (type == c10::DeviceType::CUDA ? cuda : cpu) = fn;
    return true;
  }
  void set_cpu(void* fn) override { cpu = reinterpret_cast<Fn>(fn); }
};

#define PYFORMER_DEFINE_SLOT(type, id, name) \
  constinit Slot<type> id{#id, name};        \
  static const bool pyformer_listed_##id [[maybe_unused]] = list_slot(&id)

// CPU kernels by instruction set, chosen at run time as ATen chooses its own. The files in
// csrc/cpu/ are compiled twice: into pyformer._C for baseline x86-64 (at::vec's DEFAULT
// Vectorized, SSE2), and into pyformer/_cpu_avx2*.so with -mavx2 -mfma -mf16c
// (PYFORMER_CPU_KERNEL_LIB and CPU_CAPABILITY_AVX2 defined). _C's own kernels register as every
// other kernel does; when the library is imported on a CPU with AVX2, FMA and F16C (and
// PYFORMER_CPU_CAPABILITY is not "default"), it loads the AVX2 library, which hands over its
// kernels by slot name, and those replace the baseline ones. The AVX2 library is a separate
// shared object built with hidden visibility so that none of its code (the AVX2 copies of inline
// functions from the headers included) can stand in for _C's: a wheel built on an AVX2 machine
// runs on any x86-64 CPU.
struct OfferedKernel {
  const char* slot;
  void* fn;
};
#if defined(PYFORMER_CPU_KERNEL_LIB)
// In the AVX2 library: record a kernel for the loader (csrc/cpu_lib/export.cpp).
bool offer(const char* slot, void* fn);
#define PYFORMER_REGISTER_KERNEL(slot, device, fn)                           \
  static_assert(c10::DeviceType::device == c10::DeviceType::CPU,             \
                "the CPU kernel library holds CPU kernels only");            \
  static const bool pyformer_registered_##slot##_##device [[maybe_unused]] = \
      ::pyformer::kernels::offer(                                            \
          #slot,                                                             \
          reinterpret_cast<void*>(static_cast<decltype(::pyformer::kernels::slot)::Fn>(fn)))
#else
#define PYFORMER_REGISTER_KERNEL(slot, device, fn)                           \
  static const bool pyformer_registered_##slot##_##device [[maybe_unused]] = \
      ::pyformer::kernels::slot.set(c10::DeviceType::device, fn)
#endif

// Loads the AVX2 CPU kernels from `path` when this CPU and PYFORMER_CPU_CAPABILITY allow (see
// above). Returns the instruction set the CPU kernels now use ("avx2" or "default") and, in
// `why`, the reason when that is "default". Raises on an unknown PYFORMER_CPU_CAPABILITY, or a
// library whose kernels do not match this build's slots.
std::string load_cpu_kernels(const std::string& path, std::string& why);

// ---- scaled_qk ---------------------------------------------------------------------------------
// out (N, Lq, Lk) = scale * q (N, Lq, D) @ k (N, Lk, D)^T; N * Lq * Lk > 0 and D > 0.
using ScaledQkFwd = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& out,
                             double scale);
extern Slot<ScaledQkFwd> scaled_qk_fwd;

// ---- masked_softmax ----------------------------------------------------------------------------
// y = softmax(scale * x + M) per row of x (rows, L), M from `mask`; rows * L > 0.
using MaskedSoftmaxFwd = void (*)(const at::Tensor& x, const at::Tensor& y, const MaskLayout& mask,
                                  double scale);
// dx = scale * y * (dy - sum(dy * y)) per row; rows * L > 0.
using MaskedSoftmaxBwd = void (*)(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                                  double scale);
extern Slot<MaskedSoftmaxFwd> masked_softmax_fwd;
extern Slot<MaskedSoftmaxBwd> masked_softmax_bwd;

// ---- layer_norm / add_layer_norm / rms_norm / add_rms_norm -------------------------------------
// Rows of x (R, N), R * N > 0. residual and s are undefined without the fused add; weight and bias
// (N,) in x's dtype or undefined; mean and rstd (R,) in the statistics dtype. An undefined mean
// asks for the RMS norm: no centring, y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps)
// (bias is then undefined too).
using LayerNormFwd = void (*)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& s,
                              const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                              const at::Tensor& mean, const at::Tensor& rstd, double eps);
// dx (R, N); dweight and dbias (N,) in x's dtype, always written (dbias undefined for the RMS
// norm, whose mean is undefined: dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight).
using LayerNormBwd = void (*)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& rstd, const at::Tensor& weight,
                              const at::Tensor& dx, const at::Tensor& dweight,
                              const at::Tensor& dbias);
extern Slot<LayerNormFwd> layer_norm_fwd;
extern Slot<LayerNormBwd> layer_norm_bwd;

// ---- apply_rotary ------------------------------------------------------------------------------
// q (B, Hq, L, D), k (B, Hk, L, D) and the outputs: any strides on the first three dims, unit
// stride along D; cos, sin (Bc, L, Dr) contiguous in the statistics dtype, Bc = 1 or B, Dr even
// and <= D. Writes x cos + rotate(x) sin on the first Dr dims (x itself past them), or with
// `transpose` the backward's g cos + rotate^T(g sin); rotate is rotate-half or, `interleaved`, on
// adjacent pairs (csrc/cpu/rotary.cpp).
using Rotary = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                        const at::Tensor& k_out, const at::Tensor& cos, const at::Tensor& sin,
                        bool interleaved, bool transpose);
extern Slot<Rotary> rotary;

// ---- swiglu ------------------------------------------------------------------------------------
// out = silu(gate) * up over n > 0 contiguous elements; the backward writes dgate and dup.
using SwigluFwd = void (*)(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
using SwigluBwd = void (*)(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                           const at::Tensor& dgate, const at::Tensor& dup);
extern Slot<SwigluFwd> swiglu_fwd;
extern Slot<SwigluBwd> swiglu_bwd;

// ---- attention ---------------------------------------------------------------------------------
// A fused per-head path for the whole forward (GEMM -> masked softmax -> dropout -> GEMM in
// cache). q (B,H,Lq,D), k (B,H,Lk,D), v (B,H,Lk,Dv), out (B,H,Lq,Dv); probs (B,H,Lq,Lk) or
// undefined when not wanted; keep (B,H,Lq,Lk) bool or undefined without dropout. Returns false
// when it does not take these inputs (the host then composes GEMMs around masked_softmax_fwd).
using AttentionFwd = bool (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& probs,
                              const at::Tensor& keep, const MaskLayout& mask, double scale,
                              double keep_scale);
// The fused backward: (dq, dk, dv, dlogits) from grad_out, grad_probs (or undefined), the saved
// probs and keep (undefined without dropout). Returns false when it does not take the inputs.
using AttentionBwd = bool (*)(const at::Tensor& grad_out, const at::Tensor& grad_probs,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& probs, const at::Tensor& keep, double scale,
                              double keep_scale, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv, const at::Tensor& dlogits);
extern Slot<AttentionFwd> attention_fwd;
extern Slot<AttentionBwd> attention_bwd;
// Flash attention forward: never forms the (Lq, Lk) scores. q (B, H_kv, G * Lq, D) and out
// (B, H_kv, G * Lq, Dv) grouped by kv head (csrc/host/attention.cpp, grouped), k (B, H_kv, Lk, D),
// v (B, H_kv, Lk, Dv); lse (B, H_kv, G * Lq) float32, or undefined when not wanted. No probs;
// dropout, when on, drops the elements of csrc/philox.h (the probabilities' (B, H, Lq, Lk)
// indices). Returns false when it does not take the inputs.
using AttentionFlashFwd = bool (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const MaskLayout& mask, double scale, const Dropout& dropout);
extern Slot<AttentionFlashFwd> attention_flash_fwd;
// Its backward: dq (grouped like q), dk, dv from grad_out (grouped like out), the forward's out
// and lse, plus grad_lse (grouped like lse, its dtype) when defined: the gradient flowing into
// lse; and, when dlogits (B, H, Lq, Lk), zeroed, is defined, the gradient w.r.t. the logits (for
// a mask that requires grad); the forward's dropout regenerated. Returns false when it does not
// take the inputs, or when out, grad_out or grad_lse hold NaN/inf (the host then runs the bmm
// backward, which carries the NaN rule).
using AttentionFlashBwd = bool (*)(const at::Tensor& grad_out, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, const at::Tensor& grad_lse,
                                   const MaskLayout& mask, double scale, const Dropout& dropout,
                                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                   const at::Tensor& dlogits);
extern Slot<AttentionFlashBwd> attention_flash_bwd;
// The dropout keep mask of csrc/philox.h: keep, bool, contiguous, numel > 0, in its row-major
// element order.
using DropoutKeep = void (*)(const at::Tensor& keep, const Dropout& dropout);
extern Slot<DropoutKeep> dropout_keep;

}  // namespace pyformer::kernels
