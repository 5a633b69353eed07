#pragma once

struct OrtCustomOp;

namespace seresnet {

// The CPUExecutionProvider kernel of SqueezeExcitation (lives for the whole process).
const OrtCustomOp* CpuSqueezeExcitationOp();

}  // namespace seresnet
