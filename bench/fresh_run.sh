#!/usr/bin/env bash
# The README's first command on a fresh clone in a fresh virtual environment:
# times the install and `lldm-dpo run` separately.
#   bash bench/fresh_run.sh            (clones this checkout's HEAD into a temp folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/lldm-dpo"
cd "$work/lldm-dpo"
python3 -m venv .venv
source .venv/bin/activate
start=$(date +%s.%N)
pip install -q torch==2.13.0 && pip install -q -e .
mid=$(date +%s.%N)
lldm-dpo run
end=$(date +%s.%N)
python3 -c "import sys; s, m, e = map(float, sys.argv[1:4]); print(f'install {m - s:.1f} s; lldm-dpo run {e - m:.1f} s (wall, fresh clone, {sys.argv[4]} cores, load {sys.argv[5]})')" \
    "$start" "$mid" "$end" "$(nproc)" "$(cut -d' ' -f1 /proc/loadavg)"
