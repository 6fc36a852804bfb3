# What reproduce_imagenet.sh and reproduce_coco.sh share; sourced by them from the repository root, after
# they have set $gpus, $out and $data.

PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

# table_configs TABLE [FIELD=VALUE ...]: the config names of a table of configs/paper_tables.yaml, one a line
table_configs() { "$PY" scripts/paper_tables.py configs "$@"; }

# table_field TABLE NAME FIELD: one field of one row of configs/paper_tables.yaml (empty when the row has none)
table_field() { "$PY" scripts/paper_tables.py field "$@"; }

# finished RUN_DIR: whether the run is done, as mabn.engine.output_dir.run_finished defines it (without importing
# torch): metrics.json says "finished": true AND the model_final.pth it vouches for is there (a run stopped between
# the two, e.g. by a full disk, is rerun)
finished() {
  [ -s "$1/model_final.pth" ] && [ -f "$1/metrics.json" ] &&
    "$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished") is True else 1)' "$1/metrics.json" 2>/dev/null
}

# train_config TRAINER CONFIG [KEY VALUE ...]: train configs/CONFIG.yaml (e.g. cls/mabn_b2) into $out/<name>
# with torchrun on $gpus processes; a finished run is skipped, an interrupted one resumes from its checkpoint.
train_config() {
  local trainer=$1 config=$2 name=${2#*/}
  shift 2
  local run="$out/$name"
  if finished "$run"; then echo "== $name: finished, skipped"; return 0; fi
  echo "== $name -> $run"
  # shellcheck disable=SC2086
  "$PY" -m torch.distributed.run --nproc_per_node="$gpus" ${TORCHRUN_ARGS:-} "$trainer" \
    --config "configs/$config.yaml" DATA.ROOT "$data" OUTPUT_DIR "$run" "$@"
}
