// CUDA kernels of SqueezeExcitation for float and half tensors, enqueued on ORT's compute stream
// only. Arithmetic is in float throughout (pool sums, both dense layers, the gate and the scale);
// half is only the storage of x, the weights, residual and y, read and written 16 bytes at a
// time (8 halves as four half2, or 4 floats) where sizes and alignment allow.
//
// Channels first, [N, C, HW] (three launches):
//   pool        one block per (n, c) plane for large planes, one warp per plane for small ones
//                                                                           -> pooled [N, C]
//   fc1         one warp per hidden unit r, each warp serving up to 8 images so a row of w1 is
//               read once per 8 images; coalesced along C                   -> hidden [N, Cr]
//   gate_scale  one block per (n, tile of channels): the block's warps compute the tile's
//               gates (w2 rows · hidden[n], coalesced along Cr) into shared memory, then the
//               block scales the tile's contiguous planes, adding the residual and applying
//               ReLU as compiled in.
// Channels last, [N, HW, C] (four launches): a pixel's channels are contiguous, so
//   pool        one block per (n, tile of 32 vectors of channels, split of the pixels): each
//               warp reads whole pixel rows, coalesced; the splits' partial means go to scratch
//               and fc1 adds them (fixed order: results do not depend on timing) -> [S, N, C]
//   fc1         as above, summing the S partial means                       -> hidden [N, Cr]
//   gates       like fc1: one warp per channel c serving up to 8 images     -> gates [N, C]
//   scale       elementwise over [N*HW, C], the gate indexed by (n, c)
// Scratch comes from the caller (ORT's allocator); nothing here allocates, synchronises or
// copies to the host, so the launches can be captured into a CUDA graph.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
// Channels-last pool: enough blocks to fill an H100/H200 (132 SMs) at batch 1, but few splits,
// since fc1 reads every split's partial means once per hidden unit.
constexpr int64_t kNhwcTargetBlocks = 264;
constexpr int64_t kNhwcMaxSplits = 16;
constexpr int64_t kNhwcMinRowsPerSplit = 32;
constexpr int64_t kMaxGrid = 0x7fffffff;

// Elements of T in 16 bytes.
template <typename T>
constexpr int kPack = static_cast<int>(16 / sizeof(T));

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return __float2half_rn(v);
  }
}

