// Entry points of libseresnet_ops: RegisterCustomOps (called by ONNX Runtime's
// SessionOptions.register_custom_ops_library) and plain C queries that Python can call through
// ctypes without ONNX Runtime.
#include <mutex>
#include <string>

#include "se_common.h"
#include "se_cpu.h"
#if SERESNET_WITH_CUDA
#include "se_cuda_op.h"
#endif

#ifndef SERESNET_BUILD_INFO
#define SERESNET_BUILD_INFO "unknown"
#endif

#define SE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// One domain for the process: sessions keep pointers to it, so it must never be destroyed.
Ort::CustomOpDomain& Domain() {
  static Ort::CustomOpDomain* domain = [] {
    auto* created = new Ort::CustomOpDomain(seresnet::kDomain);
    created->Add(seresnet::CpuSqueezeExcitationOp());
    created->Add(seresnet::CpuSqueezeExcitationFloat16Op());
#if SERESNET_WITH_CUDA
    created->Add(seresnet::CudaSqueezeExcitationOp());
    created->Add(seresnet::CudaSqueezeExcitationFloat16Op());
#endif
    return created;
  }();
  return *domain;
}

}  // namespace

SE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                    const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // This runtime predates our headers; its oldest API table can still report why.
    const std::string message =
        std::string("libseresnet_ops was built against ONNX Runtime API ") +
        std::to_string(ORT_API_VERSION) + " (onnxruntime 1." + std::to_string(ORT_API_VERSION) +
        ") but this process runs onnxruntime " + api_base->GetVersionString() +
        "; install onnxruntime-gpu >= 1." + std::to_string(ORT_API_VERSION);
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  Ort::InitApi(api);
  return seresnet::StatusFrom([&] { Ort::UnownedSessionOptions(options).Add(Domain()); });
}

// Comma-separated execution providers this build has kernels for.
SE_EXPORT const char* SeresnetOpsProviders() {
#if SERESNET_WITH_CUDA
  return "CPUExecutionProvider,CUDAExecutionProvider";
#else
  return "CPUExecutionProvider";
#endif
}

// Comma-separated `provider/element type` pairs this build has kernels for. Every kernel takes
// the channels_last attribute; a library without this function has float NCHW kernels only.
SE_EXPORT const char* SeresnetOpsKernels() {
#if SERESNET_WITH_CUDA
  return "CPUExecutionProvider/float32,CPUExecutionProvider/float16,"
         "CUDAExecutionProvider/float32,CUDAExecutionProvider/float16";
#else
  return "CPUExecutionProvider/float32,CPUExecutionProvider/float16";
#endif
}

// ORT_API_VERSION of the headers the library was compiled against (= oldest runtime minor).
SE_EXPORT int SeresnetOpsOrtApiVersion() { return ORT_API_VERSION; }

// `key=value` pairs separated by ", ": ORT API, CUDA version and architectures, compiler.
SE_EXPORT const char* SeresnetOpsBuildInfo() { return SERESNET_BUILD_INFO; }
