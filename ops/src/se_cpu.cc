// CPU kernel of SqueezeExcitation. Four passes over ORT's intra-op thread pool, each over
// contiguous memory so the compiler vectorises the inner loops:
//   1. pool   mean over H*W of every (n, c) plane                        -> pooled [N, C]
//   2. fc1    for each hidden unit r and every image: relu(w1[r] · pooled[n] + b1[r]);
//             a row of w1 is read once for the whole batch               -> hidden [N, Cr]
//   3. gates  for a block of channels and every image: sigmoid(b2 + Σ_k hidden[n,k] w2ᵀ[k]),
//             contiguous multiply-adds along the channels of w2ᵀ [Cr, C], which is transposed
//             once when the kernel is created (w2 is an initializer)     -> gates [N, C]
//   4. scale  y = x * gate (+ residual)(relu) for every plane
// Channels-last tensors ([N,H,W,C]) take their own pool and scale passes, which run along the
// contiguous channels of each pixel instead. The float16 kernel widens its inputs to float,
// runs the same passes and rounds the output once: on the CPU it exists so that float16 graphs
// run and can be checked here, not for speed.
// The range functions are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one.
// Tasks split the work the same way whatever the pool size, so results do not depend on the
// number of threads.
#include "se_cpu.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "se_common.h"

// Defining SE_MULTIVERSION empty (-DSE_MULTIVERSION=) builds one instruction set only, e.g.
// to test the baseline code on a machine that would pick AVX-512.
#if !defined(SE_MULTIVERSION) && defined(__x86_64__) && defined(__GNUC__) && \
    defined(__has_attribute)
#if __has_attribute(target_clones)
#define SE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef SE_MULTIVERSION
#define SE_MULTIVERSION
#endif
// Helpers are inlined into each clone and so compiled for its instruction set.
#define SE_INLINE static inline __attribute__((always_inline))

