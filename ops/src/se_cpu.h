#pragma once

struct OrtCustomOp;

namespace seresnet {

// The CPUExecutionProvider kernel of SqueezeExcitation (lives for the whole process).
const OrtCustomOp* CpuSqueezeExcitationOp();
// The same for float16 tensors (computes in float).
const OrtCustomOp* CpuSqueezeExcitationFloat16Op();

}  // namespace seresnet
