#!/usr/bin/env bash
# Set up everything this project needs on a fresh machine; fast and harmless when already done.
#   1. .venv with the torch / torchvision pinned in constraints.txt and this package (editable, with the train and test extras);
#   2. the offline datasets of the Debian packages dataset-fashion-mnist (the real-data reproduction)
#      and labelme-examples (a tiny real COCO-format set), when they are missing and apt can install them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the package definition changed.
stamp=".venv/.mabn-installed-$(cat setup.py constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package and its dependencies into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,test]'
  touch "$stamp"
fi

datasets=(dataset-fashion-mnist:/usr/share/datasets/fashion-mnist
          labelme-examples:/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco)
missing=()
for entry in "${datasets[@]}"; do
  [ -d "${entry#*:}" ] || missing+=("${entry%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  if [ "$sudo" != "none" ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; } \
      || echo "setup: WARNING: could not install ${missing[*]} with apt-get; the Fashion-MNIST reproduction and the tests on real data need them (README, 'Training': other ways to get them)" >&2
  else
    echo "setup: WARNING: ${missing[*]} missing and apt-get unusable here; the Fashion-MNIST reproduction and the tests on real data need them (README, 'Training': other ways to get them)" >&2
  fi
fi