namespace seresnet {
namespace {

// Work per parallel task, in floats touched: large enough to amortise scheduling, small
// enough to spread a single image over the pool.
constexpr int64_t kGrainFloats = 16384;
// Independent partial sums: enough vector registers in flight to hide the add latency.
constexpr int kLanes = 64;
// Register block of the fully connected layers: images x outputs (16 AVX-512 registers).
constexpr int kBlockImages = 4;
constexpr int kBlock = 64;

SE_INLINE float Sum(const float* __restrict p, int64_t n) {
  float acc = 0.0f;
  int64_t i = 0;
  if (n >= kLanes) {
    float lanes[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += p[i + j];
    }
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  }
#pragma omp simd reduction(+ : acc)
  for (int64_t k = i; k < n; ++k) acc += p[k];
  return acc;
}

// exp(x) for float, vectorisable (std::exp is a library call the compiler cannot vectorise):
// x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial (Cephes' expf
// coefficients, relative error ~2e-7), times 2^k built in the exponent bits.
SE_INLINE float Exp(float x) {
  // Keeps 2^k a normal float. (These selects vectorise without AVX-512 masks only under
  // -fno-trapping-math, which the build sets.)
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln2 to the nearest integer by adding and removing 1.5 * 2^23.
  constexpr float kRound = 12582912.0f;
  const float k = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

SE_INLINE float Sigmoid(float v) { return 1.0f / (1.0f + Exp(-v)); }

SE_MULTIVERSION void PoolRange(const float* __restrict x, float* __restrict pooled,
                               int64_t begin, int64_t end, int64_t hw) {
  const float scale = 1.0f / static_cast<float>(hw);
  for (int64_t plane = begin; plane < end; ++plane) {
    pooled[plane] = Sum(x + plane * hw, hw) * scale;
  }
}

// Channels last: the sums of image n's pixels, one running sum per channel, along each pixel's
// contiguous channels (so the inner loop vectorises).
SE_MULTIVERSION void PoolNhwcRange(const float* __restrict x, float* __restrict pooled,
                                   int64_t begin, int64_t end, int64_t hw, int64_t c) {
  const float scale = 1.0f / static_cast<float>(hw);
  for (int64_t n = begin; n < end; ++n) {
    float* __restrict acc = pooled + n * c;
    for (int64_t k = 0; k < c; ++k) acc[k] = 0.0f;
    for (int64_t p = 0; p < hw; ++p) {
      const float* __restrict row = x + (n * hw + p) * c;
      for (int64_t k = 0; k < c; ++k) acc[k] += row[k];
    }
    for (int64_t k = 0; k < c; ++k) acc[k] *= scale;
  }
}

enum class Activation { kRelu, kSigmoid };

template <Activation A>
SE_INLINE float Activate(float v) {
  if constexpr (A == Activation::kRelu) {
    return v > 0.0f ? v : 0.0f;
  } else {
    return Sigmoid(v);
  }
}

// out[i, j] = act(bias[j] + Σ_k in[i, k] · wt[k, j]) for a block of kImages images and
// kBlock outputs j0 .. j0 + kBlock: the block's fixed size lets the compiler keep it in vector
// registers while rows of wt stream by. (Rows of wt and out lie a power of two apart in
// SE-ResNets; accumulating in place would make them evict each other from the same cache sets.)
template <Activation A, int kImages>
SE_INLINE void DenseBlock(const float* __restrict wt, const float* __restrict bias,
                          const float* __restrict in, float* __restrict out, int64_t j0,
                          int64_t i0, int64_t inputs, int64_t outputs) {
  float acc[kImages][kBlock];
  for (int i = 0; i < kImages; ++i) {
    for (int j = 0; j < kBlock; ++j) acc[i][j] = bias[j0 + j];
  }
  for (int64_t k = 0; k < inputs; ++k) {
    const float* __restrict row = wt + k * outputs + j0;
    for (int i = 0; i < kImages; ++i) {
      const float v = in[(i0 + i) * inputs + k];
      for (int j = 0; j < kBlock; ++j) acc[i][j] += v * row[j];
    }
  }
  for (int i = 0; i < kImages; ++i) {
    float* __restrict o = out + (i0 + i) * outputs + j0;
    for (int j = 0; j < kBlock; ++j) o[j] = Activate<A>(acc[i][j]);
  }
}

// The same for a block narrower than kBlock (the last outputs), one image at a time.
template <Activation A>
SE_INLINE void DenseEdge(const float* __restrict wt, const float* __restrict bias,
                         const float* __restrict in, float* __restrict out, int64_t j0,
                         int64_t width, int64_t n, int64_t inputs, int64_t outputs) {
  for (int64_t i = 0; i < n; ++i) {
    float* __restrict o = out + i * outputs + j0;
    for (int64_t j = 0; j < width; ++j) o[j] = bias[j0 + j];
    for (int64_t k = 0; k < inputs; ++k) {
      const float v = in[i * inputs + k];
      const float* __restrict row = wt + k * outputs + j0;
      for (int64_t j = 0; j < width; ++j) o[j] += v * row[j];
    }
    for (int64_t j = 0; j < width; ++j) o[j] = Activate<A>(o[j]);
  }
}

// A fully connected layer with wt = Wᵀ [inputs, outputs], for outputs [begin, end).
template <Activation A>
SE_INLINE void DenseRange(const float* __restrict wt, const float* __restrict bias,
                          const float* __restrict in, float* __restrict out, int64_t begin,
                          int64_t end, int64_t n, int64_t inputs, int64_t outputs) {
  for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
    const int64_t width = std::min<int64_t>(kBlock, end - j0);
    if (width < kBlock) {
      DenseEdge<A>(wt, bias, in, out, j0, width, n, inputs, outputs);
      continue;
    }
    int64_t i0 = 0;
    for (; i0 + kBlockImages <= n; i0 += kBlockImages) {
      DenseBlock<A, kBlockImages>(wt, bias, in, out, j0, i0, inputs, outputs);
    }
    for (; i0 < n; ++i0) DenseBlock<A, 1>(wt, bias, in, out, j0, i0, inputs, outputs);
  }
}

SE_MULTIVERSION void Fc1Range(const float* w1t, const float* b1, const float* pooled,
                              float* hidden, int64_t begin, int64_t end, int64_t n, int64_t c,
                              int64_t cr) {
  DenseRange<Activation::kRelu>(w1t, b1, pooled, hidden, begin, end, n, c, cr);
}

SE_MULTIVERSION void GateRange(const float* w2t, const float* b2, const float* hidden,
                               float* gates, int64_t begin, int64_t end, int64_t n, int64_t c,
                               int64_t cr) {
  DenseRange<Activation::kSigmoid>(w2t, b2, hidden, gates, begin, end, n, cr, c);
}

// One loop per (residual, relu) combination keeps each one branch-free and vectorisable.
SE_MULTIVERSION void ScaleRange(const float* __restrict x, const float* __restrict residual,
                                float* __restrict y, const float* __restrict gates,
                                int64_t begin, int64_t end, int64_t hw, bool relu) {
  for (int64_t plane = begin; plane < end; ++plane) {
    const float g = gates[plane];
    const int64_t o = plane * hw;
    if (residual != nullptr && relu) {
      for (int64_t i = o; i < o + hw; ++i) {
        const float v = x[i] * g + residual[i];
        y[i] = v > 0.0f ? v : 0.0f;
      }
    } else if (residual != nullptr) {
      for (int64_t i = o; i < o + hw; ++i) y[i] = x[i] * g + residual[i];
    } else if (relu) {
      for (int64_t i = o; i < o + hw; ++i) {
        const float v = x[i] * g;
        y[i] = v > 0.0f ? v : 0.0f;
      }
    } else {
      for (int64_t i = o; i < o + hw; ++i) y[i] = x[i] * g;
    }
  }
}

// Channels last: rows [begin, end) of the [N*H*W, C] view, each scaled by its image's gates.
SE_MULTIVERSION void ScaleNhwcRange(const float* __restrict x, const float* __restrict residual,
                                    float* __restrict y, const float* __restrict gates,
                                    int64_t begin, int64_t end, int64_t hw, int64_t c,
                                    bool relu) {
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict g = gates + (row / hw) * c;
    const int64_t o = row * c;
    if (residual != nullptr && relu) {
      for (int64_t k = 0; k < c; ++k) {
        const float v = x[o + k] * g[k] + residual[o + k];
        y[o + k] = v > 0.0f ? v : 0.0f;
      }
    } else if (residual != nullptr) {
      for (int64_t k = 0; k < c; ++k) y[o + k] = x[o + k] * g[k] + residual[o + k];
    } else if (relu) {
      for (int64_t k = 0; k < c; ++k) {
        const float v = x[o + k] * g[k];
        y[o + k] = v > 0.0f ? v : 0.0f;
      }
    } else {
      for (int64_t k = 0; k < c; ++k) y[o + k] = x[o + k] * g[k];
    }
  }
}

// One call's tensors, scratch, and how the pass being run is split.
struct CpuCall {
  const SeTensors* t = nullptr;
  bool relu = false;
  const float* w1t = nullptr;  // [C, Cr]
  const float* w2t = nullptr;  // [Cr, C]
  float* pooled = nullptr;     // [N, C]
  float* hidden = nullptr;     // [N, Cr]
  float* gates = nullptr;      // [N, C]
  int64_t grain = 1;           // items per task of the pass being run
  int64_t items = 0;
};

void PoolTask(const CpuCall& call, int64_t begin, int64_t end) {
  PoolRange(call.t->x, call.pooled, begin, end, call.t->dims.hw);
}

void PoolNhwcTask(const CpuCall& call, int64_t begin, int64_t end) {
  PoolNhwcRange(call.t->x, call.pooled, begin, end, call.t->dims.hw, call.t->dims.c);
}

void Fc1Task(const CpuCall& call, int64_t begin, int64_t end) {
  const SeDims& d = call.t->dims;
  Fc1Range(call.w1t, call.t->b1, call.pooled, call.hidden, begin, end, d.n, d.c, d.cr);
}

void GateTask(const CpuCall& call, int64_t begin, int64_t end) {
  const SeDims& d = call.t->dims;
  GateRange(call.w2t, call.t->b2, call.hidden, call.gates, begin, end, d.n, d.c, d.cr);
}

void ScaleTask(const CpuCall& call, int64_t begin, int64_t end) {
  const SeTensors& t = *call.t;
  ScaleRange(t.x, t.residual, t.y, call.gates, begin, end, t.dims.hw, call.relu);
}

void ScaleNhwcTask(const CpuCall& call, int64_t begin, int64_t end) {
  const SeTensors& t = *call.t;
  ScaleNhwcRange(t.x, t.residual, t.y, call.gates, begin, end, t.dims.hw, t.dims.c, call.relu);
}

// A task of the thread pool: items [task * grain, (task + 1) * grain).
template <void (*Range)(const CpuCall&, int64_t, int64_t)>
void RangeTask(void* data, size_t task) {
  const auto& call = *static_cast<const CpuCall*>(data);
  const int64_t begin = static_cast<int64_t>(task) * call.grain;
  Range(call, begin, std::min(begin + call.grain, call.items));
}

// Splits `items` units of `cost` floats each into tasks of about kGrainFloats (a multiple of
// `align` items) and runs them.
template <void (*Range)(const CpuCall&, int64_t, int64_t)>
void RunParallel(const Ort::KernelContext& ctx, CpuCall& call, int64_t items, int64_t cost,
                 int64_t align = 1) {
  if (items <= 0) return;
  int64_t grain = std::max<int64_t>(kGrainFloats / std::max<int64_t>(cost, 1), 1);
  grain = (grain + align - 1) / align * align;
  call.items = items;
  call.grain = std::min(grain, items);
  const int64_t tasks = (items + call.grain - 1) / call.grain;
  if (tasks == 1) {
    Range(call, 0, items);  // not worth a trip through the pool
    return;
  }
  ctx.ParallelFor(&RangeTask<Range>, static_cast<size_t>(tasks), 0, &call);
}

// A [rows, cols] row-major matrix as [cols, rows].
void Transpose(const float* w, int64_t rows, int64_t cols, float* wt) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) wt[k * rows + r] = w[r * cols + k];
  }
}

