#!/usr/bin/env bash
# One prepared GPU run of everything that needs a GPU, for a lent machine with no network
# (written for an H200 with torch 2.11, triton 3.6, transformers 5.17, Python 3.12; the step limits add up
# to 8 minutes):
#   1. install this checkout without touching the image's torch (pip --no-deps --no-index -e .),
#      and list the wheels it needs that the image lacks;
#   2. every test that needs CUDA (kernels natively in fp16/bf16, the runtime's Triton backend
#      against torch, CUDA-graph decode against eager, the streaming_trt.hf Triton path);
#   3. bench.kernels: the kernels against SDPA, bandwidth against the copy bandwidth;
#   4. bench.latency --preset llama2-7b --dtype bfloat16 at C = 256, 1024, 4096 against transformers
#      dense and re-computation;
#   5. a long endless stream (bench.endless);
#   6. the batched serving step at several batch sizes (bench.serve_step, when it exists).
# Logs, CSV and PNG go to $OUT when it is set (else runs/gpu_check/); summary.txt says what passed.
# Every step runs under its own time limit and the script goes on after a failure; it exits 1 if
# any step failed.
#
# Before any test runs, every test id it lists must still collect: a renamed or removed test fails the
# step "collect", naming the ids, instead of silently shrinking the run.
#
#   bash scripts/gpu_check.sh                   # the GPU run
#   bash scripts/gpu_check.sh --cpu             # the same steps on small shapes on a CPU (tests/test_gpu_check.py)
#   bash scripts/gpu_check.sh --steps collect,tests   # only these steps (a rerun of the ones that failed)
# GPU_CHECK_TESTS="id id ..." replaces the list of CUDA test ids (a narrower rerun).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
MODE=gpu
STEPS=all
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --steps) STEPS=${2:?--steps needs a comma-separated list: collect,tests,kernels,latency,endless,serve_step}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
wanted() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }
OUTDIR=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUTDIR/logs"
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
FAILED=0

say() { echo "[gpu_check] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to logs/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    local log="$OUTDIR/logs/$name.log" t0=$SECONDS rc
    echo "[gpu_check] $name: $*" >&2
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then say "PASS $name ($((SECONDS - t0)) s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "FAIL $name: over its ${limit} s limit (log: logs/$name.log)"; FAILED=1
    else say "FAIL $name: exit $rc (log: logs/$name.log)"; tail -n 5 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"; FAILED=1
    fi
}

say "mode $MODE, output $OUTDIR, $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# ---- 1. install, and the wheels the image lacks ---------------------------------------------------
TORCH_BEFORE=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $TORCH_BEFORE"
"$PY" - "$OUTDIR/missing_wheels.txt" <<'EOF' | tee -a "$SUMMARY"
import importlib.util, sys
# import name -> (pip wheel, what needs it)
needed = {
    "torch": ("torch", "everything"), "triton": ("triton", "the kernels"), "transformers": ("transformers", "hf tests, hf-dense"),
    "safetensors": ("safetensors", "checkpoints"), "tokenizers": ("tokenizers", "tokenizers"), "tqdm": ("tqdm", "progress bars"),
    "numpy": ("numpy", "everything"), "gguf": ("gguf", "GGUF loading"), "pytest": ("pytest", "the tests"),
    "matplotlib": ("matplotlib", "the PNGs"), "accelerate": ("accelerate", "transformers GGUF loading"),
}
missing = [f"{wheel} ({why})" for name, (wheel, why) in needed.items() if importlib.util.find_spec(name) is None]
open(sys.argv[1], "w").write("".join(m + "\n" for m in missing))
print("[gpu_check] wheels the image lacks: " + (", ".join(missing) if missing else "none"))
EOF
INSTALLED=$("$PY" -c "import streaming_trt, pathlib; print(pathlib.Path(streaming_trt.__file__).resolve().parent.parent)" 2>/dev/null)
if [ "$INSTALLED" = "$ROOT" ]; then
    say "PASS install (streaming_trt already imports from this checkout)"
