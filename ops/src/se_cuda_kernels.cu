// CUDA kernels of SqueezeExcitation, three launches on ORT's compute stream:
//   pool        one block per (n, c) plane for large planes, one warp per plane for small ones;
//               float4 loads when aligned                                   -> pooled [N, C]
//   fc1         one warp per hidden unit r, each warp serving up to 8 images so a row of w1 is
//               read once per 8 images; coalesced along C                   -> hidden [N, Cr]
//   gate_scale  one block per (n, tile of channels): the block's warps compute the tile's
//               gates (w2 rows · hidden[n], coalesced along Cr) into shared memory, then the
//               block scales the tile's contiguous planes (float4 when aligned), adding the
//               residual and applying ReLU as compiled in.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "se_cuda_kernels.h"

namespace seresnet::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kFc1Images = 8;             // images per fc1 block
constexpr int kMaxTileChannels = 64;      // channels per gate_scale block
constexpr int64_t kTileElements = 2048;   // target elements per gate_scale block
constexpr int64_t kBlockPoolMinHw = 1024; // planes at least this large get a whole block

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <bool kVec4>
__device__ __forceinline__ float PartialSum(const float* __restrict__ plane, int64_t hw,
                                            int64_t start, int64_t stride) {
  float acc = 0.0f;
  if (kVec4) {
    const float4* p4 = reinterpret_cast<const float4*>(plane);
    for (int64_t i = start; i < hw / 4; i += stride) {
      const float4 v = __ldg(p4 + i);
      acc += (v.x + v.y) + (v.z + v.w);
    }
  } else {
    for (int64_t i = start; i < hw; i += stride) acc += __ldg(plane + i);
  }
  return acc;
}

template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
PoolBlockKernel(const float* __restrict__ x, float* __restrict__ pooled, int64_t hw) {
  __shared__ float partial[kWarpsPerBlock];
  const int64_t plane = blockIdx.x;
  float acc = PartialSum<kVec4>(x + plane * hw, hw, threadIdx.x, blockDim.x);
  acc = WarpSum(acc);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarpsPerBlock ? partial[lane] : 0.0f;
    acc = WarpSum(acc);
    if (lane == 0) pooled[plane] = acc / static_cast<float>(hw);
  }
}

template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
PoolWarpKernel(const float* __restrict__ x, float* __restrict__ pooled, int64_t planes,
               int64_t hw) {
  const int64_t plane = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (plane >= planes) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const float acc = WarpSum(PartialSum<kVec4>(x + plane * hw, hw, lane, kWarp));
  if (lane == 0) pooled[plane] = acc / static_cast<float>(hw);
}

__global__ void __launch_bounds__(kThreads)
Fc1Kernel(const float* __restrict__ pooled, const float* __restrict__ w1,
          const float* __restrict__ b1, float* __restrict__ hidden, int64_t n, int64_t c,
          int64_t cr) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= cr) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kFc1Images;
  const int images = static_cast<int>(Min64(kFc1Images, n - n0));
  const float* row = w1 + r * c;
  float acc[kFc1Images] = {};
  for (int64_t k = lane; k < c; k += kWarp) {
    const float w = __ldg(row + k);
#pragma unroll
    for (int i = 0; i < kFc1Images; ++i) {
      if (i < images) acc[i] += w * pooled[(n0 + i) * c + k];
    }
  }
  const float bias = __ldg(b1 + r);
#pragma unroll
  for (int i = 0; i < kFc1Images; ++i) {
    const float v = WarpSum(acc[i]);
    if (lane == 0 && i < images) hidden[(n0 + i) * cr + r] = fmaxf(v + bias, 0.0f);
  }
}

template <bool kResidual, bool kRelu>
__device__ __forceinline__ float Finish(float x, float gate, float residual) {
  float v = x * gate;
  if (kResidual) v += residual;
  if (kRelu) v = fmaxf(v, 0.0f);
  return v;
}

