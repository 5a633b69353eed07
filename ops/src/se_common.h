// Shared pieces of the SqueezeExcitation custom op: the contract (names, inputs, attribute),
// input validation, shape inference and the base class both execution-provider ops derive from.
//
//   y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)   per (n, c)
//   y += residual        when the optional 6th input is present
//   y = max(y, 0)        when attribute relu == 1
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace seresnet {

inline constexpr const char* kOpType = "SqueezeExcitation";
inline constexpr const char* kDomain = "ai.seresnet";
inline constexpr int kOpsetVersion = 1;

enum Input : size_t { kX = 0, kW1, kB1, kW2, kB2, kResidual, kInputCount };

// Sizes of one call, checked against each other.
struct SeDims {
  int64_t n = 0;   // batch
  int64_t c = 0;   // channels
  int64_t cr = 0;  // squeezed channels (C / reduction)
  int64_t hw = 0;  // spatial size H * W
  std::vector<int64_t> x_shape;
  bool has_residual = false;

  int64_t elements() const { return n * c * hw; }
};

// Reads the inputs' shapes and throws Ort::Exception (ORT_INVALID_ARGUMENT) naming the node and
// the offending input when they do not fit together.
SeDims ValidateInputs(const Ort::KernelContext& ctx, const std::string& node_name);

// One call's validated sizes, its input data and its (allocated) output.
struct SeTensors {
  SeDims dims;
  const float* x = nullptr;
  const float* w1 = nullptr;
  const float* b1 = nullptr;
  const float* w2 = nullptr;
  const float* b2 = nullptr;
  const float* residual = nullptr;  // null when the optional input is absent
  float* y = nullptr;
};

SeTensors BindTensors(const Ort::KernelContext& ctx, const std::string& node_name);

// The `relu` attribute (default 0); throws unless it is 0 or 1.
bool ReadReluAttribute(const OrtKernelInfo* info, const std::string& node_name);

std::string NodeName(const OrtKernelInfo* info);

// Output 0 gets input 0's type and shape. Copying the whole type-and-shape info through the C API
// keeps symbolic dims (the batch axis); Ort::ShapeInferContext::SetOutputShape with 1.21 headers
// loses them on newer runtimes.
OrtStatusPtr ORT_API_CALL CopyInputTypeAndShape(const OrtCustomOp* op,
                                                OrtShapeInferContext* ctx) noexcept;

// Runs `body`, turning any exception into an OrtStatus so none crosses the C boundary.
template <typename Body>
OrtStatusPtr StatusFrom(Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "SqueezeExcitation: unknown error");
  }
}

// What every kernel does around its arithmetic: read the attribute once, validate and bind the
// tensors per call, skip empty outputs, and report failures as an OrtStatus. `Derived` provides
// `static constexpr const char* kProvider` and `void Run(const Ort::KernelContext&, const
// SeTensors&)`.
template <typename Derived>
class SeKernelBase {
 public:
  explicit SeKernelBase(const OrtKernelInfo* info)
      : node_name_(NodeName(info)), relu_(ReadReluAttribute(info, node_name_)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return StatusFrom([&] {
      const Ort::KernelContext ctx(context);
      const SeTensors tensors = BindTensors(ctx, node_name_);
      if (tensors.dims.elements() > 0) static_cast<Derived*>(this)->Run(ctx, tensors);
    });
  }

 protected:
  std::string node_name_;
  bool relu_;
};

// The op as ONNX Runtime sees it, for the execution provider `TKernel::kProvider`: name,
// signature (6th input optional), opset range and shape inference.
template <typename TKernel>
struct SeOp : Ort::CustomOpBase<SeOp<TKernel>, TKernel, /*WithStatus=*/true> {
  SeOp() {
    this->start_ver_ = kOpsetVersion;
    this->end_ver_ = kOpsetVersion;
    OrtCustomOp::InferOutputShapeFn = &CopyInputTypeAndShape;
  }

  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return TKernel::kProvider; }

  size_t GetInputTypeCount() const { return kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == kResidual ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return StatusFrom([&] { *kernel = new TKernel(info); });
  }
};

}  // namespace seresnet
