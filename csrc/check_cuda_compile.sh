#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ with nvcc for sm_80 and sm_90 (objects go to a temp
# dir and are discarded). Needs nvcc only: the .cu files include no torch headers, so this
# runs on machines without a GPU or a CUDA build of torch. Exits non-zero on the first failure.
#
#   csrc/check_cuda_compile.sh            # all csrc/*.cu, sm_80 + sm_90
#   ARCHS="90" csrc/check_cuda_compile.sh # other archs
#   NVCC=/path/to/nvcc csrc/check_cuda_compile.sh
#   CHECK_BINDING=0 csrc/check_cuda_compile.sh   # skip the binding check below
#
# Then, where a python with torch is on PATH, it also syntax-checks the torch CUDA binding
# (flora_cuda_binding.cpp) with the host compiler against torch's headers and the CUDA toolkit
# headers; a CPU-only torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h, which is
# stubbed (empty) in the temp dir for this check only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"
  else echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 2; fi
fi
archs="${ARCHS:-80 90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
sources=("$here"/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files in $here" >&2; exit 1; fi
echo "check_cuda_compile: $("$nvcc" --version | tail -n 1)"
for src in "${sources[@]}"; do
  for arch in $archs; do
    start=$(date +%s)
    if ! "$nvcc" -std=c++20 -O3 --expt-relaxed-constexpr -Werror all-warnings \
        -gencode "arch=compute_${arch},code=sm_${arch}" -I"$here" -c "$src" -o "$tmp/$(basename "$src").sm_${arch}.o"; then
      echo "check_cuda_compile: FAILED $(basename "$src") for sm_${arch}" >&2
      exit 1
    fi
    echo "check_cuda_compile: ok $(basename "$src") sm_${arch} ($(( $(date +%s) - start ))s)"
  done
done
echo "check_cuda_compile: all ${#sources[@]} source(s) compiled for: $archs"

if [ "${CHECK_BINDING:-1}" != "0" ] && [ -f "$here/flora_cuda_binding.cpp" ]; then
  py="${PYTHON:-python}"
  if inc="$("$py" -c 'import os, sysconfig, torch; print(os.path.dirname(torch.__file__) + "/include"); print(sysconfig.get_paths()["include"])' 2>/dev/null)"; then
    torch_inc="$(echo "$inc" | sed -n 1p)"; py_inc="$(echo "$inc" | sed -n 2p)"
    cuda_inc="$(cd "$(dirname "$(readlink -f "$(command -v "$nvcc")")")/.." && pwd)/include"
    [ -f "$cuda_inc/cuda_runtime_api.h" ] || cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
    mkdir -p "$tmp/stub/c10/cuda/impl"
    [ -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    start=$(date +%s)
    if ! "${CXX:-c++}" -fsyntax-only -std=c++20 -w -I"$tmp/stub" -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" \
        -I"$cuda_inc" -I"$py_inc" -I"$here" "$here/flora_cuda_binding.cpp"; then
      echo "check_cuda_compile: FAILED syntax check of flora_cuda_binding.cpp" >&2
      exit 1
    fi
    echo "check_cuda_compile: ok flora_cuda_binding.cpp syntax ($(( $(date +%s) - start ))s)"
  else
    echo "check_cuda_compile: no python with torch: skipped the binding syntax check"
  fi
fi
