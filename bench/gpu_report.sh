#!/usr/bin/env bash
# One command that verifies pyformer on a GPU machine and writes a report under $OUT.
#
#   OUT=/tmp/out bench/gpu_report.sh            # every step
#   STEPS="build test" bench/gpu_report.sh      # a subset of: build ptxas test sanitize check bench
#                                               # (default: all but ptxas, the sm_90 spill report)
#
# Meant for the device machine (Python 3.12, torch + CUDA, nvcc, ninja, pytest, click; no package
# registry): builds the package in place (pip -e, no deps, no build isolation, TORCH_CUDA_ARCH_LIST
# 9.0 unless set), runs the whole pytest suite (CUDA tests run there), runs
# `pyformer check --device cuda` and `pyformer bench --device cuda` when the CLI is installed, then
# compute-sanitizer memcheck and racecheck over bench/sanitize_driver.py, and writes:
#   $OUT/gpu_report.md   GPU, torch/CUDA versions, commit, each step's exit code and time, the test
#                        summary line, the sanitizer verdicts, the check and bench tables
#   $OUT/bench.json, $OUT/bench.png   pyformer bench's results (when it ran)
#   $OUT/logs.tar.gz     every step's full log
#   $OUT/build.tar.gz    the build folder, for a later call to carry (below)
# (at most a handful of files: the device tool returns at most 8.)
#
# It never stops at a failing step: each step's exit code is recorded and the next one runs. The
# script exits 0 when every step it ran passed, 1 otherwise. Every step's time limit is cut to
# what is left of DEADLINE (seconds from the start, default 570), so that the report is always
# written inside the device tool's 10-minute call.
#
# Steps run in this order whatever STEPS says: build, ptxas, test, check, bench, sanitize (the
# numbers first; a slow sanitizer then only shortens itself).
#
# The device machine goes back 30 s after a call, so a second call starts bare. Two calls cover
# every step without compiling twice. setup.py keeps the objects in build/ (ninja's incremental
# build); the build step leaves that folder in $OUT as build.tar.gz (split into build.tar.gz.part-*
# files of 15 MiB when over the 16 MiB that comes back), with a hash of csrc/. A later call that
# carries it as build/carried.tar.gz unpacks it and, where csrc/ is what it was built from, dates
# the sources back to before that build (the copy onto the machine gave them new times, and ninja
# compares times), so that ninja recompiles nothing and only the link runs:
#   call 1: PYFORMER_COMMIT=<sha> STEPS="build test check bench" bench/gpu_report.sh
#   here:   mkdir -p build && cat <files_at>/build.tar.gz* >build/carried.tar.gz
#   call 2 (carry build/carried.tar.gz):
#           PYFORMER_COMMIT=<sha> STEPS="build sanitize" bench/gpu_report.sh
#           (adding "check bench" there if call 1 ran out of time before them)
# ninja's records hold absolute paths: the repository must sit at the same path in both calls,
# else everything compiles again (correct, only slower). A changed source recompiles what it feeds.
#
# Environment: OUT (default /tmp/pyformer_gpu_report), STEPS, PYTHON (default python3), MAX_JOBS,
# PYFORMER_COMMIT (the commit measured, when the tree has no .git), PYTEST_ARGS (default -q),
# DEADLINE, TEST_TIMEOUT / SANITIZE_TIMEOUT / BENCH_TIMEOUT (seconds), BENCH_ARGS (extra bench
# options).
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-${TMPDIR:-/tmp}/pyformer_gpu_report}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-build test sanitize check bench}"
REPORT="$OUT/gpu_report.md"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONUNBUFFERED=1

declare -A RC SECS
ORDER=()

want() { [[ " $STEPS " == *" $1 "* ]]; }

DEADLINE="${DEADLINE:-570}"

# run_step NAME TIMEOUT CMD...: runs CMD with its output in $LOGS/NAME.log, records rc and time.
# The timeout is cut to what is left before DEADLINE, less 30 s for the report; a step with
# nothing left is recorded as skipped (exit 124).
run_step() {
  local name="$1" tmo="$2"
  shift 2
  local left=$((DEADLINE - SECONDS - 30))
  (( left < tmo )) && tmo=$left
  if (( tmo <= 0 )); then
    echo "== [$name] skipped: no time left before DEADLINE=$DEADLINE s" | tee -a "$LOGS/steps.log"
    echo "skipped: no time left before DEADLINE" >"$LOGS/$name.log"
    RC[$name]=124
    SECS[$name]=0
    ORDER+=("$name")
    return 0
  fi
  local start=$SECONDS
  echo "== [$name] $*" | tee -a "$LOGS/steps.log"
  timeout --kill-after=30 "$tmo" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  RC[$name]=$rc
  SECS[$name]=$((SECONDS - start))
  ORDER+=("$name")
  echo "== [$name] exit $rc after ${SECS[$name]}s" | tee -a "$LOGS/steps.log"
  tail -5 "$LOGS/$name.log" | sed 's/^/   | /'
  return 0
}