// A weight matrix transposed once, when the kernel is created, if it is an initializer.
class PackedWeight {
 public:
  PackedWeight(const OrtKernelInfo* info, size_t input) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    const OrtApi& api = Ort::GetApi();
    if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, input, &is_constant,
                                                                  &value)) {
      api.ReleaseStatus(status);
      return;
    }
    if (!is_constant || value == nullptr) return;
    const Ort::ConstValue tensor(value);
    const auto type_and_shape = tensor.GetTensorTypeAndShapeInfo();
    shape_ = type_and_shape.GetShape();
    if (shape_.size() != 2) return;  // Run() reports the bad shape
    const auto count = static_cast<size_t>(shape_[0] * shape_[1]);
    transposed_.resize(count);
    if (type_and_shape.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      std::vector<float> wide(count);
      const auto* half = tensor.GetTensorData<Ort::Float16_t>();
      for (size_t i = 0; i < count; ++i) wide[i] = half[i].ToFloat();
      Transpose(wide.data(), shape_[0], shape_[1], transposed_.data());
    } else {
      Transpose(tensor.GetTensorData<float>(), shape_[0], shape_[1], transposed_.data());
    }
  }

  bool Packed(int64_t rows, int64_t cols) const {
    return !transposed_.empty() && shape_ == std::vector<int64_t>{rows, cols};
  }

  // The transposed weight for this call: the packed copy, or `w` transposed into `scratch`
  // (rows * cols floats) when the weight is not an initializer.
  const float* Get(const float* w, int64_t rows, int64_t cols, float* scratch) const {
    if (Packed(rows, cols)) return transposed_.data();
    Transpose(w, rows, cols, scratch);
    return scratch;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<float> transposed_;
};

