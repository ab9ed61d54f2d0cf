#!/usr/bin/env bash
# Everything behind benchmarks/RESULTS.md §Fashion-MNIST, from a clone with the IDX files installed
# (apt-get install dataset-fashion-mnist), on a 2-core CPU. Finished trainings are skipped, so it resumes.
#   bash benchmarks/fashion.sh train      # targets (fashion 28, fashion14, digits) and their drafts, ~1.5 h
#   bash benchmarks/fashion.sh ladder     # the dimension ladder and the draft-loss comparison (~2 h: a 28 px
#                                         # row costs 1.5–8 min on 2 cores)
#   bash benchmarks/fashion.sh quality    # FID-proxy (2000 samples per row, N = 20) and the deterministic PSNR
#                                         # tables at guidance 1 and 3 (~55 min on 2 cores: ~7.5 ms per 28 px row)
# Trainings after the first run two at a time on one thread each: two 2-thread jobs on 2 cores stall each
# other's OpenMP barriers (measured: the 28 px target fell from 2.4 to 0.25 steps/s).
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=benchmarks/logs
mkdir -p "$LOGS" runs

train() {  # train <entry> <config> [extra args]: skipped when the config's last.ckpt holds its max_steps
  local entry=$1 config=$2; shift 2
  local dir; dir=$(grep -m1 "dirpath:" "$config" | awk '{print $2}')
  local steps; steps=$(grep -m1 "max_steps:" "$config" | awk '{print $2}')
  if [ -f "$dir/last.ckpt" ] && python - "$dir/last.ckpt" "$steps" <<'PY'
import sys, torch
sys.exit(0 if torch.load(sys.argv[1], map_location="cpu", weights_only=True)["global_step"] >= int(sys.argv[2]) else 1)
PY
  then echo "done: $config"; return; fi
  local resume=(); [ -f "$dir/last.ckpt" ] && resume=(--ckpt_path "$dir/last.ckpt")
  echo "training $config $*"
  OMP_NUM_THREADS=${THREADS:-1} python "$entry" fit --config "$config" "$@" "${resume[@]}" \
    > "$LOGS/cpu_train_$(basename "$config" .yaml).log" 2>&1
}

variant() {  # variant <config> <suffix> <key> <value>: a copy writing to runs/<name><suffix> with one key changed
  local out=runs/$(basename "$1" .yaml)$2.yaml
  local name; name=$(grep -m1 "default_root_dir:" "$1" | awk '{print $2}')
  sed -e "s#$name#$name$2#g" -e "s#^\(\s*$3:\).*#\1 $4#" "$1" > "$out"
  echo "$out"
}

case "${1:-}" in
  train)
    THREADS=2 train train.py configs/fashion.yaml
    ( train train_draft.py configs/fashion_medusa.yaml
      train train_draft.py configs/fashion_draft.yaml
      train train.py configs/digits.yaml
      train train_draft.py configs/digits_medusa.yaml
      train train_draft.py configs/digits_draft.yaml ) &
    ( train train.py configs/fashion14.yaml
      train train_draft.py "$(variant configs/fashion_medusa.yaml _mse weighting accept)"
      train train_draft.py "$(variant configs/fashion_draft.yaml _mse loss mse)"
      train train_draft.py configs/fashion14_medusa.yaml
      train train_draft.py configs/fashion14_draft.yaml ) &
    wait ;;
  ladder)
    python benchmarks/ladder.py --rungs digits fashion14 fashion | tee "$LOGS/cpu_ladder.txt"
    python benchmarks/ladder.py --rungs fashion --draft-suffix _mse --drafters model medusa --steps 100 \
      | tee "$LOGS/cpu_ladder_fashion_mse_drafts.txt" ;;
  quality)  # the commands behind RESULTS §Quality on Fashion-MNIST and §Second-order bases (~55 min on 2 cores)
    python benchmarks/fid_proxy.py --data fashion --ckpt runs/fashion/checkpoints/last.ckpt \
      --draft runs/fashion_medusa/checkpoints/last.ckpt --num 2000 --batch 500 --steps 20 --rival-calls 8 \
      --cache runs/fashion_fid_cnn3000.pt --classifier-steps 3000 --classifier-seconds 600 \
      --only sde speculative "LOSSY accept-all" "RIVAL sde N=8" "RIVAL ab2 N=8" "RIVAL heun N=4" \
      | tee "$LOGS/cpu_fid_fashion.txt"
    python benchmarks/deterministic.py --models --ckpt runs/fashion/checkpoints/last.ckpt --guidance 1 3 \
      --steps 50 --batch 32 --warmup 2 --schedules uniform quadratic \
      --only "sfm L4 tol.2" "sfm ab2 L2 tol.05" "rca L2 (lossy)" "rca L4 (lossy)" "fastflow ab2" \
      | tee "$LOGS/cpu_deterministic_fashion.txt" ;;
  *) echo "usage: bash benchmarks/fashion.sh train|ladder|quality"; exit 2 ;;
esac
