// Launch interface of the CUDA kernels; free of ONNX Runtime and CUDA headers so that the op
// wrapper (se_cuda_op.cc) compiles with the host compiler alone.
#pragma once

#include <cstddef>
#include <cstdint>

namespace seresnet::cuda {

enum class DType { kFloat32, kFloat16 };  // element type of x, the weights, residual and y

struct SeLaunch {
  DType dtype = DType::kFloat32;
  bool channels_last = false;       // x, residual, y are [N, HW, C] instead of [N, C, HW]
  const void* x = nullptr;          // [N, C, HW] or [N, HW, C]
  const void* w1 = nullptr;         // [Cr, C]
  const void* b1 = nullptr;         // [Cr]
  const void* w2 = nullptr;         // [C, Cr]
  const void* b2 = nullptr;         // [C]
  const void* residual = nullptr;   // like x, or null
  void* y = nullptr;                // like x
  float* scratch = nullptr;         // ScratchBytes(*this) of device memory
  int64_t n = 0;
  int64_t c = 0;
  int64_t cr = 0;
  int64_t hw = 0;
  bool relu = false;
};

// Device memory a launch needs (float partial means, hidden layer, channels-last gates); depends
// on the sizes, the layout, the element type and whether x is 16-byte aligned.
size_t ScratchBytes(const SeLaunch& args);

// Enqueues the kernels on `stream` (a cudaStream_t) and nothing else: no allocation, no
// synchronisation, no host copy, so the launch can be captured into a CUDA graph. Returns
// nullptr, or a static message describing why the launch failed.
const char* LaunchSqueezeExcitation(const SeLaunch& args, void* stream);

}  // namespace seresnet::cuda