template <bool kResidual, bool kRelu, bool kVec4>
__global__ void __launch_bounds__(kThreads)
GateScaleKernel(const float* __restrict__ x, const float* __restrict__ residual,
                float* __restrict__ y, const float* __restrict__ hidden,
                const float* __restrict__ w2, const float* __restrict__ b2, int64_t c,
                int64_t cr, int64_t hw, int tile_channels, int64_t tiles_per_image) {
  __shared__ float gates[kMaxTileChannels];
  const int64_t n = blockIdx.x / tiles_per_image;
  const int64_t c0 = (blockIdx.x % tiles_per_image) * tile_channels;
  const int channels = static_cast<int>(Min64(tile_channels, c - c0));
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const float* h = hidden + n * cr;
  for (int j = warp; j < channels; j += kWarpsPerBlock) {
    const float* row = w2 + (c0 + j) * cr;
    float acc = 0.0f;
    for (int64_t k = lane; k < cr; k += kWarp) acc += __ldg(row + k) * h[k];
    acc = WarpSum(acc);
    if (lane == 0) gates[j] = 1.0f / (1.0f + expf(-(acc + __ldg(b2 + c0 + j))));
  }
  __syncthreads();

  const int64_t base = (n * c + c0) * hw;  // the tile's planes are contiguous
  const int64_t count = channels * hw;
  if (kVec4) {
    const float4* x4 = reinterpret_cast<const float4*>(x + base);
    const float4* r4 = reinterpret_cast<const float4*>(kResidual ? residual + base : nullptr);
    float4* y4 = reinterpret_cast<float4*>(y + base);
    for (int64_t i = threadIdx.x; i < count / 4; i += blockDim.x) {
      const float g = gates[(i * 4) / hw];  // hw % 4 == 0: one channel per float4
      const float4 v = __ldg(x4 + i);
      float4 r = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (kResidual) r = __ldg(r4 + i);
      y4[i] = make_float4(Finish<kResidual, kRelu>(v.x, g, r.x), Finish<kResidual, kRelu>(v.y, g, r.y),
                          Finish<kResidual, kRelu>(v.z, g, r.z), Finish<kResidual, kRelu>(v.w, g, r.w));
    }
  } else {
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
      const float r = kResidual ? __ldg(residual + base + i) : 0.0f;
      y[base + i] = Finish<kResidual, kRelu>(__ldg(x + base + i), gates[i / hw], r);
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <bool kResidual, bool kRelu>
void LaunchGateScale(const SeLaunch& a, const float* hidden, bool vec4, dim3 grid,
                     int tile_channels, int64_t tiles, cudaStream_t stream) {
  if (vec4) {
    GateScaleKernel<kResidual, kRelu, true><<<grid, kThreads, 0, stream>>>(
        a.x, a.residual, a.y, hidden, a.w2, a.b2, a.c, a.cr, a.hw, tile_channels, tiles);
  } else {
    GateScaleKernel<kResidual, kRelu, false><<<grid, kThreads, 0, stream>>>(
        a.x, a.residual, a.y, hidden, a.w2, a.b2, a.c, a.cr, a.hw, tile_channels, tiles);
  }
}

}  // namespace

size_t ScratchBytes(int64_t n, int64_t c, int64_t cr) {
  // hidden starts on a 256-byte boundary after pooled.
  const size_t pooled = (static_cast<size_t>(n * c) * sizeof(float) + 255) / 256 * 256;
  return pooled + static_cast<size_t>(n * cr) * sizeof(float);
}

const char* LaunchSqueezeExcitation(const SeLaunch& a, void* stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t planes = a.n * a.c;
  if (planes == 0 || a.hw == 0) return nullptr;
  constexpr int64_t kMaxGrid = 0x7fffffff;
  float* pooled = a.scratch;
  float* hidden = reinterpret_cast<float*>(reinterpret_cast<char*>(a.scratch) +
                                           (ScratchBytes(a.n, a.c, 0)));

  const bool x_vec4 = a.hw % 4 == 0 && Aligned16(a.x);
  if (a.hw >= kBlockPoolMinHw) {
    if (planes > kMaxGrid) return "SqueezeExcitation (CUDA): too many planes for one launch";
    const dim3 grid(static_cast<unsigned>(planes));
    if (x_vec4) {
      PoolBlockKernel<true><<<grid, kThreads, 0, stream>>>(a.x, pooled, a.hw);
    } else {
      PoolBlockKernel<false><<<grid, kThreads, 0, stream>>>(a.x, pooled, a.hw);
    }
  } else {
    const int64_t blocks = (planes + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > kMaxGrid) return "SqueezeExcitation (CUDA): too many planes for one launch";
    const dim3 grid(static_cast<unsigned>(blocks));
    if (x_vec4) {
      PoolWarpKernel<true><<<grid, kThreads, 0, stream>>>(a.x, pooled, planes, a.hw);
    } else {
      PoolWarpKernel<false><<<grid, kThreads, 0, stream>>>(a.x, pooled, planes, a.hw);
    }
  }

  if (a.cr > 0) {
    const int64_t row_blocks = (a.cr + kWarpsPerBlock - 1) / kWarpsPerBlock;
    const int64_t image_blocks = (a.n + kFc1Images - 1) / kFc1Images;
    if (row_blocks > kMaxGrid || image_blocks > 65535) {
      return "SqueezeExcitation (CUDA): batch or Cr too large for one launch";
    }
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(image_blocks));
    Fc1Kernel<<<grid, kThreads, 0, stream>>>(pooled, a.w1, a.b1, hidden, a.n, a.c, a.cr);
  }

  const int tile_channels = static_cast<int>(
      std::clamp<int64_t>(kTileElements / a.hw, 1, std::min<int64_t>(kMaxTileChannels, a.c)));
  const int64_t tiles = (a.c + tile_channels - 1) / tile_channels;
  if (a.n * tiles > kMaxGrid) return "SqueezeExcitation (CUDA): batch too large for one launch";
  const dim3 grid(static_cast<unsigned>(a.n * tiles));
  const bool vec4 = x_vec4 && Aligned16(a.y) && (a.residual == nullptr || Aligned16(a.residual));
  if (a.residual != nullptr) {
    if (a.relu) {
      LaunchGateScale<true, true>(a, hidden, vec4, grid, tile_channels, tiles, stream);
    } else {
      LaunchGateScale<true, false>(a, hidden, vec4, grid, tile_channels, tiles, stream);
    }
  } else if (a.relu) {
    LaunchGateScale<false, true>(a, hidden, vec4, grid, tile_channels, tiles, stream);
  } else {
    LaunchGateScale<false, false>(a, hidden, vec4, grid, tile_channels, tiles, stream);
  }
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace seresnet::cuda
