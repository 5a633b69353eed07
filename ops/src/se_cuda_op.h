#pragma once

struct OrtCustomOp;

namespace seresnet {

// The CUDAExecutionProvider kernel of SqueezeExcitation (lives for the whole process).
const OrtCustomOp* CudaSqueezeExcitationOp();
// The same for float16 tensors (half storage, float arithmetic).
const OrtCustomOp* CudaSqueezeExcitationFloat16Op();

}  // namespace seresnet
