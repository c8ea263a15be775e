#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ with nvcc for sm_80 and sm_90 (objects go to a temp
# dir and are discarded), and check the machine code. The nvcc flags and the default archs are the
# build's own (flora_kernels/backends/ext/flags.py, also used by setup.py and the JIT build). Needs nvcc only: the .cu files include no
# torch headers, so this runs on machines without a GPU or a CUDA build of torch. Exits non-zero
# on the first failure.
#
#   csrc/check_cuda_compile.sh            # all csrc/*.cu, sm_80 + sm_90
#   ARCHS="90" csrc/check_cuda_compile.sh # other archs
#   NVCC=/path/to/nvcc csrc/check_cuda_compile.sh
#   CUOBJDUMP=/path/to/cuobjdump csrc/check_cuda_compile.sh
#   CHECK_BINDING=0 csrc/check_cuda_compile.sh   # skip the binding check below
#   SASS_DIR=dir csrc/check_cuda_compile.sh      # keep the ptxas logs and the sm_90 SASS there
#
# Per source and arch, `ptxas -v` must report no register spill and no stack frame (local memory)
# in any kernel, else the check fails. For sm_90 the SASS (cuobjdump -sass: from CUOBJDUMP, next
# to nvcc, on PATH, or the one Triton's wheel ships) must contain no subroutine call (CALL.REL:
# the 64-bit integer division and IEEE division slow paths) and no local loads/stores (LDL/STL);
# the counts of tensor-core instructions (HMMA) and 16-byte global loads/stores (LDG.E.128,
# STG.E.128) are reported. Without a cuobjdump the SASS check is skipped with a message.
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
py="${PYTHON:-python}"
command -v "$py" >/dev/null 2>&1 || py=python3
flags_py="$here/../flora_kernels/backends/ext/flags.py"
build_flags="$("$py" "$flags_py" nvcc)"  # e.g. -O3 -std=c++20 --expt-relaxed-constexpr -lineinfo
archs="${ARCHS:-$("$py" "$flags_py" archs)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
out_dir="${SASS_DIR:-$tmp}"
mkdir -p "$out_dir"

find_cuobjdump() {
  if [ -n "${CUOBJDUMP:-}" ]; then echo "$CUOBJDUMP"; return; fi
  local c
  c="$(dirname "$(readlink -f "$(command -v "$nvcc")")")/cuobjdump"
  if [ -x "$c" ]; then echo "$c"; return; fi
  if command -v cuobjdump >/dev/null 2>&1; then command -v cuobjdump; return; fi
  c="$("$py" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
  if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; fi
}
cuobjdump="$(find_cuobjdump)"

shopt -s nullglob
sources=("$here"/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files in $here" >&2; exit 1; fi
echo "check_cuda_compile: $("$nvcc" --version | tail -n 1); flags: $build_flags"
for src in "${sources[@]}"; do
  name="$(basename "$src")"
  for arch in $archs; do
    start=$(date +%s)
    obj="$tmp/$name.sm_${arch}.o" log="$out_dir/$name.sm_${arch}.ptxas.txt"
    # shellcheck disable=SC2086  # build_flags is a list of words
    if ! "$nvcc" $build_flags -Werror all-warnings -Xptxas -v \
        -gencode "arch=compute_${arch},code=sm_${arch}" -I"$here" -c "$src" -o "$obj" 2>"$log"; then
      cat "$log" >&2
      echo "check_cuda_compile: FAILED $name for sm_${arch}" >&2
      exit 1
    fi
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    regs=$(grep -o "Used [0-9]* registers" "$log" | awk '{print $2}' | sort -n | tail -n 1)
    # ptxas -v: "N bytes stack frame, N bytes spill stores, N bytes spill loads" per kernel.
    bad=$(grep -E "[1-9][0-9]* bytes (stack frame|spill stores|spill loads)|[1-9][0-9]* bytes lmem" "$log" || true)
    if [ -n "$bad" ]; then
      grep -E "Compiling entry function|[1-9][0-9]* bytes (stack frame|spill stores|spill loads)|[1-9][0-9]* bytes lmem" "$log" >&2
      echo "check_cuda_compile: FAILED $name sm_${arch}: ptxas reports register spills or local memory (above)" >&2
      exit 1
    fi
    echo "check_cuda_compile: ok $name sm_${arch}: $kernels kernels, max $regs registers, no spills, no local memory ($(( $(date +%s) - start ))s)"
    if [ "$arch" = "90" ]; then
      if [ -z "$cuobjdump" ]; then
        echo "check_cuda_compile: no cuobjdump (set CUOBJDUMP, or install triton): skipped the sm_90 SASS check"
        continue
      fi
      sass="$out_dir/$name.sm_90.sass"
      "$cuobjdump" -sass "$obj" >"$sass" 2>/dev/null
      count() { grep -c -E "$1" "$sass" || true; }
      calls=$(count 'CALL\.REL') local_ops=$(count '\b(LDL|STL)\b')
      echo "check_cuda_compile: $name sm_90 SASS: HMMA $(count 'HMMA') LDG.E.128 $(count 'LDG\.E\.128') STG.E.128 $(count 'STG\.E\.128') CALL.REL $calls LDL/STL $local_ops"
      if [ "$calls" -ne 0 ] || [ "$local_ops" -ne 0 ]; then
        awk '/Function :/ {f = $3} /CALL\.REL|[^A-Z](LDL|STL)[^A-Z]/ {print f ": " $0}' "$sass" >&2
        echo "check_cuda_compile: FAILED $name sm_90: subroutine calls or local memory in the SASS (above)" >&2
        exit 1
      fi
    fi
  done
done
echo "check_cuda_compile: all ${#sources[@]} source(s) compiled for: $archs"

if [ "${CHECK_BINDING:-1}" != "0" ] && [ -f "$here/flora_cuda_binding.cpp" ]; then
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
