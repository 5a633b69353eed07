// CPU kernel of SqueezeExcitation. Three passes over ORT's intra-op thread pool:
//   1. pool:  mean over H*W for every (n, c)              -> pooled [N, C]
//   2. fc1:   relu(w1 · pooled[n] + b1) for every (n, r)   -> hidden [N, Cr]
//   3. scale: gate = sigmoid(w2[c] · hidden[n] + b2[c]), then y = x * gate (+ residual)(relu)
//             for every (n, c); the gate is computed where it is used.
// Every inner loop runs over contiguous memory, so the compiler vectorises it; the hot loops are
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include "se_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "se_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef SE_MULTIVERSION
#define SE_MULTIVERSION
#endif

namespace seresnet {
namespace {

// Work per parallel task, in floats touched: large enough to amortise scheduling, small
// enough to spread a single image over the pool.
constexpr int64_t kGrainFloats = 16384;

SE_MULTIVERSION float Sum(const float* __restrict p, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += p[i];
  return acc;
}

SE_MULTIVERSION float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One loop per (residual, relu) combination keeps each one branch-free and vectorisable.
SE_MULTIVERSION void Scale(const float* __restrict x, const float* __restrict residual,
                           float* __restrict y, int64_t n, float gate, bool relu) {
  if (residual != nullptr && relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * gate + residual[i];
      y[i] = v > 0.0f ? v : 0.0f;
    }
  } else if (residual != nullptr) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * gate + residual[i];
  } else if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * gate;
      y[i] = v > 0.0f ? v : 0.0f;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * gate;
  }
}

// One call's tensors plus its scratch and the split of the pass being run.
struct CpuCall {
  const SeTensors* t = nullptr;
  bool relu = false;
  float* pooled = nullptr;  // [N, C]
  float* hidden = nullptr;  // [N, Cr]
  int64_t grain = 1;        // items per task of the pass being run
  int64_t items = 0;
};

void PoolItem(const CpuCall& call, int64_t plane) {
  const int64_t hw = call.t->dims.hw;
  call.pooled[plane] = Sum(call.t->x + plane * hw, hw) / static_cast<float>(hw);
}

void Fc1Item(const CpuCall& call, int64_t item) {
  const SeTensors& t = *call.t;
  const int64_t c = t.dims.c;
  const int64_t n = item / t.dims.cr;
  const int64_t r = item % t.dims.cr;
  const float v = Dot(t.w1 + r * c, call.pooled + n * c, c) + t.b1[r];
  call.hidden[item] = v > 0.0f ? v : 0.0f;
}

void GateScaleItem(const CpuCall& call, int64_t plane) {
  const SeTensors& t = *call.t;
  const int64_t cr = t.dims.cr;
  const int64_t hw = t.dims.hw;
  const int64_t n = plane / t.dims.c;
  const int64_t ch = plane % t.dims.c;
  const float logit = Dot(t.w2 + ch * cr, call.hidden + n * cr, cr) + t.b2[ch];
  const float gate = 1.0f / (1.0f + std::exp(-logit));
  const int64_t offset = plane * hw;
  Scale(t.x + offset, t.residual ? t.residual + offset : nullptr, t.y + offset, hw, gate,
        call.relu);
}

// A task of the thread pool: items [task * grain, (task + 1) * grain).
template <void (*Item)(const CpuCall&, int64_t)>
void RangeTask(void* data, size_t task) {
  const auto& call = *static_cast<const CpuCall*>(data);
  const int64_t begin = static_cast<int64_t>(task) * call.grain;
  const int64_t end = std::min(begin + call.grain, call.items);
  for (int64_t item = begin; item < end; ++item) Item(call, item);
}

// Splits `items` units of `cost` floats each into tasks of about kGrainFloats and runs them.
template <void (*Item)(const CpuCall&, int64_t)>
void RunParallel(const Ort::KernelContext& ctx, CpuCall& call, int64_t items, int64_t cost) {
  if (items <= 0) return;
  call.items = items;
  call.grain = std::clamp<int64_t>(kGrainFloats / std::max<int64_t>(cost, 1), 1, items);
  const int64_t tasks = (items + call.grain - 1) / call.grain;
  if (tasks == 1) {
    RangeTask<Item>(&call, 0);  // not worth a trip through the pool
    return;
  }
  ctx.ParallelFor(&RangeTask<Item>, static_cast<size_t>(tasks), 0, &call);
}

class CpuKernel : public SeKernelBase<CpuKernel> {
 public:
  static constexpr const char* kProvider = "CPUExecutionProvider";
  using SeKernelBase::SeKernelBase;

  void Run(const Ort::KernelContext& ctx, const SeTensors& t) const {
    const SeDims& d = t.dims;
    std::vector<float> scratch(static_cast<size_t>(d.n * (d.c + d.cr)));
    CpuCall call;
    call.t = &t;
    call.relu = relu_;
    call.pooled = scratch.data();
    call.hidden = scratch.data() + d.n * d.c;
    RunParallel<PoolItem>(ctx, call, d.n * d.c, d.hw);
    RunParallel<Fc1Item>(ctx, call, d.n * d.cr, d.c);
    RunParallel<GateScaleItem>(ctx, call, d.n * d.c, d.hw * (t.residual ? 3 : 2) + d.cr);
  }
};

}  // namespace

const OrtCustomOp* CpuSqueezeExcitationOp() {
  static const SeOp<CpuKernel> op;
  return &op;
}

}  // namespace seresnet
