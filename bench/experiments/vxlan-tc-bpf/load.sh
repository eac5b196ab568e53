#!/usr/bin/env bash
# An experiment, not part of Weft (docs/benchmarks.md, "VXLAN at tc in eBPF"): replaces the kernel
# vxlan device's encapsulation (tc egress on weft.vxlan) and decapsulation (tc ingress on eth0) in a
# two-node VXLAN lab with vx.c, to measure what skipping the outer packet's trip through the stack
# is worth. Needs clang and libbpf-dev.
#   weftctl lab --name bx up --nodes 2 --pods 1 --backend vxlan
#   bench/experiments/vxlan-tc-bpf/load.sh bx on     # off: remove the programs
set -euo pipefail
LAB=$1 MODE=${2:-on}
DIR=$(cd "$(dirname "$0")" && pwd)
OBJ=$(mktemp -d)
trap 'rm -rf "$OBJ"' EXIT
mac() { ip netns exec "weftlab-$LAB-n-$1" cat "/sys/class/net/$2/address"; }
idx() { ip netns exec "weftlab-$LAB-n-$1" cat "/sys/class/net/$2/ifindex"; }
cmac() { echo "0x${1//:/, 0x}"; }
ip_be() { python3 -c "import socket,struct; print(hex(struct.unpack('<I', socket.inet_aton('$1'))[0]))"; }
for pair in "node1 node2 10.100.0.11 10.100.0.12" "node2 node1 10.100.0.12 10.100.0.11"; do
  read -r me peer lip pip <<<"$pair"
  ns="weftlab-$LAB-n-$me"
  ip netns exec "$ns" tc qdisc del dev weft.vxlan clsact 2>/dev/null || true
  ip netns exec "$ns" tc qdisc del dev eth0 clsact 2>/dev/null || true
  [ "$MODE" = off ] && continue
  clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c "$DIR/vx.c" -o "$OBJ/$me.o" \
    -DUL_SMAC="$(cmac "$(mac "$me" eth0)")" -DUL_DMAC="$(cmac "$(mac "$peer" eth0)")" \
    -DVX_MAC="$(cmac "$(mac "$me" weft.vxlan)")" -DUL_IFINDEX="$(idx "$me" eth0)" \
    -DVX_IFINDEX="$(idx "$me" weft.vxlan)" -DLOCAL_IP="$(ip_be "$lip")" -DPEER_IP="$(ip_be "$pip")"
  ip netns exec "$ns" tc qdisc add dev weft.vxlan clsact
  ip netns exec "$ns" tc filter add dev weft.vxlan egress bpf da obj "$OBJ/$me.o" sec tc program encap
  ip netns exec "$ns" tc qdisc add dev eth0 clsact
  ip netns exec "$ns" tc filter add dev eth0 ingress bpf da obj "$OBJ/$me.o" sec tc program decap
done
