// Launch interface of the CUDA kernels; free of ONNX Runtime and CUDA headers so that the op
// wrapper (se_cuda_op.cc) compiles with the host compiler alone.
#pragma once

#include <cstddef>
#include <cstdint>

namespace seresnet::cuda {

struct SeLaunch {
  const float* x = nullptr;         // [N, C, HW]
  const float* w1 = nullptr;        // [Cr, C]
  const float* b1 = nullptr;        // [Cr]
  const float* w2 = nullptr;        // [C, Cr]
  const float* b2 = nullptr;        // [C]
  const float* residual = nullptr;  // [N, C, HW] or null
  float* y = nullptr;               // [N, C, HW]
  float* scratch = nullptr;         // ScratchBytes(n, c, cr) of device memory
  int64_t n = 0;
  int64_t c = 0;
  int64_t cr = 0;
  int64_t hw = 0;
  bool relu = false;
};

// Device memory the launch needs for the pooled means and the hidden layer.
size_t ScratchBytes(int64_t n, int64_t c, int64_t cr);

// Enqueues pool -> fc1 -> gate+scale on `stream` (a cudaStream_t). Returns nullptr, or a
// static message describing why the launch failed.
const char* LaunchSqueezeExcitation(const SeLaunch& args, void* stream);

}  // namespace seresnet::cuda
