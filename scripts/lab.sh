#!/usr/bin/env bash
# The main job: install what Weft needs, build it, bring up a lab (a node and its pods, all
# network namespaces, wired by the real weft CNI plugin) and print its connectivity matrix.
# Needs root. Afterwards: target/release/weftctl lab status | exec POD -- CMD | down.
# Options are passed to `weftctl lab up` (e.g. --pods 5 --mode routed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "lab.sh: the lab creates network namespaces; run as root" >&2
  exit 1
fi
bash scripts/install-deps.sh
cargo build --release --locked -p weft-plugin -p weftctl
weftctl=target/release/weftctl
# A lab left from an earlier run is replaced.
"$weftctl" lab down >/dev/null 2>&1 || true
"$weftctl" lab up "$@"
"$weftctl" lab status
echo
"$weftctl" lab check
