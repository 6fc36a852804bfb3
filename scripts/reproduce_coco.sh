#!/usr/bin/env bash
# Rerun the paper's COCO table (Mask R-CNN R50-FPN, 2x) with torchrun, one config after another.
#
#   scripts/reproduce_coco.sh --data /datasets/coco [--gpus 8] [--out runs/coco] [--table all]
#       [--imagenet-mabn runs/imagenet/mabn_b2/model_final.pth] [--torchvision-r50 resnet50.pth] [KEY VALUE ...]
#
# --table: scratch (BN-2, BRN-2, SyncBN-2x8, MABN-2 and GN from scratch), finetune (SyncBN-2x8 from a
# torchvision ResNet-50, MABN-2 from our own ImageNet MABN ResNet-50), or all. --data is a COCO root with
# train2017/, val2017/ and annotations/. Finished runs are skipped, interrupted ones resume. Trailing
# KEY VALUE pairs go to every run; TORCHRUN_ARGS carries multi-node flags, as in reproduce_imagenet.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/torchrun_table.sh

gpus=8 out=runs/coco table=all data="" mabn_r50=runs/imagenet/mabn_b2/model_final.pth tv_r50=""
usage() { sed -n '2,12p' "$0"; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --table) table=$2; shift 2 ;;
    --imagenet-mabn) mabn_r50=$2; shift 2 ;;
    --torchvision-r50) tv_r50=$2; shift 2 ;;
    -h|--help) usage ;;
    --*) echo "unknown option $1" >&2; usage 2 ;;
    *) break ;;
  esac
done
[ -n "$data" ] || { echo "--data /path/to/coco (train2017/, val2017/, annotations/) is required" >&2; exit 2; }
for f in train2017 val2017 annotations/instances_train2017.json annotations/instances_val2017.json; do
  [ -e "$data/$f" ] || { echo "$data/$f not found: --data must be a COCO 2017 root" >&2; exit 2; }
done

scratch=($(table_configs coco strategy=scratch))
finetune=($(table_configs coco strategy=finetune))
case "$table" in
  scratch) configs=("${scratch[@]}") ;;
  finetune) configs=("${finetune[@]}") ;;
  all) configs=("${scratch[@]}" "${finetune[@]}") ;;
  *) echo "--table must be scratch, finetune or all" >&2; exit 2 ;;
esac
[ "$gpus" = 8 ] || echo "note: the paper trains on 8 GPUs x 2 images; with $gpus GPUs the total batch (and, by linear scaling, the lr) changes" >&2

for name in "${configs[@]}"; do
  extra=() backbone=""
  finished "$out/$name" || backbone=$(table_field coco "$name" backbone)  # a finished run needs no backbone
  case "$backbone" in  # the option that supplies the row's ImageNet backbone
    --imagenet-mabn)
      [ -f "$mabn_r50" ] || { echo "$name needs the ImageNet MABN ResNet-50 (--imagenet-mabn; scripts/reproduce_imagenet.sh --table batch trains it): $mabn_r50 not found" >&2; exit 2; }
      extra=(MODEL.BACKBONE_WEIGHTS "$mabn_r50") ;;
    --torchvision-r50)
      [ -n "$tv_r50" ] && [ -f "$tv_r50" ] || { echo "$name needs torchvision ResNet-50 weights: --torchvision-r50 /path/to/resnet50.pth" >&2; exit 2; }
      extra=(MODEL.BACKBONE_WEIGHTS "$tv_r50") ;;
  esac
  train_config det/train.py "det/$name" "${extra[@]}" "$@"
done
"$PY" scripts/collect_results.py --only coco --coco "$out"