// The float passes over one call's (float) tensors; the kernels' weights pre-transposed.
void Compute(const Ort::KernelContext& ctx, const SeTensors& t, const PackedWeight& w1t,
             const PackedWeight& w2t, bool relu) {
  const SeDims& d = t.dims;
  // pooled, gates, hidden, then room to transpose w1 and w2 if they are not initializers.
  const int64_t weights = d.c * d.cr;
  const int64_t unpacked = (w1t.Packed(d.cr, d.c) ? 0 : weights) +
                           (w2t.Packed(d.c, d.cr) ? 0 : weights);
  const std::unique_ptr<float[]> scratch(new float[d.n * (2 * d.c + d.cr) + unpacked]);
  CpuCall call;
  call.t = &t;
  call.relu = relu;
  call.pooled = scratch.get();
  call.gates = call.pooled + d.n * d.c;
  call.hidden = call.gates + d.n * d.c;
  float* spare = call.hidden + d.n * d.cr;
  call.w1t = w1t.Get(t.w1, d.cr, d.c, spare);
  if (!w1t.Packed(d.cr, d.c)) spare += weights;
  call.w2t = w2t.Get(t.w2, d.c, d.cr, spare);
  const int64_t touched = t.residual ? 3 : 2;
  if (d.channels_last) {
    RunParallel<PoolNhwcTask>(ctx, call, d.n, d.hw * d.c);
  } else {
    RunParallel<PoolTask>(ctx, call, d.n * d.c, d.hw);
  }
  RunParallel<Fc1Task>(ctx, call, d.cr, d.n * d.c, /*align=*/kBlock);
  RunParallel<GateTask>(ctx, call, d.c, d.n * d.cr, /*align=*/kBlock);
  if (d.channels_last) {
    RunParallel<ScaleNhwcTask>(ctx, call, d.n * d.hw, d.c * touched);
  } else {
    RunParallel<ScaleTask>(ctx, call, d.n * d.c, d.hw * touched);
  }
}