find_tool() {  # find_tool NAME: PATH first, then the CUDA toolkit's bin
  local t
  t="$(command -v "$1" 2>/dev/null)" && { echo "$t"; return 0; }
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [[ -n "$d" && -x "$d/bin/$1" ]] && { echo "$d/bin/$1"; return 0; }
  done
  return 1
}

# ---- environment --------------------------------------------------------------------------------
COMMIT="$(git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || true)"
[[ -z "$COMMIT" ]] && COMMIT="${PYFORMER_COMMIT:-unknown (no .git in the tree; set PYFORMER_COMMIT)}"
DIRTY="$(git -C "$ROOT" status --porcelain 2>/dev/null | head -1)"
[[ -n "$DIRTY" ]] && COMMIT="$COMMIT (with uncommitted changes)"
GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
[[ -z "$GPU" ]] && GPU="(nvidia-smi unavailable)"
VERSIONS="$("$PYTHON" - 2>&1 <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__}; torch CUDA {torch.version.cuda}; "
      f"cuda available {torch.cuda.is_available()}"
      + (f"; device {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})"
         if torch.cuda.is_available() else ""))
EOF
)"
NVCC="$(find_tool nvcc || echo "")"
NVCC_VERSION="$([[ -n "$NVCC" ]] && "$NVCC" --version | tail -1 || echo "nvcc not found")"
echo "pyformer GPU report: $GPU | $VERSIONS | $NVCC_VERSION | commit $COMMIT"

