#!/usr/bin/env bash
# The demo: build a tiny base model offline, fine-tune two versions of a sentiment adapter
# on generated data, register them, promote, send a canary, roll back and read the history.
# Everything lands under $DEMO_DIR (default .demo). About a minute on 2 CPU cores.
set -euo pipefail
lorafleet=${LORAFLEET:-.venv/bin/lorafleet}
dir=${DEMO_DIR:-.demo}
rm -rf "$dir"
mkdir -p "$dir"
export LORAFLEET_HOME="$dir/registry" LORAFLEET_ACTOR=demo
step() { printf '\n== %s\n$ lorafleet %s\n' "$1" "${*:2}"; "$lorafleet" "${@:2}"; }

step "build a tiny Llama base model with its own tokenizer (no downloads)" \
  base tiny --out "$dir/base"
step "create a registry bound to the base's fingerprint" registry init --base "$dir/base"
step "fine-tune a sentiment adapter and register it as version 1 (alias staging)" \
  tune examples/sentiment.yaml "base=$dir/base" "output.dir=$dir/runs/sentiment-1" \
  --register sentiment --alias staging
step "train version 2 with another seed" \
  tune examples/sentiment.yaml "base=$dir/base" "output.dir=$dir/runs/sentiment-2" \
  training.seed=1 --register sentiment
step "promote version 1 to production" registry promote sentiment 1 --reason launch
step "promote version 2" registry promote sentiment 2 --reason "new seed"
step "send 10% of traffic to a canary" \
  registry promote sentiment 1 --to canary --weight 0.1 --reason "compare seeds"
step "roll production back" registry rollback sentiment --reason "latency regression"
step "the adapters" registry list
step "what production serves now, with its metrics against the base" registry show sentiment
step "the history of every alias move" registry history sentiment
step "check the registry's files and database" registry fsck --verify
printf '\nDemo files are in %s (loss curves: %s/runs/*/adapter/loss.png)\n' "$dir" "$dir"
