#!/usr/bin/env bash
# The demo: build a tiny base model offline, make two LoRA adapters for it, register them,
# promote, roll back and read the history. Everything lands under $DEMO_DIR (default .demo).
set -euo pipefail
lorafleet=${LORAFLEET:-.venv/bin/lorafleet}
dir=${DEMO_DIR:-.demo}
rm -rf "$dir"
mkdir -p "$dir"
export LORAFLEET_HOME="$dir/registry" LORAFLEET_ACTOR=demo
step() { printf '\n== %s\n$ lorafleet %s\n' "$1" "${*:2}"; "$lorafleet" "${@:2}"; }

step "build a tiny Llama base model with its own tokenizer (no downloads)" \
  base tiny --out "$dir/base"
step "write two LoRA adapters for it (seeded random weights)" \
  base adapter --base "$dir/base" --out "$dir/support-a" --rank 8 --seed 1
"$lorafleet" base adapter --base "$dir/base" --out "$dir/support-b" --rank 8 --seed 2
step "create a registry bound to the base's fingerprint" registry init --base "$dir/base"
step "register version 1" registry register support "$dir/support-a" --reason "first cut"
step "register version 2" registry register support "$dir/support-b" --reason "more data"
step "promote version 1 to production" registry promote support 1 --reason launch
step "promote version 2" registry promote support 2 --reason "eval +3%"
step "send 10% of traffic to a canary" registry promote support 1 --to canary --weight 0.1
step "roll production back" registry rollback support --reason "latency regression"
step "the adapters" registry list
step "what production serves now" registry show support
step "the history of every alias move" registry history support
step "check the registry's files and database" registry fsck --verify
printf '\nDemo files are in %s; registry at %s\n' "$dir" "$LORAFLEET_HOME"
