#pragma once

struct OrtCustomOp;

namespace seresnet {

// The CUDAExecutionProvider kernel of SqueezeExcitation (lives for the whole process).
const OrtCustomOp* CudaSqueezeExcitationOp();

}  // namespace seresnet