template <typename T>
__device__ __forceinline__ uint4 Load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 16 bytes of T as floats, and back (half: four half2 conversions).
template <typename T>
__device__ __forceinline__ void Unpack(const uint4& raw, float (&f)[kPack<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
  } else {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __half22float2(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 Pack(const float (&f)[kPack<T>]) {
  uint4 raw;
  if constexpr (std::is_same_v<T, float>) {
    raw = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                     __float_as_uint(f[3]));
  } else {
    __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  }
  return raw;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, bool kVec>
__device__ __forceinline__ float PartialSum(const T* __restrict__ plane, int64_t hw,
                                            int64_t start, int64_t stride) {
  float acc = 0.0f;
  if constexpr (kVec) {
    constexpr int P = kPack<T>;
    for (int64_t i = start; i < hw / P; i += stride) {
      float f[P];
      Unpack<T>(Load16(plane + i * P), f);
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < P; ++j) s += f[j];
      acc += s;
    }
  } else {
    for (int64_t i = start; i < hw; i += stride) acc += ToFloat(plane[i]);
  }
  return acc;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
PoolBlockKernel(const T* __restrict__ x, float* __restrict__ pooled, int64_t hw) {
  __shared__ float partial[kWarpsPerBlock];
  const int64_t plane = blockIdx.x;
  float acc = PartialSum<T, kVec>(x + plane * hw, hw, threadIdx.x, blockDim.x);
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

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
PoolWarpKernel(const T* __restrict__ x, float* __restrict__ pooled, int64_t planes, int64_t hw) {
  const int64_t plane = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (plane >= planes) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const float acc = WarpSum(PartialSum<T, kVec>(x + plane * hw, hw, lane, kWarp));
  if (lane == 0) pooled[plane] = acc / static_cast<float>(hw);
}

// Channels last: lane l of every warp owns channels [(tile*32 + l) * P, +P); the block's 8
// warps take every 8th pixel of the split; shared memory adds the warps' sums.
template <typename T, int P>
__global__ void __launch_bounds__(kThreads)
PoolNhwcKernel(const T* __restrict__ x, float* __restrict__ partial, int64_t n, int64_t c,
               int64_t hw, int64_t tiles, int64_t rows_per_split) {
  __shared__ float sums[kWarpsPerBlock][P][kWarp];  // lane innermost: no bank conflicts
  const int64_t image = blockIdx.x / tiles;
  const int64_t tile = blockIdx.x % tiles;
  const int lane = threadIdx.x % kWarp;
  const int row = threadIdx.x / kWarp;
  const int64_t c0 = (tile * kWarp + lane) * P;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t p_end = Min64(hw, p_begin + rows_per_split);
  float acc[P] = {};
  if (c0 < c) {
    const T* base = x + image * hw * c + c0;
    for (int64_t p = p_begin + row; p < p_end; p += kWarpsPerBlock) {
      if constexpr (P > 1) {
        float f[P];
        Unpack<T>(Load16(base + p * c), f);
#pragma unroll
        for (int j = 0; j < P; ++j) acc[j] += f[j];
      } else {
        acc[0] += ToFloat(base[p * c]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < P; ++j) sums[row][j][lane] = acc[j];
  __syncthreads();
  if (row == 0 && c0 < c) {
    for (int r = 1; r < kWarpsPerBlock; ++r) {
#pragma unroll
      for (int j = 0; j < P; ++j) acc[j] += sums[r][j][lane];
    }
    const float scale = 1.0f / static_cast<float>(hw);
    float* out = partial + (static_cast<int64_t>(blockIdx.y) * n + image) * c + c0;
#pragma unroll
    for (int j = 0; j < P; ++j) out[j] = acc[j] * scale;
  }
}

// A small dense layer, out[n, r] = act(w[r] · in[n] + b[r]), one warp per output r serving up
// to 8 images, so each row of w is read once per 8 images, coalesced along `inputs`. `in` holds
// `splits` [N, inputs] slices that are summed first (the channels-last pool's partial means;
// 1 otherwise). fc1: in = pooled, act = ReLU. Channels-last gates: in = hidden, act = sigmoid.
template <typename T, bool kSigmoid>
__global__ void __launch_bounds__(kThreads)
DenseKernel(const float* __restrict__ in, int64_t splits, const T* __restrict__ w,
            const T* __restrict__ b, float* __restrict__ out, int64_t n, int64_t inputs,
            int64_t outputs) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= outputs) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kFc1Images;
  const int images = static_cast<int>(Min64(kFc1Images, n - n0));
  const T* row = w + r * inputs;
  float acc[kFc1Images] = {};
  for (int64_t k = lane; k < inputs; k += kWarp) {
    const float weight = ToFloat(row[k]);
#pragma unroll
    for (int i = 0; i < kFc1Images; ++i) {
      if (i < images) {
        float v = in[(n0 + i) * inputs + k];
        for (int64_t s = 1; s < splits; ++s) v += in[(s * n + n0 + i) * inputs + k];
        acc[i] += weight * v;
      }
    }
  }
  const float bias = ToFloat(b[r]);
#pragma unroll
  for (int i = 0; i < kFc1Images; ++i) {
    const float v = WarpSum(acc[i]) + bias;
    if (lane == 0 && i < images) {
      out[(n0 + i) * outputs + r] = kSigmoid ? 1.0f / (1.0f + expf(-v)) : fmaxf(v, 0.0f);
    }
  }
}

template <bool kResidual, bool kRelu>
__device__ __forceinline__ float Finish(float x, float gate, float residual) {
  float v = x * gate;
  if (kResidual) v += residual;
  if (kRelu) v = fmaxf(v, 0.0f);
  return v;
}

// gate = sigmoid(w2[ch] · hidden[image] + b2[ch]) by one warp, returned to lane 0.
template <typename T>
__device__ __forceinline__ float WarpGate(const T* __restrict__ w2, const T* __restrict__ b2,
                                          const float* __restrict__ h, int64_t ch, int64_t cr,
                                          int lane) {
  const T* row = w2 + ch * cr;
  float acc = 0.0f;
  for (int64_t k = lane; k < cr; k += kWarp) acc += ToFloat(row[k]) * h[k];
  acc = WarpSum(acc);
  return 1.0f / (1.0f + expf(-(acc + ToFloat(b2[ch]))));
}

// How gate_scale walks its tile of contiguous planes:
//   kScalar    one element at a time (odd sizes or misaligned pointers)
//   kPlaneVec  16-byte vectors, hw % P == 0: each vector lies in one channel's plane
//   kTileVec   16-byte vectors over the whole tile, hw % P != 0 (fp16 14x14 and 7x7 planes:
//              196 and 49 halves): the tile starts on a vector boundary (c % P == 0 and
//              tile_channels % P == 0), a vector may cross into the next plane, and the
//              channel is one 32-bit division per vector, then a compare per element
enum class Walk { kScalar, kPlaneVec, kTileVec };

template <typename T, bool kResidual, bool kRelu, Walk kWalk, typename Index>
__global__ void __launch_bounds__(kThreads)
GateScaleKernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                const float* __restrict__ hidden, const T* __restrict__ w2,
                const T* __restrict__ b2, int64_t c, int64_t cr, int64_t hw, int tile_channels,
                int64_t tiles_per_image) {
  __shared__ float gates[kMaxTileChannels];
  // grid.x = n * tiles < 2^31 (checked on the host): 32-bit arithmetic for the block's tile.
  const auto tiles32 = static_cast<uint32_t>(tiles_per_image);
  const int64_t n = blockIdx.x / tiles32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % tiles32) * tile_channels;
  const int channels = static_cast<int>(Min64(tile_channels, c - c0));
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int j = warp; j < channels; j += kWarpsPerBlock) {
    const float g = WarpGate(w2, b2, hidden + n * cr, c0 + j, cr, lane);
    if (lane == 0) gates[j] = g;
  }
  __syncthreads();

  const int64_t base = (n * c + c0) * hw;  // the tile's planes are contiguous
  // Offsets inside one tile: Index is uint32_t whenever the tile fits (the host checks), so
  // no 64-bit division is left in the loops.
  const Index plane = static_cast<Index>(hw);
  const Index count = static_cast<Index>(channels) * plane;
  const T* xt = x + base;
  const T* rt = kResidual ? residual + base : nullptr;
  T* yt = y + base;
  if constexpr (kWalk == Walk::kPlaneVec) {
    constexpr int P = kPack<T>;
    for (Index i = threadIdx.x; i < count / P; i += blockDim.x) {
      const float g = gates[(i * P) / plane];  // hw % P == 0: one channel per vector
      float v[P], r[P] = {};
      Unpack<T>(Load16(xt + i * P), v);
      if (kResidual) Unpack<T>(Load16(rt + i * P), r);
#pragma unroll
      for (int j = 0; j < P; ++j) v[j] = Finish<kResidual, kRelu>(v[j], g, r[j]);
      *reinterpret_cast<uint4*>(yt + i * P) = Pack<T>(v);
    }
  } else if constexpr (kWalk == Walk::kTileVec) {
    constexpr int P = kPack<T>;
    for (Index i = threadIdx.x; i < count / P; i += blockDim.x) {
      const Index e = i * P;
      Index ch = e / plane;
      Index next = (ch + 1) * plane;  // where the next channel's plane starts
      float v[P], r[P] = {};
      Unpack<T>(Load16(xt + e), v);
      if (kResidual) Unpack<T>(Load16(rt + e), r);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (e + j == next) {  // hw >= 1: at most one plane boundary per element step
          ++ch;
          next += plane;
        }
        v[j] = Finish<kResidual, kRelu>(v[j], gates[ch], r[j]);
      }
      *reinterpret_cast<uint4*>(yt + e) = Pack<T>(v);
    }
  } else {
    for (Index i = threadIdx.x; i < count; i += blockDim.x) {
      const float r = kResidual ? ToFloat(rt[i]) : 0.0f;
      yt[i] = FromFloat<T>(Finish<kResidual, kRelu>(ToFloat(xt[i]), gates[i / plane], r));
    }
  }
}

// Channels last: y = x * gates[n, c] (+ residual)(relu) over [N*HW, C], P elements per thread
// step (c % P == 0, so a vector never straddles two pixels). Index is uint32_t when every
// offset fits: 64-bit division per vector would cost more than the arithmetic it indexes.
template <typename T, bool kResidual, bool kRelu, int P, typename Index>
__global__ void __launch_bounds__(kThreads)
ScaleNhwcKernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                const float* __restrict__ gates, Index vectors, Index c, Index hwc) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors;
       i += stride) {
    const Index e = i * P;
    const float* g = gates + (e / hwc) * c + e % c;
    if constexpr (P > 1) {
      float v[P], r[P] = {};
      Unpack<T>(Load16(x + e), v);
      if (kResidual) Unpack<T>(Load16(residual + e), r);
#pragma unroll
      for (int j = 0; j < P; ++j) v[j] = Finish<kResidual, kRelu>(v[j], g[j], r[j]);
      *reinterpret_cast<uint4*>(y + e) = Pack<T>(v);
    } else {
      const float r = kResidual ? ToFloat(residual[e]) : 0.0f;
      y[e] = FromFloat<T>(Finish<kResidual, kRelu>(ToFloat(x[e]), g[0], r));
    }
  }
}

