#!/usr/bin/env bash
# Ship trained zoo models: copy runs/zoo/RUN into models/NAME, evaluate (metrics.json), write the card.
#   bash analyses/ship.sh NAME ...        (RUN = NAME)
#   bash analyses/ship.sh RUN:NAME ...    (a run shipped under another name, e.g. mult-3x3-v2:mult-3x3)
set -euo pipefail
cd "$(dirname "$0")/.."
PK=.venv/bin/probekit
names=()
for arg in "$@"; do
  run=${arg%%:*}
  name=${arg##*:}
  names+=("$name")
  src=runs/zoo/$run
  [ -f "$src/model.safetensors" ] || { echo "skip $name: not trained"; continue; }
  mkdir -p models/$name
  cp "$src/model.safetensors" "$src/config.json" "$src/train_log.jsonl" models/$name/
  .venv/bin/python analyses/move_overrides.py models/$name/config.json  # training-only fields out of the eval task
  case $name in
    sort-*) lengths=10,20,30,50,100 ;;
    mult-extrap) lengths=1,2,3,4,5 ;;
    *) lengths=$(.venv/bin/python -c "import json;print(json.load(open('models/$name/config.json'))['task']['digits'])") ;;
  esac
  $PK eval --model "$name" --lengths "$lengths" --n 500 --seed 0 --save-metrics --overwrite
done
.venv/bin/python analyses/make_cards.py "${names[@]}"
