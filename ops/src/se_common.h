// Shared pieces of the SqueezeExcitation custom op: the contract (names, inputs, attribute),
// input validation, shape inference and the base class both execution-provider ops derive from.
//
//   y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)   per (n, c)
//   y += residual        when the optional 6th input is present
//   y = max(y, 0)        when attribute relu == 1
// x, residual and y are [N,C,H,W], or [N,H,W,C] when attribute channels_last == 1 (so that the op
// can sit inside a channels-last graph without layout transposes around it). Every input and the
// output share one element type: float, or float16 (a second registration of the same op).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
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
  bool channels_last = false;  // x is [N,H,W,C]

  int64_t elements() const { return n * c * hw; }
};

// Reads the inputs' shapes and throws Ort::Exception (ORT_INVALID_ARGUMENT) naming the node and
// the offending input when they do not fit together.
SeDims ValidateInputs(const Ort::KernelContext& ctx, const std::string& node_name,
                      bool channels_last);

// One call's validated sizes, its input data and its (allocated) output; T is float or
// Ort::Float16_t.
template <typename T>
struct SeTensorsOf {
  SeDims dims;
  const T* x = nullptr;
  const T* w1 = nullptr;
  const T* b1 = nullptr;
  const T* w2 = nullptr;
  const T* b2 = nullptr;
  const T* residual = nullptr;  // null when the optional input is absent
  T* y = nullptr;
};
using SeTensors = SeTensorsOf<float>;

template <typename T>
SeTensorsOf<T> BindTensors(const Ort::KernelContext& ctx, const std::string& node_name,
                           bool channels_last) {
  SeTensorsOf<T> t;
  t.dims = ValidateInputs(ctx, node_name, channels_last);
  t.y = ctx.GetOutput(0, t.dims.x_shape).template GetTensorMutableData<T>();
  t.x = ctx.GetInput(kX).template GetTensorData<T>();
  t.w1 = ctx.GetInput(kW1).template GetTensorData<T>();
  t.b1 = ctx.GetInput(kB1).template GetTensorData<T>();
  t.w2 = ctx.GetInput(kW2).template GetTensorData<T>();
  t.b2 = ctx.GetInput(kB2).template GetTensorData<T>();
  if (t.dims.has_residual) t.residual = ctx.GetInput(kResidual).template GetTensorData<T>();
  return t;
}

// A 0/1 attribute (`relu`, `channels_last`; default 0); throws unless it is 0 or 1.
bool ReadFlagAttribute(const OrtKernelInfo* info, const char* name, const std::string& node_name);

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

// ONNX element type of the kernels' T.
template <typename T>
constexpr ONNXTensorElementDataType ElementType() {
  return std::is_same_v<T, Ort::Float16_t> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                                           : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

// What every kernel does around its arithmetic: read the attributes once, validate and bind the
// tensors per call, skip empty outputs, and report failures as an OrtStatus. `Derived` provides
// `static constexpr const char* kProvider`, `using Element = float or Ort::Float16_t` and
// `void Run(const Ort::KernelContext&, const SeTensorsOf<Element>&)`.
template <typename Derived>
class SeKernelBase {
 public:
  explicit SeKernelBase(const OrtKernelInfo* info)
      : node_name_(NodeName(info)),
        relu_(ReadFlagAttribute(info, "relu", node_name_)),
        channels_last_(ReadFlagAttribute(info, "channels_last", node_name_)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return StatusFrom([&] {
      const Ort::KernelContext ctx(context);
      using T = typename Derived::Element;
      const SeTensorsOf<T> tensors = BindTensors<T>(ctx, node_name_, channels_last_);
      if (tensors.dims.elements() > 0) static_cast<Derived*>(this)->Run(ctx, tensors);
    });
  }

 protected:
  std::string node_name_;
  bool relu_;
  bool channels_last_;
};

// The op as ONNX Runtime sees it, for the execution provider `TKernel::kProvider` and element
// type `TKernel::Element`: name, signature (6th input optional), opset range and shape
// inference. Registering the float and the float16 kernel as two ops of the same name and
// domain gives one op whose type constraint covers both.
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
    return ElementType<typename TKernel::Element>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == kResidual ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ElementType<typename TKernel::Element>();
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return StatusFrom([&] { *kernel = new TKernel(info); });
  }
};

}  // namespace seresnet
