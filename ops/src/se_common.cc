#include "se_common.h"

#include <sstream>

namespace seresnet {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? "," : "") << shape[i];
  out << ']';
  return out.str();
}

[[noreturn]] void Fail(const std::string& node_name, const std::string& message) {
  throw Ort::Exception(std::string(kOpType) + " node '" + node_name + "': " + message,
                       ORT_INVALID_ARGUMENT);
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value) {
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

void Expect(const std::string& node_name, const char* input, const std::vector<int64_t>& shape,
            const std::vector<int64_t>& expected, const char* meaning) {
  if (shape != expected) {
    Fail(node_name, std::string("input ") + input + " has shape " + ShapeText(shape) +
                        ", expected " + ShapeText(expected) + " " + meaning);
  }
}

}  // namespace

SeDims ValidateInputs(const Ort::KernelContext& ctx, const std::string& node_name,
                      bool channels_last) {
  SeDims dims;
  dims.channels_last = channels_last;
  dims.x_shape = ShapeOf(ctx.GetInput(kX));
  const auto& x = dims.x_shape;
  if (x.size() != 4) {
    Fail(node_name, std::string("input x must be 4-D ") +
                        (channels_last ? "[N,H,W,C]" : "[N,C,H,W]") + ", got " + ShapeText(x));
  }
  const std::vector<int64_t> w1 = ShapeOf(ctx.GetInput(kW1));
  if (w1.size() != 2) Fail(node_name, "input w1 must be 2-D [Cr,C], got " + ShapeText(w1));
  dims.n = x[0];
  dims.c = channels_last ? x[3] : x[1];
  dims.hw = channels_last ? x[1] * x[2] : x[2] * x[3];
  dims.cr = w1[0];
  Expect(node_name, "w1", w1, {dims.cr, dims.c}, "([Cr,C], C from x)");
  Expect(node_name, "b1", ShapeOf(ctx.GetInput(kB1)), {dims.cr}, "([Cr])");
  Expect(node_name, "w2", ShapeOf(ctx.GetInput(kW2)), {dims.c, dims.cr}, "([C,Cr])");
  Expect(node_name, "b2", ShapeOf(ctx.GetInput(kB2)), {dims.c}, "([C])");
  if (ctx.GetInputCount() > kResidual) {
    const Ort::ConstValue residual = ctx.GetInput(kResidual);
    // An optional input given as "" is present in the count but null.
    if (residual != nullptr) {
      dims.has_residual = true;
      Expect(node_name, "residual", ShapeOf(residual), x, "(the shape of x)");
    }
  }
  return dims;
}

std::string NodeName(const OrtKernelInfo* info) {
  try {
    return Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
    return "?";
  }
}

bool ReadFlagAttribute(const OrtKernelInfo* info, const char* name,
                       const std::string& node_name) {
  int64_t value = 0;
  // A missing attribute means the default (0); the C API reports it as an error status.
  if (OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value)) {
    Ort::GetApi().ReleaseStatus(status);
    value = 0;
  }
  if (value != 0 && value != 1) {
    Fail(node_name, std::string("attribute ") + name + " must be 0 or 1, got " +
                        std::to_string(value));
  }
  return value == 1;
}

OrtStatusPtr ORT_API_CALL CopyInputTypeAndShape(const OrtCustomOp*,
                                                OrtShapeInferContext* ctx) noexcept {
  const OrtApi& api = Ort::GetApi();
  // The info belongs to the context: it must not be released here.
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, kX, &info)) {
    return status;
  }
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

}  // namespace seresnet
