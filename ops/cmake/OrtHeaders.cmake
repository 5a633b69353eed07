# Locate ONNX Runtime C/C++ headers no newer than the oldest runtime we support (API 21 = 1.21).
# Order: ORT_INCLUDE_DIR (CMake variable or environment) -> system headers (a Debian trixie
# image with libonnxruntime-dev) -> headers cached by an earlier build -> fetched from Debian
# trixie's libonnxruntime-dev with a private apt configuration (fetch_ort_headers.py).
# Sets ORT_HEADERS_DIR and ORT_HEADERS_API_VERSION.

set(SERESNET_ORT_API_VERSION 21 CACHE STRING
    "ORT_API_VERSION the headers must declare (newer headers would not load in older runtimes)")

function(_seresnet_ort_api_version dir out_var)
  set(version "")
  if(EXISTS "${dir}/onnxruntime_c_api.h")
    file(STRINGS "${dir}/onnxruntime_c_api.h" line REGEX "^#define ORT_API_VERSION [0-9]+")
    string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*" "\\1" version "${line}")
  endif()
  set(${out_var} "${version}" PARENT_SCOPE)
endfunction()

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

set(ORT_HEADERS_DIR "")
if(ORT_INCLUDE_DIR)
  # An explicit choice is honoured; a newer API only narrows the runtimes the library loads in.
  if(EXISTS "${ORT_INCLUDE_DIR}/onnxruntime/onnxruntime_cxx_api.h")
    set(ORT_INCLUDE_DIR "${ORT_INCLUDE_DIR}/onnxruntime")
  endif()
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} holds no onnxruntime_cxx_api.h")
  endif()
  set(ORT_HEADERS_DIR "${ORT_INCLUDE_DIR}")
  _seresnet_ort_api_version("${ORT_HEADERS_DIR}" ORT_HEADERS_API_VERSION)
  if(ORT_HEADERS_API_VERSION GREATER SERESNET_ORT_API_VERSION)
    message(WARNING "ORT headers in ${ORT_HEADERS_DIR} declare API ${ORT_HEADERS_API_VERSION}: "
                    "the library will not load in onnxruntime older than 1.${ORT_HEADERS_API_VERSION}")
  endif()
else()
  find_path(_seresnet_system_ort onnxruntime_cxx_api.h
            PATH_SUFFIXES onnxruntime onnxruntime/core/session NO_CACHE)
  if(_seresnet_system_ort)
    _seresnet_ort_api_version("${_seresnet_system_ort}" _system_api)
    if(_system_api AND NOT _system_api GREATER SERESNET_ORT_API_VERSION)
      set(ORT_HEADERS_DIR "${_seresnet_system_ort}")
      set(ORT_HEADERS_API_VERSION "${_system_api}")
    else()
      message(STATUS "Ignoring system ORT headers in ${_seresnet_system_ort} "
                     "(API ${_system_api} > ${SERESNET_ORT_API_VERSION})")
    endif()
  endif()
endif()

if(NOT ORT_HEADERS_DIR)
  # Outside the repository, so that clean clones and rebuilds reuse one download.
  if(DEFINED ENV{SERESNET_CACHE_DIR})
    set(_cache_root "$ENV{SERESNET_CACHE_DIR}")
  elseif(DEFINED ENV{XDG_CACHE_HOME})
    set(_cache_root "$ENV{XDG_CACHE_HOME}/seresnet-serve")
  elseif(DEFINED ENV{HOME})
    set(_cache_root "$ENV{HOME}/.cache/seresnet-serve")
  else()
    set(_cache_root "${CMAKE_BINARY_DIR}/_deps")
  endif()
  set(_cache_dir "${_cache_root}/onnxruntime-headers")
  file(MAKE_DIRECTORY "${_cache_dir}" RESULT _mkdir_error)
  if(_mkdir_error)
    set(_cache_dir "${CMAKE_BINARY_DIR}/_deps/onnxruntime-headers")
  endif()
  if(DEFINED Python_EXECUTABLE)
    set(_python "${Python_EXECUTABLE}")
  else()
    find_package(Python3 REQUIRED COMPONENTS Interpreter)
    set(_python "${Python3_EXECUTABLE}")
  endif()
  execute_process(
    COMMAND "${_python}" "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.py"
            --cache-dir "${_cache_dir}" --api-version "${SERESNET_ORT_API_VERSION}"
    OUTPUT_VARIABLE _fetched ERROR_VARIABLE _fetch_log RESULT_VARIABLE _fetch_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _fetch_rc EQUAL 0)
    message(FATAL_ERROR "Could not obtain ONNX Runtime headers:\n${_fetch_log}")
  endif()
  string(STRIP "${_fetch_log}" _fetch_log)
  message(STATUS "${_fetch_log}")
  set(ORT_HEADERS_DIR "${_fetched}")
  _seresnet_ort_api_version("${ORT_HEADERS_DIR}" ORT_HEADERS_API_VERSION)
endif()

message(STATUS "ONNX Runtime headers: ${ORT_HEADERS_DIR} (ORT_API_VERSION ${ORT_HEADERS_API_VERSION})")
