#!/usr/bin/env bash
# Rerun the paper's ImageNet tables with torchrun, one config after another.
#
#   scripts/reproduce_imagenet.sh --data /datasets/imagenet [--gpus 8] [--out runs/imagenet] [--table all] [KEY VALUE ...]
#
# --table: batch (BN / BRN / MABN at b = 32 ... 1: the paper's main figure), baselines (GN, LN, IN),
# ablation (the MABN switches at b = 2), or all. Run directories are <out>/<config name>; finished runs
# are skipped and interrupted ones resume from their checkpoint, so the script can simply be rerun.
# Trailing KEY VALUE pairs go to every run (e.g. DATA.WORKERS 12). Multi-node: put torchrun's flags in
# TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--nnodes=2 --node_rank=0 --master_addr=host0 --master_port=29500").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/torchrun_table.sh

gpus=8 out=runs/imagenet table=all data=""
usage() { sed -n '2,12p' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --table) table=$2; shift 2 ;;
    -h|--help) usage ;;
    --*) echo "unknown option $1" >&2; usage 2 ;;
    *) break ;;
  esac
done
[ -n "$data" ] || { echo "--data /path/to/imagenet (with train/ and val/) is required" >&2; exit 2; }
[ -d "$data/train" ] && [ -d "$data/val" ] || { echo "$data must hold train/ and val/ ImageFolders" >&2; exit 2; }

batch=($(table_configs imagenet_batch))
baselines=($(table_configs imagenet_baselines))
ablation=($(table_configs imagenet_ablation | sort))  # in name order, every switch off first, as they always ran
case "$table" in
  batch) configs=("${batch[@]}") ;;
  baselines) configs=("${baselines[@]}") ;;
  ablation) configs=("${ablation[@]}") ;;
  all) configs=("${batch[@]}" "${baselines[@]}" "${ablation[@]}") ;;
  *) echo "--table must be batch, baselines, ablation or all" >&2; exit 2 ;;
esac
[ "$gpus" = 8 ] || echo "note: the paper trains on 8 GPUs x 32 images; with $gpus GPUs the total batch (and, by linear scaling, the lr) changes" >&2

for name in "${configs[@]}"; do
  train_config cls/train.py "cls/$name" "$@"
done
"$PY" scripts/collect_results.py --only imagenet --imagenet "$out" --plot "$out/error_vs_b.png"
