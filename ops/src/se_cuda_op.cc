// CUDAExecutionProvider kernel of SqueezeExcitation: validates, takes scratch memory from ORT's
// allocator on the kernel's compute stream, and enqueues the kernels on that stream.
#include "se_cuda_op.h"

#include <string>

#include "se_common.h"
#include "se_cuda_kernels.h"

namespace seresnet {
namespace {

class CudaKernel : public SeKernelBase<CudaKernel> {
 public:
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  using SeKernelBase::SeKernelBase;

  void Run(const Ort::KernelContext& ctx, const SeTensors& t) const {
    const SeDims& d = t.dims;
    cuda::SeLaunch launch;
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
    launch.relu = relu_;

    // Scratch from the EP's arena, tied to this kernel's stream, so it is reused only after
    // the work queued here.
    const OrtApi& api = Ort::GetApi();
    const OrtMemoryInfo* memory = ctx.GetInput(kX).GetTensorMemoryInfo();
    OrtAllocator* allocator = ctx.GetAllocator(*memory);
    void* scratch = nullptr;
    if (OrtStatus* status = api.KernelContext_GetScratchBuffer(
            ctx.GetOrtKernelContext(), memory, cuda::ScratchBytes(d.n, d.c, d.cr), &scratch)) {
      api.ReleaseAllocator(allocator);
      Ort::ThrowOnError(status);
    }
    launch.scratch = static_cast<float*>(scratch);
    const char* error = cuda::LaunchSqueezeExcitation(launch, ctx.GetGPUComputeStream());
    allocator->Free(allocator, scratch);
    api.ReleaseAllocator(allocator);
    if (error != nullptr) {
      throw Ort::Exception(std::string(kOpType) + " node '" + node_name_ +
                               "': CUDA launch failed: " + error,
                           ORT_EP_FAIL);
    }
  }
};

}  // namespace

const OrtCustomOp* CudaSqueezeExcitationOp() {
  static const SeOp<CudaKernel> op;
  return &op;
}

}  // namespace seresnet
