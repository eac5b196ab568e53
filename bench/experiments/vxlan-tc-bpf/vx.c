// An experiment, not part of Weft (see load.sh and docs/benchmarks.md): VXLAN encapsulation and
// decapsulation at tc, skipping the outer packet's trip through the stack. One peer per node; its
// addresses come from -D flags. GSO packets are left to the kernel device on receive: on 6.18,
// bpf_skb_adjust_room leaves their tunnel GSO state set after decapsulation, and they are then
// segmented in software before they reach the pod.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct vxlan_hdr { __u32 flags; __u32 vni; };

struct outer {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct vxlan_hdr vx;
	struct ethhdr inner;
} __attribute__((packed));

static const unsigned char ul_smac[6] = { UL_SMAC };
static const unsigned char ul_dmac[6] = { UL_DMAC };
static const unsigned char vx_mac[6] = { VX_MAC };

static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

SEC("tc")
int encap(struct __sk_buff *skb)
{
	struct outer h;
	__u32 len = skb->len;
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, 0, &h.inner, sizeof(h.inner)))
		return TC_ACT_OK;
	__u32 hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, sizeof(h) - sizeof(h.eth), BPF_ADJ_ROOM_MAC, flags))
		return TC_ACT_OK;
	__builtin_memcpy(h.eth.h_dest, ul_dmac, 6);
	__builtin_memcpy(h.eth.h_source, ul_smac, 6);
	h.eth.h_proto = bpf_htons(ETH_P_IP);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = 0;
	h.ip.tot_len = bpf_htons(len + 36);
	h.ip.id = 0;
	h.ip.frag_off = 0;
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.check = 0;
	h.ip.saddr = LOCAL_IP;
	h.ip.daddr = PEER_IP;
	h.ip.check = fold(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
	h.udp.source = bpf_htons(49152 | (hash & 0x3fff));
	h.udp.dest = bpf_htons(4789);
	h.udp.len = bpf_htons(len + 16);
	h.udp.check = 0;
	h.vx.flags = bpf_htonl(0x08000000);
	h.vx.vni = bpf_htonl(1 << 8);
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(UL_IFINDEX, 0);
}

SEC("tc")
int decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct outer *h = data;

	if ((void *)(h + 1) > end || skb->gso_segs > 1)
		return TC_ACT_OK;
	if (h->eth.h_proto != bpf_htons(ETH_P_IP) || h->ip.ihl != 5 ||
	    h->ip.protocol != IPPROTO_UDP || h->ip.daddr != LOCAL_IP ||
	    (h->ip.frag_off & bpf_htons(0x3fff)) || h->udp.dest != bpf_htons(4789) ||
	    h->vx.vni != bpf_htonl(1 << 8) || h->inner.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, -(int)(sizeof(*h) - sizeof(h->eth)), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_OK;
	struct ethhdr eth;
	__builtin_memcpy(eth.h_dest, vx_mac, 6);
	__builtin_memcpy(eth.h_source, ul_dmac, 6);
	eth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(VX_IFINDEX, BPF_F_INGRESS);
}

char _license[] SEC("license") = "GPL";
