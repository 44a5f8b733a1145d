#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90 (nvcc -c, no link, no GPU needed) and
# print ptxas's register / spill report per kernel. Exits non-zero on any compile error.
#
# Works with the CPU torch wheel: only torch's headers are used, and
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the cmake-generated c10/cuda config header.
# The flags mirror what torch.utils.cpp_extension.CUDAExtension passes (setup.py), including its
# -D__CUDA_NO_HALF_OPERATORS__ family, so code that compiles here compiles there.
#
# Usage: .ci/compile_cuda.sh [file.cu ...]
# Environment: NVCC (path to nvcc), PYTHON (default python3), MAX_JOBS (parallel files, default 1),
# CUDA_CHECK_ARCHS (default "80 90"), KEEP_LOGS=dir (keep the full ptxas logs there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  else
    echo "compile_cuda.sh: nvcc not found (looked at /usr/local/cuda/bin/nvcc and on PATH);" \
         "install the CUDA toolkit or set NVCC=/path/to/nvcc" >&2
    exit 1
  fi
fi
# a demangler for the kernel names of the report (cu++filt ships with some toolkits, c++filt with binutils)
if [[ ! -x "$NVCC" ]]; then
  echo "compile_cuda.sh: NVCC=$NVCC is not an executable nvcc" >&2
  exit 1
fi
CUFILT="$(dirname "$NVCC")/cu++filt"
[[ -x "$CUFILT" ]] || CUFILT="$(command -v c++filt || true)"

# Arguments, if any, name the .cu files to check (default: all of csrc/cuda/*.cu).
if [[ $# -gt 0 ]]; then
  SOURCES=("$@")
else
  mapfile -t SOURCES < <(ls "$ROOT"/csrc/cuda/*.cu 2>/dev/null | sort)
fi
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda.sh: no csrc/cuda/*.cu files; nothing to check"
  exit 0
fi

# torch and Python include dirs, and torch's C++ ABI flag
mapfile -t INCS < <("$PYTHON" - <<'EOF'
import sysconfig
import torch
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch.compiled_with_cxx11_abi()))
EOF
)

GENCODE=()
for a in ${CUDA_CHECK_ARCHS:-80 90}; do
  GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}")
done

FLAGS=(-c -std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC
       -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DPYFORMER_WITH_CUDA
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       "${GENCODE[@]}" -Xptxas -v -I"$ROOT/csrc" "${INCS[@]}")

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "compile_cuda.sh: $("$NVCC" --version | tail -1)"
echo "compile_cuda.sh: archs ${CUDA_CHECK_ARCHS:-80 90}; ${#SOURCES[@]} files; MAX_JOBS=${MAX_JOBS:-1}"

compile_one() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  local start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$WORK/$name.o" >"$WORK/$name.log" 2>&1; then
    echo "ok $((SECONDS - start))" >"$WORK/$name.status"
  else
    echo "FAIL $((SECONDS - start))" >"$WORK/$name.status"
  fi
}

jobs_max="${MAX_JOBS:-1}"
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  while [[ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]]; do wait -n || true; done
done
wait

status=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  read -r verdict secs <"$WORK/$name.status"
  echo
  echo "=== $name.cu: $verdict (${secs}s)"
  if [[ "$verdict" != ok ]]; then
    status=1
    # the compiler's errors, without the ptxas chatter
    grep -v '^ptxas info' "$WORK/$name.log" | grep -v 'bytes stack frame' | head -80 || true
    continue
  fi
  # Register / spill table: one line per (kernel, arch).
  "$PYTHON" - "$WORK/$name.log" "$CUFILT" <<'EOF'
import re, subprocess, sys
log, cufilt = sys.argv[1], sys.argv[2]
rows, cur, arch, spill = [], None, None, None
for line in open(log, errors="replace"):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        cur, arch, spill = m.group(1), m.group(2), None
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and cur:
        spill = (int(m.group(1)), int(m.group(2)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and cur:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((cur, arch, int(m.group(1)), spill or (0, 0), int(smem.group(1)) if smem else 0))
        cur = None
names = {}
if rows and cufilt:
    mangled = sorted({r[0] for r in rows})
    out = subprocess.run([cufilt], input="\n".join(mangled), capture_output=True, text=True).stdout
    names = dict(zip(mangled, out.splitlines()))
def short(n):
    n = names.get(n, n)
    n = re.sub(r"pyformer::cuda::\(anonymous namespace\)::", "", n)
    n = re.sub(r"c10::(BFloat16|Half)", r"\1", n)
    n = re.sub(r"\(.*\)$", "", n)       # drop the parameter list
    return n
spills = [r for r in rows if r[3] != (0, 0)]
print(f"  {len(rows)} kernel builds; {len(spills)} with spills")
for n, a, regs, (st, ld), sm in rows:
    flag = "  SPILL" if (st, ld) != (0, 0) else ""
    print(f"  {a} regs={regs:3d} spill={st}/{ld} smem={sm:5d}  {short(n)}{flag}")
EOF
done

echo
if [[ $status -eq 0 ]]; then
  echo "compile_cuda.sh: all ${#SOURCES[@]} CUDA sources compiled for archs ${CUDA_CHECK_ARCHS:-80 90}"
else
  echo "compile_cuda.sh: FAILED (see the errors above)" >&2
fi
if [[ -n "${KEEP_LOGS:-}" ]]; then mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$KEEP_LOGS"/; fi
exit $status