std::vector<float> Widen(const Ort::Float16_t* half, int64_t count) {
  std::vector<float> wide(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) wide[i] = half[i].ToFloat();
  return wide;
}

template <typename T>
class CpuKernel : public SeKernelBase<CpuKernel<T>> {
 public:
  static constexpr const char* kProvider = "CPUExecutionProvider";
  using Element = T;

  explicit CpuKernel(const OrtKernelInfo* info)
      : SeKernelBase<CpuKernel<T>>(info), w1t_(info, kW1), w2t_(info, kW2) {}

  void Run(const Ort::KernelContext& ctx, const SeTensorsOf<T>& t) const {
    if constexpr (std::is_same_v<T, float>) {
      Compute(ctx, t, w1t_, w2t_, this->relu_);
    } else {
      const SeDims& d = t.dims;
      const std::vector<float> x = Widen(t.x, d.elements());
      const std::vector<float> residual =
          t.residual ? Widen(t.residual, d.elements()) : std::vector<float>();
      const std::vector<float> w1 = Widen(t.w1, d.cr * d.c);
      const std::vector<float> b1 = Widen(t.b1, d.cr);
      const std::vector<float> w2 = Widen(t.w2, d.c * d.cr);
      const std::vector<float> b2 = Widen(t.b2, d.c);
      std::vector<float> y(static_cast<size_t>(d.elements()));
      SeTensors wide;
      wide.dims = d;
      wide.x = x.data();
      wide.residual = t.residual ? residual.data() : nullptr;
      wide.w1 = w1.data();
      wide.b1 = b1.data();
      wide.w2 = w2.data();
      wide.b2 = b2.data();
      wide.y = y.data();
      Compute(ctx, wide, w1t_, w2t_, this->relu_);
      for (int64_t i = 0; i < d.elements(); ++i) t.y[i] = Ort::Float16_t(y[i]);
    }
  }

 private:
  PackedWeight w1t_;  // [C, Cr]
  PackedWeight w2t_;  // [Cr, C]
};

}  // namespace

const OrtCustomOp* CpuSqueezeExcitationOp() {
  static const SeOp<CpuKernel<float>> op;
  return &op;
}

const OrtCustomOp* CpuSqueezeExcitationFloat16Op() {
  static const SeOp<CpuKernel<Ort::Float16_t>> op;
  return &op;
}

}  // namespace seresnet
