#!/usr/bin/env bash
# GPU smoke test of the bundle: every CUDA path once, on a few real images, in a few minutes (bench/README.md).
#
#   bench/gpu_smoke.sh                  # on a machine with CUDA (fails at once without it)
#   bench/gpu_smoke.sh --dry_run        # the same steps on the CPU, small and quick: tests the script's logic
#
# Needs bash 4.4 or later, the project's virtual environment (.venv, or $PYTHON) and the shared data.
#
# Options: --data_root DIR (default ../shared/data), --work_dir DIR (new or empty; default a new
# /tmp/cxr_gpu_smoke.XXXX, removed after a passing run unless --keep_work), --results_dir DIR (default
# bench/results; with --dry_run the work folder's results/, so that CPU figures never replace the GPU ones).
#
# Steps, each timed; the first failing one stops the run with exit status 1 and its log's tail:
#   env, prepare           the machine (CUDA required, else exit 1 before any report, unless --dry_run);
#                          links to the first images of the shared data
#   train, check_train     2 epochs of train.yaml with AMP: loss finite, model.pt and checkpoint written, device-free
#   export_without_cuda    ckpt_export of that model.pt with CUDA hidden (CUDA_VISIBLE_DEVICES=''), as on a CPU box
#   resume, check_resume   --resume True up to epoch 3: restored from epoch 2, only epoch 3 run
#   anatomy                train.yaml + anatomy.yaml at 512 px (--dry_run: 128), 1 epoch
#   invertednet            train.yaml + invertednet.yaml, 1 epoch
#   torchrun               multi_gpu_train.yaml over min(2, GPUs) processes with NCCL (--dry_run: 2 over gloo):
#                          every rank's backend and weights recorded, the weights equal
#   evaluate, check_eval   evaluate.yaml with the shipped model.pt: lung Dice within 0.002 of metadata.json
#                          (all three sets; --dry_run: Montgomery's validation split only)
#   infer_amp, infer_fp32, infer_cpu   inference.yaml with --amp True, --amp False, and on the CPU; masks compared
#   ckpt_export, infer_ts  the shipped model.pt to TorchScript, inference_ts.yaml; masks compared with infer_fp32
#   throughput             training images/s (cache_on_device off and on, AMP) and the network's inference images/s
#   report                 gpu_smoke.json and gpu_smoke.md in the results folder
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

DRY_RUN=0 KEEP=0 DATA_ROOT="$REPO/../shared/data" WORK="" RESULTS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --keep_work) KEEP=1 ;;
    --data_root) DATA_ROOT="$2"; shift ;;
    --work_dir) WORK="$2"; shift ;;
    --results_dir) RESULTS="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
CREATED_WORK=0
if [[ -z "$WORK" ]]; then
  WORK="$(mktemp -d /tmp/cxr_gpu_smoke.XXXX)" CREATED_WORK=1
elif [[ -e "$WORK" && -n "$(ls -A "$WORK")" ]]; then
  echo "gpu_smoke.sh: --work_dir $WORK is not empty (give a new or empty folder)" >&2
  exit 2
fi
mkdir -p "$WORK/logs"
WORK="$(cd "$WORK" && pwd)"
: > "$WORK/steps.tsv"
if [[ $DRY_RUN -eq 1 ]]; then
  MODE=dry_run RESULTS="${RESULTS:-$WORK/results}"
  SIZE=64 ANATOMY_SIZE=128 INV_SIZE=64 BATCH=2 N_TRAIN=8 N_ANATOMY=6 N_INFER=6 NPROC=2
  CPU_ONLY=(--device "\$torch.device('cpu')")
  EVAL_DATA=(--dataset_dir "$DATA_ROOT/montgomery") EVAL_SETS=(montgomery)
  THROUGHPUT=(--device cpu --dataset_dir "$WORK/data/montgomery" --spatial_size 64 --batch_size 2 --epochs 2
              --iterations 3)
else
  MODE=gpu RESULTS="${RESULTS:-$REPO/bench/results}"
  SIZE=256 ANATOMY_SIZE=512 INV_SIZE=256 BATCH=4 N_TRAIN=16 N_ANATOMY=8 N_INFER=24 NPROC=""
  CPU_ONLY=()
  EVAL_DATA=(--data_root "$DATA_ROOT") EVAL_SETS=(all montgomery shenzhen jsrt_scr)
  THROUGHPUT=(--device cuda --dataset_dir "$DATA_ROOT/montgomery" --spatial_size 256 --batch_size 8 --epochs 4
              --iterations 50)