template <typename T, bool kResidual, bool kRelu, int P>
void LaunchScaleNhwc(const T* x, const T* residual, T* y, const float* gates, int64_t vectors,
                     int64_t c, int64_t hwc, cudaStream_t stream) {
  const auto blocks =
      static_cast<unsigned>(std::clamp<int64_t>(CeilDiv(vectors, kThreads), 1, 1 << 20));
  // The loop's last index plus one stride must fit too.
  const int64_t largest = (vectors + static_cast<int64_t>(blocks) * kThreads) * P;
  if (largest < (int64_t{1} << 32)) {
    ScaleNhwcKernel<T, kResidual, kRelu, P, uint32_t><<<blocks, kThreads, 0, stream>>>(
        x, residual, y, gates, static_cast<uint32_t>(vectors), static_cast<uint32_t>(c),
        static_cast<uint32_t>(hwc));
  } else {
    ScaleNhwcKernel<T, kResidual, kRelu, P, int64_t><<<blocks, kThreads, 0, stream>>>(
        x, residual, y, gates, vectors, c, hwc);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

size_t Floats256(int64_t floats) {  // bytes, rounded up to a 256-byte boundary
  return (static_cast<size_t>(floats) * sizeof(float) + 255) / 256 * 256;
}

// Everything about a launch that follows from its sizes, pointers and type alone, shared by
// ScratchBytes and the launch so that both agree.
struct Plan {
  int pack = 1;           // elements per 16-byte vector of T
  bool x_vec = false;     // x can be read in 16-byte vectors
  bool all_vec = false;   // x, residual and y can all be accessed in 16-byte vectors
  int64_t tiles = 1;      // channels-last pool: tiles of 32 vectors of channels
  int64_t splits = 1;     // channels-last pool: pixel splits (partial means in scratch)
  int64_t rows_per_split = 0;
  int64_t tile_channels = 1;  // channels first: channels per gate_scale block
  Walk walk = Walk::kScalar;  // channels first: how gate_scale walks a tile
  bool wide_index = false;    // a tile has 2^31 elements or more: 64-bit offsets
  size_t pooled_bytes = 0, hidden_bytes = 0, gates_bytes = 0;
};

Plan MakePlan(const SeLaunch& a) {
  Plan p;
  p.pack = a.dtype == DType::kFloat16 ? kPack<__half> : kPack<float>;
  const int64_t along = a.channels_last ? a.c : a.hw;  // the contiguous extent
  p.x_vec = along % p.pack == 0 && Aligned16(a.x);
  p.all_vec = p.x_vec && Aligned16(a.y) && (a.residual == nullptr || Aligned16(a.residual));
  if (a.channels_last) {
    const int64_t width = p.x_vec ? p.pack : 1;
    p.tiles = std::max<int64_t>(CeilDiv(a.c, kWarp * width), 1);
    const int64_t wanted = CeilDiv(kNhwcTargetBlocks, std::max<int64_t>(a.n * p.tiles, 1));
    const int64_t most = std::max<int64_t>(
        1, std::min<int64_t>(kNhwcMaxSplits, a.hw / kNhwcMinRowsPerSplit));
    p.splits = std::clamp<int64_t>(wanted, 1, most);
    p.rows_per_split = std::max<int64_t>(CeilDiv(a.hw, p.splits), 1);
    p.splits = std::max<int64_t>(CeilDiv(a.hw, p.rows_per_split), 1);
    p.gates_bytes = Floats256(a.n * a.c);
  } else {
    p.tile_channels =
        std::clamp<int64_t>(kTileElements / a.hw, 1, std::min<int64_t>(kMaxTileChannels, a.c));
    const bool aligned =
        Aligned16(a.x) && Aligned16(a.y) && (a.residual == nullptr || Aligned16(a.residual));
    if (p.all_vec) {
      p.walk = Walk::kPlaneVec;
    } else if (aligned && a.c % p.pack == 0 && a.c >= p.pack) {
      // Whole vectors per tile: tiles of a multiple of P channels start on a vector boundary.
      p.tile_channels = std::max<int64_t>(p.tile_channels / p.pack * p.pack, p.pack);
      p.walk = Walk::kTileVec;
    }
    p.wide_index = p.tile_channels * a.hw >= (int64_t{1} << 31);
  }
  p.pooled_bytes = Floats256(p.splits * a.n * a.c);
  p.hidden_bytes = Floats256(a.n * a.cr);
  return p;
}

template <typename T, bool kResidual, bool kRelu>
void LaunchScale(const SeLaunch& a, const Plan& p, const float* hidden, const float* gates,
                 cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* residual = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  const T* w2 = static_cast<const T*>(a.w2);
  const T* b2 = static_cast<const T*>(a.b2);
  if (a.channels_last) {
    const int64_t elements = a.n * a.hw * a.c;
    if (p.all_vec) {
      LaunchScaleNhwc<T, kResidual, kRelu, kPack<T>>(x, residual, y, gates,
                                                     elements / kPack<T>, a.c, a.hw * a.c,
                                                     stream);
    } else {
      LaunchScaleNhwc<T, kResidual, kRelu, 1>(x, residual, y, gates, elements, a.c,
                                              a.hw * a.c, stream);
    }
    return;
  }
  const int tile_channels = static_cast<int>(p.tile_channels);
  const int64_t tiles = CeilDiv(a.c, tile_channels);
  const dim3 grid(static_cast<unsigned>(a.n * tiles));
#define SE_GATE_SCALE(WALK, INDEX)                                                   \
  GateScaleKernel<T, kResidual, kRelu, WALK, INDEX><<<grid, kThreads, 0, stream>>>( \
      x, residual, y, hidden, w2, b2, a.c, a.cr, a.hw, tile_channels, tiles)
  if (p.wide_index) {
    SE_GATE_SCALE(Walk::kScalar, int64_t);
  } else if (p.walk == Walk::kPlaneVec) {
    SE_GATE_SCALE(Walk::kPlaneVec, uint32_t);
  } else if (p.walk == Walk::kTileVec) {
    SE_GATE_SCALE(Walk::kTileVec, uint32_t);
  } else {
    SE_GATE_SCALE(Walk::kScalar, uint32_t);
  }
#undef SE_GATE_SCALE
}

template <typename T>
const char* LaunchTyped(const SeLaunch& a, cudaStream_t stream) {
  const Plan p = MakePlan(a);
  const T* x = static_cast<const T*>(a.x);
  char* scratch = reinterpret_cast<char*>(a.scratch);
  float* pooled = reinterpret_cast<float*>(scratch);
  float* hidden = reinterpret_cast<float*>(scratch + p.pooled_bytes);
  float* gates = reinterpret_cast<float*>(scratch + p.pooled_bytes + p.hidden_bytes);
  const int64_t planes = a.n * a.c;
  // Every size check before the first launch: a refused call enqueues nothing.
  const int64_t image_blocks = CeilDiv(a.n, kFc1Images);
  const int64_t tile_channels = p.tile_channels;
  if (planes > kMaxGrid || a.n * p.tiles > kMaxGrid || p.splits > 65535 ||
      image_blocks > 65535 || CeilDiv(std::max(a.c, a.cr), kWarpsPerBlock) > kMaxGrid ||
      (!a.channels_last && a.n * CeilDiv(a.c, tile_channels) > kMaxGrid)) {
    return "SqueezeExcitation (CUDA): batch or channels too large for one launch";
  }

  if (a.channels_last) {
    const dim3 grid(static_cast<unsigned>(a.n * p.tiles), static_cast<unsigned>(p.splits));
    if (p.x_vec) {
      PoolNhwcKernel<T, kPack<T>><<<grid, kThreads, 0, stream>>>(x, pooled, a.n, a.c, a.hw,
                                                                  p.tiles, p.rows_per_split);
    } else {
      PoolNhwcKernel<T, 1><<<grid, kThreads, 0, stream>>>(x, pooled, a.n, a.c, a.hw, p.tiles,
                                                           p.rows_per_split);
    }
  } else if (a.hw >= kBlockPoolMinHw) {
    const dim3 grid(static_cast<unsigned>(planes));
    if (p.x_vec) {
      PoolBlockKernel<T, true><<<grid, kThreads, 0, stream>>>(x, pooled, a.hw);
    } else {
      PoolBlockKernel<T, false><<<grid, kThreads, 0, stream>>>(x, pooled, a.hw);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(CeilDiv(planes, kWarpsPerBlock)));
    if (p.x_vec) {
      PoolWarpKernel<T, true><<<grid, kThreads, 0, stream>>>(x, pooled, planes, a.hw);
    } else {
      PoolWarpKernel<T, false><<<grid, kThreads, 0, stream>>>(x, pooled, planes, a.hw);
    }
  }

  if (a.cr > 0) {
    const dim3 grid(static_cast<unsigned>(CeilDiv(a.cr, kWarpsPerBlock)),
                    static_cast<unsigned>(image_blocks));
    DenseKernel<T, false><<<grid, kThreads, 0, stream>>>(
        pooled, p.splits, static_cast<const T*>(a.w1), static_cast<const T*>(a.b1), hidden, a.n,
        a.c, a.cr);
  }

  if (a.channels_last) {
    // gates [N, C] = sigmoid(w2 · hidden + b2), each row of w2 read once per 8 images
    const dim3 grid(static_cast<unsigned>(CeilDiv(a.c, kWarpsPerBlock)),
                    static_cast<unsigned>(image_blocks));
    DenseKernel<T, true><<<grid, kThreads, 0, stream>>>(
        hidden, 1, static_cast<const T*>(a.w2), static_cast<const T*>(a.b2), gates, a.n, a.cr,
        a.c);
  }
  if (a.residual != nullptr) {
    if (a.relu) {
      LaunchScale<T, true, true>(a, p, hidden, gates, stream);
    } else {
      LaunchScale<T, true, false>(a, p, hidden, gates, stream);
    }
  } else if (a.relu) {
    LaunchScale<T, false, true>(a, p, hidden, gates, stream);
  } else {
    LaunchScale<T, false, false>(a, p, hidden, gates, stream);
  }
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace

size_t ScratchBytes(const SeLaunch& args) {
  const Plan p = MakePlan(args);
  return p.pooled_bytes + p.hidden_bytes + p.gates_bytes;
}

const char* LaunchSqueezeExcitation(const SeLaunch& a, void* stream_handle) {
  if (a.n * a.c == 0 || a.hw == 0) return nullptr;
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (a.dtype == DType::kFloat16) return LaunchTyped<__half>(a, stream);
  return LaunchTyped<float>(a, stream);
}

}  // namespace seresnet::cuda
