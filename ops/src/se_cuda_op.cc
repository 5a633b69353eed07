// CUDAExecutionProvider kernels of SqueezeExcitation (float and float16): validate, take scratch
// memory from ORT's allocator on the kernel's compute stream, and enqueue the kernels on that
// stream. Nothing here synchronises, copies to the host or allocates outside ORT, which is what
// capturing the session into a CUDA graph (enable_cuda_graph) needs: the scratch buffer comes
// from ORT's arena exactly as ORT's own CUDA kernels take theirs (GetScratchBuffer), so its
// address is as stable across replays as every other intermediate of the captured run.
#include "se_cuda_op.h"

#include <string>
#include <type_traits>

#include "se_common.h"
#include "se_cuda_kernels.h"

namespace seresnet {
namespace {

template <typename T>
class CudaKernel : public SeKernelBase<CudaKernel<T>> {
 public:
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  using Element = T;
  using SeKernelBase<CudaKernel<T>>::SeKernelBase;

  void Run(const Ort::KernelContext& ctx, const SeTensorsOf<T>& t) const {
    const SeDims& d = t.dims;
    cuda::SeLaunch launch;
    launch.dtype = std::is_same_v<T, float> ? cuda::DType::kFloat32 : cuda::DType::kFloat16;
    launch.channels_last = d.channels_last;
    launch.x = t.x;
    launch.w1 = t.w1;
    launch.b1 = t.b1;
    launch.w2 = t.w2;
    launch.b2 = t.b2;
    launch.residual = t.residual;
    launch.y = t.y;
    launch.n = d.n;
    launch.c = d.c;
    launch.cr = d.cr;
    launch.hw = d.hw;
    launch.relu = this->relu_;

    // Scratch from the EP's arena, tied to this kernel's stream, so it is reused only after
    // the work queued here.
    const OrtApi& api = Ort::GetApi();
    const OrtMemoryInfo* memory = ctx.GetInput(kX).GetTensorMemoryInfo();
    OrtAllocator* allocator = ctx.GetAllocator(*memory);
    void* scratch = nullptr;
    if (OrtStatus* status = api.KernelContext_GetScratchBuffer(
            ctx.GetOrtKernelContext(), memory, cuda::ScratchBytes(launch), &scratch)) {
      api.ReleaseAllocator(allocator);
      Ort::ThrowOnError(status);
    }
    launch.scratch = static_cast<float*>(scratch);
    const char* error = cuda::LaunchSqueezeExcitation(launch, ctx.GetGPUComputeStream());
    allocator->Free(allocator, scratch);
    api.ReleaseAllocator(allocator);
    if (error != nullptr) {
      throw Ort::Exception(std::string(kOpType) + " node '" + this->node_name_ +
                               "': CUDA launch failed: " + error,
                           ORT_EP_FAIL);
    }
  }
};

}  // namespace

const OrtCustomOp* CudaSqueezeExcitationOp() {
  static const SeOp<CudaKernel<float>> op;
  return &op;
}

const OrtCustomOp* CudaSqueezeExcitationFloat16Op() {
  static const SeOp<CudaKernel<Ort::Float16_t>> op;
  return &op;
}

}  // namespace seresnet