fi
if [[ $DRY_RUN -eq 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_smoke: no CUDA device (torch.cuda.is_available() is False); --dry_run runs the steps on the CPU" >&2
  if [[ $CREATED_WORK -eq 1 ]]; then rm -rf "$WORK"; fi
  exit 1
fi
echo "gpu_smoke ($MODE): work folder $WORK, results to $RESULTS"

finish() {  # report, then exit with $1
  local rc=$1 status=passed
  [[ $rc -eq 0 ]] || status=failed
  "$PY" bench/gpu_smoke.py report --work "$WORK" --results_dir "$RESULTS" --mode "$MODE" --status "$status" \
    > "$WORK/logs/report.log" 2>&1 || { echo "report failed:"; tail -20 "$WORK/logs/report.log"; rc=1; }
  echo "gpu_smoke ($MODE): $status in ${SECONDS}s; $RESULTS/gpu_smoke.md"
  if [[ $rc -eq 0 && $KEEP -eq 0 && $CREATED_WORK -eq 1 ]]; then rm -rf "$WORK"; else echo "work folder kept: $WORK"; fi
  exit "$rc"
}

step() {  # step NAME COMMAND...: run COMMAND (log in $WORK/logs/NAME.log), time it, stop the run if it fails
  local name=$1; shift
  local start end rc=0
  start=$(date +%s.%N)
  "$@" > "$WORK/logs/$name.log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$*" >> "$WORK/steps.tsv"
  if [[ $rc -ne 0 ]]; then
    echo "FAILED  $name (${seconds}s, exit $rc); the end of $WORK/logs/$name.log:"
    tail -25 "$WORK/logs/$name.log"
    finish 1
  fi
  printf 'ok      %-22s %8.1fs\n' "$name" "$seconds"
}

BUNDLE_RUN=("$PY" -m monai.bundle run)
TRAIN_CFG=bundle/configs/train.yaml
COMMON=(--bundle_root bundle --progress False)
TRAIN_ARGS=(--config_file "$TRAIN_CFG" --dataset_dir "$WORK/data/montgomery" --output_dir "$WORK/train"
            --ckpt_dir "$WORK/train/models" --spatial_size "[$SIZE,$SIZE]" --batch_size "$BATCH" --amp True
            "${CPU_ONLY[@]}")

if [[ $DRY_RUN -eq 1 ]]; then step env "$PY" bench/gpu_smoke.py env --work "$WORK"
else step env "$PY" bench/gpu_smoke.py env --work "$WORK" --require_cuda; fi
if [[ -z "$NPROC" ]]; then
  NPROC=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
fi
step prepare "$PY" bench/gpu_smoke.py prepare --work "$WORK" --data_root "$DATA_ROOT" --n_train "$N_TRAIN" \
  --n_anatomy "$N_ANATOMY" --n_infer "$N_INFER"

# ---- training: AMP, device-free weights, resume ----------------------------------------------------------------
step train "${BUNDLE_RUN[@]}" training "${COMMON[@]}" "${TRAIN_ARGS[@]}" --max_epochs 2
step check_train "$PY" bench/gpu_smoke.py check_train --work "$WORK" --name train --ckpt_dir "$WORK/train/models" \
  --log_dir "$WORK/train" --epochs 2
step export_without_cuda env CUDA_VISIBLE_DEVICES= "$PY" -m monai.bundle ckpt_export --net_id network_def \
  --filepath "$WORK/train/model.ts" --ckpt_file "$WORK/train/models/model.pt" \
  --meta_file bundle/configs/metadata.json --config_file "$TRAIN_CFG"
step resume "${BUNDLE_RUN[@]}" training "${COMMON[@]}" "${TRAIN_ARGS[@]}" --max_epochs 3 --resume True
step check_resume "$PY" bench/gpu_smoke.py check_train --work "$WORK" --name resume \
  --ckpt_dir "$WORK/train/models" --log_dir "$WORK/train" --epochs 3 --log "$WORK/logs/resume.log" \
  --expect "Restored all variables from $WORK/train/models/checkpoint_epoch=2.pt" "Epoch[3] Complete"

# ---- the other configs -----------------------------------------------------------------------------------------
step anatomy "${BUNDLE_RUN[@]}" training "${COMMON[@]}" \
  --config_file "['$TRAIN_CFG','bundle/configs/anatomy.yaml']" --dataset_dir "$WORK/data/jsrt_scr" \
  --output_dir "$WORK/anatomy" --ckpt_dir "$WORK/anatomy/models" --spatial_size "[$ANATOMY_SIZE,$ANATOMY_SIZE]" \
  --batch_size "$BATCH" --max_epochs 1 "${CPU_ONLY[@]}"
step check_anatomy "$PY" bench/gpu_smoke.py check_train --work "$WORK" --name anatomy \
  --ckpt_dir "$WORK/anatomy/models" --log_dir "$WORK/anatomy" --epochs 1 --model_file model_anatomy.pt
step invertednet "${BUNDLE_RUN[@]}" training "${COMMON[@]}" \
  --config_file "['$TRAIN_CFG','bundle/configs/invertednet.yaml']" --dataset_dir "$WORK/data/montgomery" \
  --output_dir "$WORK/invertednet" --ckpt_dir "$WORK/invertednet/models" --spatial_size "[$INV_SIZE,$INV_SIZE]" \
  --batch_size "$BATCH" --max_epochs 1 "${CPU_ONLY[@]}"
step check_invertednet "$PY" bench/gpu_smoke.py check_train --work "$WORK" --name invertednet \
  --ckpt_dir "$WORK/invertednet/models" --log_dir "$WORK/invertednet" --epochs 1

# ---- torchrun: NCCL on the GPUs (gloo in the dry run) ----------------------------------------------------------
cat > "$WORK/record_ranks.yaml" <<'EOF'
finalize:
  - "$torch.save(@network.module.state_dict(), @output_dir + '/weights_rank' + str(@rank) + '.pt')"
  - "$torch.save({'rank': @rank, 'backend': str(torch.distributed.get_backend()), 'device': str(@device), 'world_size': torch.distributed.get_world_size()}, @output_dir + '/rank' + str(@rank) + '.pt')"
  - "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()"
EOF
if [[ $DRY_RUN -eq 1 ]]; then BACKEND=gloo; else BACKEND=nccl; fi
step torchrun "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  -m monai.bundle run training "${COMMON[@]}" \
  --config_file "['$TRAIN_CFG','bundle/configs/multi_gpu_train.yaml','$WORK/record_ranks.yaml']" \
  --dataset_dir "$WORK/data/montgomery" --output_dir "$WORK/ddp" --ckpt_dir "$WORK/ddp/models" \
  --spatial_size "[$SIZE,$SIZE]" --batch_size "$BATCH" --max_epochs 1 "${CPU_ONLY[@]}"
step check_torchrun "$PY" bench/gpu_smoke.py check_ranks --work "$WORK" --out_dir "$WORK/ddp" \
  --world_size "$NPROC" --backend "$BACKEND"
step check_torchrun_weights "$PY" bench/gpu_smoke.py check_device_free --work "$WORK" --name torchrun_weights \
  "$WORK/ddp/models/model.pt" "$WORK/ddp/models/checkpoint_epoch=1.pt"

# ---- evaluation of the shipped weights ---------------------------------------------------------------------------
step evaluate "${BUNDLE_RUN[@]}" evaluating "${COMMON[@]}" \
  --config_file "['$TRAIN_CFG','bundle/configs/evaluate.yaml']" "${EVAL_DATA[@]}" --ckpt_dir bundle/models \
  --output_dir "$WORK/eval" --eval_overlays False "${CPU_ONLY[@]}"
step check_eval "$PY" bench/gpu_smoke.py check_eval --work "$WORK" --summary "$WORK/eval/eval/metrics_summary.csv" \
  --datasets "${EVAL_SETS[@]}"

# ---- folder inference: AMP on, off, on the CPU; TorchScript ----------------------------------------------------
INFER=("${BUNDLE_RUN[@]}" inference "${COMMON[@]}" --input_dir "$WORK/infer_in" --write_overlay False)
step infer_amp "${INFER[@]}" --config_file bundle/configs/inference.yaml --output_dir "$WORK/infer/amp" --amp True \
  "${CPU_ONLY[@]}"
step infer_fp32 "${INFER[@]}" --config_file bundle/configs/inference.yaml --output_dir "$WORK/infer/fp32" \
  --amp False "${CPU_ONLY[@]}"
step infer_cpu "${INFER[@]}" --config_file bundle/configs/inference.yaml --output_dir "$WORK/infer/cpu" \
  --device "\$torch.device('cpu')"
step compare_fp32_cpu "$PY" bench/gpu_smoke.py compare_masks --work "$WORK" --name fp32_vs_cpu \
  "$WORK/infer/fp32" "$WORK/infer/cpu" --min_mean_dice 0.999 --min_dice 0.995
step compare_amp_fp32 "$PY" bench/gpu_smoke.py compare_masks --work "$WORK" --name amp_vs_fp32 \
  "$WORK/infer/amp" "$WORK/infer/fp32" --min_mean_dice 0.995 --min_dice 0.98
step ckpt_export "$PY" -m monai.bundle ckpt_export --net_id network_def --filepath "$WORK/model.ts" \
  --ckpt_file bundle/models/model.pt --meta_file bundle/configs/metadata.json \
  --config_file bundle/configs/inference.yaml
step infer_ts "${INFER[@]}" --config_file "['bundle/configs/inference.yaml','bundle/configs/inference_ts.yaml']" \
  --ckpt_path "$WORK/model.ts" --output_dir "$WORK/infer/ts" "${CPU_ONLY[@]}"
step compare_ts_fp32 "$PY" bench/gpu_smoke.py compare_masks --work "$WORK" --name torchscript_vs_fp32 \
  "$WORK/infer/ts" "$WORK/infer/fp32" --min_mean_dice 0.999 --min_dice 0.995
step cli_inference "$PY" bench/gpu_smoke.py cli_inference --work "$WORK"

# ---- throughput --------------------------------------------------------------------------------------------------
step throughput "$PY" bench/gpu_smoke.py throughput --work "$WORK" "${THROUGHPUT[@]}" --ts "$WORK/model.ts"

finish 0
