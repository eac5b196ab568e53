#!/usr/bin/env bash
# Installs what Weft's build, tests and lab need on a fresh Debian 12 machine (run as root).
# Rust itself is expected to be there already (rustup).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (apt-get)" >&2
  exit 1
fi
packages=(
  iproute2                   # ip: the tests inspect what the plugin made
  kmod                       # modprobe br_netfilter (below)
  nftables                   # nft: weft's own tables (agent, services, policy)
  iptables                   # the reference portmap plugin programs iptables
  conntrack                  # weftd deletes stale UDP flows of departed service endpoints
  containernetworking-plugins  # /usr/lib/cni: reference plugins for chaining tests and the benchmark
  iputils-ping
  iperf3 sockperf            # benchmarks
  etcd-server                # the etcd store: conformance tests and `weftctl lab up --store etcd`
  protobuf-compiler libprotobuf-dev  # etcd-client's build (protoc)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Bridge-mode Services need br_netfilter, as on any kubeadm node: weft0 (its own
# nf_call_iptables) passes bridged IPv4 through the IP hooks only with it (docs/services.md).
if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  modprobe br_netfilter
fi
