#!/usr/bin/env bash
# The GPU check (issue 12): one script, under 8 minutes on a GPU box with torch alone, run from the
# source tree (no install, no ray, no mlflow). It prints
#   1. the paper's CIFAR-10 configs x variants: s/iter, speed-up, peak memory, GFLOP per iteration
#      (counted) and TFLOP/s against this device's fp32 peak (measured);
#   2. DATM's CIFAR-10 IPC 10 and IPC 50 configs (N=80, soft labels): s/iter and peak memory of one
#      iteration in both grad modes (issue 20);
#   3. an expert epoch with SGD and with GSAM (FTD's flat experts, issue 21) and PAD's EL2N pass;
#   4. one iteration of IPC 1 and IPC 10 by phase, with the top operators;
#   5. a real distillation (experts, distillation, evaluation) of about 3 minutes.
# CI runs `--device cpu --quick` (tiny shapes: every path runs, nothing is measured) so it cannot rot.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--data-dir DIR] [--out DIR]
#
# --data-dir: a folder holding cifar10.npz (a subset is enough: the distillation keeps 100 images per
# class); without it the distillation uses the embedded digits set (needs scikit-learn).
# --out: where the JSON results go (default: $OUT when set, else a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda quick=0 data_dir="" out=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "error: unknown argument '$1'; use [--device cuda|cpu] [--quick] [--data-dir DIR] [--out DIR]" >&2; exit 2 ;;
  esac
done
out=${out:-$(mktemp -d)}
mkdir -p "$out"
python=${PYTHON:-python}
export PYTHONUNBUFFERED=1
start=$SECONDS
if [ "$device" = cuda ] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device visible to torch; run on a GPU box or pass --device cpu" >&2; exit 2
fi

if [ $quick = 1 ]; then  # every path, tiny shapes
  bench=(--configs cifar10_ipc1,cifar10_ipc10 --syn-steps 2 --width 8 --warmup 0 --repeats 1)
  datm=(--configs datm/cifar10_ipc10,datm/cifar10_ipc50 --syn-steps 2 --width 8 --warmup 0 --repeats 1)
  gsam=(--train-per-class 5 --width 8 --repeats 1)
  profile=(--configs cifar10_ipc1 --syn-steps 2 --width 8)
  run=(--experts.num_experts 1 --experts.epochs 2 --distill.syn_steps 2 --distill.iterations 2
       --distill.expert_epochs 1 --distill.max_start_epoch 1
       --distill.eval_every 0 --distill.eval_epochs 2 --distill.eval_runs 1 --eval.num_runs 1 --eval.epochs 2)
  limit=300
else
  bench=(--configs cifar10_ipc1,cifar10_ipc10,cifar10_ipc50 --warmup 2 --repeats 5)
  datm=(--configs datm/cifar10_ipc10,datm/cifar10_ipc50 --warmup 1 --repeats 3)
  gsam=(--train-per-class 5000 --repeats 2)  # the whole CIFAR-10 training split per epoch
  profile=(--configs cifar10_ipc1,cifar10_ipc10)
  run=(--experts.num_experts 4 --experts.epochs 6 --distill.syn_steps 20 --distill.expert_epochs 2
       --distill.max_start_epoch 4 --distill.iterations 400 --distill.eval_every 200 --distill.eval_epochs 200
       --distill.lr_img 1000 --eval.num_runs 3 --eval.epochs 300)
  limit=240  # the distillation is stopped here whatever it reached: the script must end within 8 minutes
fi
if [ -n "$data_dir" ]; then
  dataset=(--dataset cifar10 --ipc 10 --data-dir "$data_dir" --data.train_per_class 100 --data.val_per_class 10)
else
  dataset=(--dataset digits --ipc 1)
fi

echo "== 1. configs x variants ($device)"
"$python" -m ray_mtt.bench --device "$device" --variants unrolled,checkpointed,channels_last,tf32,bf16,cuda_graph \
  --flops --peak-memory "${bench[@]}" --json "$out/gpu_check_bench.json"
echo "== 2. DATM's configs, both grad modes ($device)"
"$python" -m ray_mtt.bench --device "$device" --variants unrolled,checkpointed --peak-memory "${datm[@]}" \
  --json "$out/gpu_check_datm.json"
echo "== 3. an expert epoch, SGD and GSAM ($device)"
"$python" benchmarks/bench_gsam.py --device "$device" "${gsam[@]}" --json "$out/gpu_check_gsam.json"
echo "== 4. one iteration by phase ($device)"
"$python" -m ray_mtt.bench --device "$device" --profile "${profile[@]}" --json "$out/gpu_check_profile.json"
echo "== 5. a real distillation ($device, stopped after ${limit} s)"
status=0
timeout "$limit" "$python" -m ray_mtt --engine local --device "$device" --tracking-uri none \
  --run_dir "$out/run" "${dataset[@]}" "${run[@]}" || status=$?
if [ $status = 124 ]; then
  echo "the distillation reached the ${limit} s limit; its checkpoint is in $out/run (rerun to resume)"
elif [ $status != 0 ]; then
  echo "error: the distillation failed (exit $status)" >&2; exit $status
fi
echo "gpu_check: done in $((SECONDS - start)) s; results in $out"