else
    # --no-deps: the image's torch stays; --no-index / --no-build-isolation: no network, the image's setuptools
    step install 120 "$PY" -m pip install --no-deps --no-index --no-build-isolation -e .
    if ! "$PY" -c "import streaming_trt.kernels" 2>/dev/null; then
        # no usable setuptools in the image: the package's layout (pyproject package-dir) as links on PYTHONPATH
        LINKS="$OUTDIR/pkg"; rm -rf "$LINKS"; mkdir -p "$LINKS/streaming_trt"
        for f in "$ROOT"/streaming_trt/*; do ln -s "$f" "$LINKS/streaming_trt/"; done
        ln -s "$ROOT/kernels/src" "$LINKS/streaming_trt/kernels"; ln -s "$ROOT/export/src" "$LINKS/streaming_trt/export"
        export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
        say "install fell back to links on PYTHONPATH ($LINKS)"
    fi
fi
TORCH_AFTER=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
[ "$TORCH_AFTER" = "$TORCH_BEFORE" ] || { say "FAIL torch changed from $TORCH_BEFORE to $TORCH_AFTER"; FAILED=1; }
"$PY" -c "import torch; print('[gpu_check] cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$SUMMARY"

# ---- 2. the tests that need CUDA ------------------------------------------------------------------
# On a CPU most of them run under TRITON_INTERPRET=1 (slowly) and the GPU-only ones skip; the CPU mode
# collects the whole selection (it must still exist) and runs only the GPU-only tests (they skip).
CUDA_TESTS=(tests/test_kernels.py tests/test_runtime_triton.py tests/test_kernel_compile.py
            tests/test_core.py::test_captured_decode_equals_eager_on_cuda
            tests/test_engine.py::test_runner_on_cuda_equals_each_conversation_alone
            tests/test_hf.py::test_triton_kernels_equal_the_oracle tests/test_hf.py::test_triton_kernels_in_a_left_padded_generate
            tests/test_hf.py::test_backend_choice_is_checked)
GPU_ONLY=(tests/test_core.py::test_captured_decode_equals_eager_on_cuda tests/test_kernels.py::test_gpu_bench_shapes
          tests/test_engine.py::test_runner_on_cuda_equals_each_conversation_alone)
if [ -n "${GPU_CHECK_TESTS:-}" ]; then read -r -a CUDA_TESTS <<< "$GPU_CHECK_TESTS"; GPU_ONLY=("${CUDA_TESTS[@]}"); fi
# every listed id must collect (pytest exits 4 on an id that is gone, 5 when a file collects nothing)
step collect 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider "${CUDA_TESTS[@]}"
if wanted collect && ! grep -q "PASS collect " "$SUMMARY"; then
    say "FAIL collect: a test id listed in scripts/gpu_check.sh no longer collects (above): update CUDA_TESTS"
fi
if [ $MODE = gpu ]; then
    step tests 190 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUTDIR/tests.xml" "${CUDA_TESTS[@]}"
else
    step tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUTDIR/tests.xml" "${GPU_ONLY[@]}"
fi

# ---- 3. the kernels' bandwidth -------------------------------------------------------------------
if [ $MODE = gpu ]; then
    step kernels 60 "$PY" -m bench.kernels --device cuda --warmup 2 --iters 10 --out "$OUTDIR/kernels" --no-progress
else
    step kernels 90 "$PY" -m bench.kernels --device cpu --batch 1 --capacity 64 --chunk 8 --iters 1 --warmup 0 \
        --ops decode,prefill --out "$OUTDIR/kernels" --no-progress
fi

# ---- 4. latency against transformers dense and re-computation -------------------------------------
if [ $MODE = gpu ]; then
    step latency 120 "$PY" -m bench.latency --preset llama2-7b --device cuda --dtype bfloat16 --cache-sizes 256,1024,4096 \
        --methods streaming,hf-dense,recompute --tokens 32 --slow-tokens 4 --out "$OUTDIR/latency" --no-progress
else
    step latency 90 "$PY" -m bench.latency --preset builtin --device cpu --cache-sizes 16,32 \
        --methods streaming,hf-dense,recompute --tokens 2 --slow-tokens 1 --warmup 0 --out "$OUTDIR/latency" --no-progress
fi

# ---- 5. a long endless stream --------------------------------------------------------------------
if [ $MODE = gpu ]; then
    step endless 50 "$PY" -m bench.endless --device cuda --tokens 30000 --cache 1024 --samples 20 --out "$OUTDIR/endless" --no-progress
else
    step endless 90 "$PY" -m bench.endless --device cpu --tokens 400 --cache 32 --samples 4 --settle 100 \
        --out "$OUTDIR/endless" --no-progress
fi

# ---- 6. the batched serving step (the lead's bench.serve_step, once it exists) --------------------
if ! wanted serve_step; then :
elif "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bench.serve_step') is None)" 2>/dev/null; then
    HELP=$("$PY" -m bench.serve_step --help 2>/dev/null || true)
    ARGS=(--out "$OUTDIR/serve_step")
    case "$HELP" in *--no-progress*) ARGS+=(--no-progress);; esac
    case "$HELP" in *--device*) ARGS+=(--device "$([ $MODE = gpu ] && echo cuda || echo cpu)");; esac
    case "$HELP" in *--batch-sizes*) ARGS+=(--batch-sizes "$([ $MODE = gpu ] && echo 1,8,64,256 || echo 1,2)");; esac
    case "$HELP" in *--tokens*) ARGS+=(--tokens "$([ $MODE = gpu ] && echo 64 || echo 4)");; esac
    case "$HELP" in *--prompt-tokens*) ARGS+=(--prompt-tokens "$([ $MODE = gpu ] && echo 128 || echo 8)");; esac
    case "$HELP" in *llama-1b*) [ $MODE = gpu ] && ARGS+=(--preset llama-1b);; esac
    step serve_step "$([ $MODE = gpu ] && echo 50 || echo 90)" "$PY" -m bench.serve_step "${ARGS[@]}"
else
    say "SKIP serve_step: bench/serve_step.py does not exist yet"
fi

find "$OUTDIR" -name '*.csv' -o -name '*.png' | sed "s|^$OUTDIR/|[gpu_check] wrote |" | sort | tee -a "$SUMMARY"
say "$([ $FAILED = 0 ] && echo 'ALL PASSED' || echo 'SOME STEPS FAILED') in $SECONDS s"
exit $FAILED