# ---- steps --------------------------------------------------------------------------------------
EXTENSION="built in this call"
if want build; then
  if [[ -f build/carried.tar.gz ]]; then  # a build folder from an earlier call (see the header)
    if ! tar -xzf build/carried.tar.gz; then
      EXTENSION="built in this call (the carried build folder did not unpack)"
    elif [[ -f build/csrc.sha256 && -f build/csrc.older ]] \
        && sha256sum --quiet --strict -c build/csrc.sha256 >/dev/null 2>&1; then
      find csrc -type f -exec touch -d "@$(cat build/csrc.older)" {} +
      EXTENSION="on the build folder carried from an earlier call (csrc/ unchanged)"
    else
      EXTENSION="on the build folder carried from an earlier call (csrc/ changed since)"
    fi
  fi
  run_step build 1200 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
  grep -q "ninja: no work to do" "$LOGS/build.log" 2>/dev/null && EXTENSION="$EXTENSION; nothing recompiled"
  run_step backends 120 "$PYTHON" -c "import pyformer; print(pyformer.__version__, pyformer.backends())"
  # the build folder for a later call to carry: what csrc/ was, and a time before every object
  # and before every time ninja's log recorded for one (newer ninjas record when the command
  # started; a source newer than that counts as changed)
  oldest="$( (find build -name '*.o' -printf '%T@\n'
              awk '!/^#/ { t = $3; if (t > 1e12) t /= 1e9; printf "%.0f\n", t }' \
                build/*/.ninja_log) 2>/dev/null | sort -n | head -1)"
  if [[ -n "$oldest" ]]; then
    find csrc -type f | sort | xargs sha256sum >build/csrc.sha256
    echo $(( ${oldest%.*} - 1 )) >build/csrc.older
    tar -czf "$OUT/build.tar.gz" --exclude=build/carried.tar.gz build
    if (( $(stat -c %s "$OUT/build.tar.gz") > (16 << 20) )); then  # over what comes back
      split -b 15M "$OUT/build.tar.gz" "$OUT/build.tar.gz.part-" && rm -f "$OUT/build.tar.gz"
    fi
  fi
fi

if want ptxas; then
  run_step ptxas 900 env CUDA_CHECK_ARCHS=90 .ci/compile_cuda.sh
fi

if want test; then
  # shellcheck disable=SC2086
  run_step test "${TEST_TIMEOUT:-1500}" "$PYTHON" -m pytest ${PYTEST_ARGS:--q} -rfEs \
    --durations=15 -p no:cacheprovider tests
fi

# check and bench before the sanitizers: their numbers are what the run is for, and a slow
# sanitizer then only shortens itself (every step's limit is cut to what DEADLINE leaves)
HAVE_CLI=0
PYFORMER_CLI=(pyformer)
if command -v pyformer >/dev/null 2>&1; then
  HAVE_CLI=1
elif "$PYTHON" -c "import pyformer.cli" >/dev/null 2>&1; then  # console script not on PATH
  HAVE_CLI=1
  PYFORMER_CLI=("$PYTHON" -m pyformer.cli)
fi
if want check; then
  if [[ $HAVE_CLI -eq 1 ]]; then
    run_step check "${BENCH_TIMEOUT:-900}" "${PYFORMER_CLI[@]}" check --device cuda --json "$LOGS/check.json"
  else
    echo "== [check] skipped: no 'pyformer' command" | tee -a "$LOGS/steps.log"
  fi
fi
if want bench; then
  if [[ $HAVE_CLI -eq 1 ]]; then
    # the GPU targets sweep when the CLI knows it, else its default CUDA sweep
    SIZES=()
    # (no pipe into grep -q: under pipefail an early-exiting grep can fail the pipeline)
    [[ "$("${PYFORMER_CLI[@]}" bench --help 2>/dev/null)" == *gpu-targets* ]] && SIZES=(--sizes gpu-targets)
    # shellcheck disable=SC2086
    run_step bench "${BENCH_TIMEOUT:-900}" "${PYFORMER_CLI[@]}" bench --device cuda "${SIZES[@]}" \
      --json "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-}
  else
    echo "== [bench] skipped: no 'pyformer' command" | tee -a "$LOGS/steps.log"
  fi
fi

SAN_MEM="not run"
SAN_RACE="not run"
if want sanitize; then
  SANITIZER="$(find_tool compute-sanitizer || echo "")"
  if [[ -z "$SANITIZER" ]]; then
    SAN_MEM="compute-sanitizer not found"
    SAN_RACE="compute-sanitizer not found"
  else
    # No caching allocator under memcheck: an out-of-bounds access cannot land in a cached block.
    run_step memcheck "${SANITIZE_TIMEOUT:-900}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 42 \
      "$PYTHON" bench/sanitize_driver.py
    run_step racecheck "${SANITIZE_TIMEOUT:-900}" "$SANITIZER" --tool racecheck \
      --racecheck-report all --error-exitcode 42 "$PYTHON" bench/sanitize_driver.py --quick
    verdict() {  # the sanitizer's summary line, and whether the driver finished
      local log="$LOGS/$1.log" s
      s="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)"
      grep -q "sanitize_driver: ok" "$log" || s="$s; driver did not finish (exit ${RC[$1]})"
      echo "${s:-no summary line (exit ${RC[$1]})}"
    }
    SAN_MEM="$(verdict memcheck)"
    SAN_RACE="$(verdict racecheck)"
  fi
fi

# ---- report -------------------------------------------------------------------------------------
TEST_SUMMARY="not run"
if [[ -f "$LOGS/test.log" ]]; then
  TEST_SUMMARY="$(grep -E "[0-9]+ (passed|failed|error|skipped)|no tests ran" "$LOGS/test.log" | tail -1)"
  [[ -z "$TEST_SUMMARY" ]] && TEST_SUMMARY="(no summary line; exit ${RC[test]:-?})"
fi

status=0
{
  echo "# pyformer GPU report"
  echo
  echo "| | |"
  echo "| --- | --- |"
  echo "| date (UTC) | $(date -u '+%Y-%m-%d %H:%M') |"
  echo "| GPU | $GPU |"
  echo "| versions | $VERSIONS |"
  echo "| nvcc | $NVCC_VERSION |"
  echo "| commit | $COMMIT |"
  echo "| TORCH_CUDA_ARCH_LIST | $TORCH_CUDA_ARCH_LIST |"
  echo "| extension | $(want build && echo "$EXTENSION" || echo "not built in this call") |"
  echo "| steps run | $STEPS |"
  echo "| tests | $TEST_SUMMARY |"
  echo "| memcheck | $SAN_MEM |"
  echo "| racecheck | $SAN_RACE |"
  echo
  echo "## Steps"
  echo
  echo "| step | exit | seconds |"
  echo "| --- | --- | --- |"
  for s in "${ORDER[@]}"; do
    echo "| $s | ${RC[$s]} | ${SECS[$s]} |"
    [[ "${RC[$s]}" != 0 ]] && status=1
  done
  if [[ -f "$LOGS/test.log" ]]; then
    echo
    echo "## Test failures and skips (pytest -rfEs)"
    echo
    echo '```'
    sed -n '/short test summary info/,$p' "$LOGS/test.log" | head -150
    echo '```'
  fi
  for s in check bench; do
    if [[ -f "$LOGS/$s.log" ]]; then
      echo
      echo "## pyformer $s --device cuda"
      echo
      echo '```'
      tail -200 "$LOGS/$s.log"
      echo '```'
    fi
  done
  if [[ -f "$LOGS/ptxas.log" ]]; then
    echo
    echo "## ptxas register / spill report (.ci/compile_cuda.sh, this machine's nvcc)"
    echo
    echo '```'
    grep -E "^===|kernel builds|SPILL" "$LOGS/ptxas.log" | head -80
    echo '```'
  fi
} >"$REPORT"

[[ -f "$LOGS/check.json" ]] && cp "$LOGS/check.json" "$OUT/check.json"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
echo "pyformer GPU report written to $REPORT (exit $status)"
exit $status
