#!/usr/bin/env bash
# The main job: install what Weft needs, build it, bring up a lab (3 nodes running weftd, 2 pods
# each wired by the real weft CNI plugin, an outside host; all network namespaces) and print its
# connectivity matrix, with the Services of examples/lab-services.yaml (ClusterIP from every pod
# and node, NodePort from outside through every node, a service without endpoints refused).
# Needs root. Afterwards: target/release/weftctl lab status | exec POD -- CMD | down.
# Options are passed to `weftctl lab up` (e.g. --backend host-gw --mode routed --store etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "lab.sh: the lab creates network namespaces; run as root" >&2
  exit 1
fi
bash scripts/install-deps.sh
cargo build --release --locked -p weft-plugin -p weft-agent -p weftctl
weftctl=target/release/weftctl
# A lab left from an earlier run is replaced.
"$weftctl" lab down >/dev/null 2>&1 || true
"$weftctl" lab up "$@"
"$weftctl" lab apply -f examples/lab-services.yaml
"$weftctl" lab status
echo
"$weftctl" lab services node1
echo
"$weftctl" lab check
