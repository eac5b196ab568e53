//! Names and addresses derived from a pod's identity, so every command finds the same objects
//! without keeping extra state.

use std::net::Ipv4Addr;

/// Prefix of every host-side veth Weft makes.
pub const VETH_PREFIX: &str = "weft";

/// The host end of a pod's veth: `weft` + 11 hex digits of a hash of (container id, ifname),
/// 15 characters in all (IFNAMSIZ - 1). 44 bits keep collisions out of reach on one node.
pub fn host_veth(container_id: &str, ifname: &str) -> String {
    let h = fnv1a(container_id.bytes().chain([b'/']).chain(ifname.bytes()));
    format!("{VETH_PREFIX}{:011x}", h >> 20)
}

/// FNV-1a (64 bits) of the bytes: stable across releases and platforms, unlike std's hasher, for
/// what Weft derives from names and must derive alike everywhere (veth names, a node's first
/// subnet candidate, the Services digest).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The alias set on a host veth, `weft/<network>/<container id>/<ifname>`: it marks the link as
/// Weft's and says whose it is, so GC can find orphans even without an IPAM record. None of the
/// three parts may contain '/' (CNI spec rules for names, ids and interface names).
pub fn veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("weft/{network}/{container_id}/{ifname}")
}

/// The longest alias the kernel keeps (IFALIASZ 256, less the NUL sent with it, less one: it
/// refuses, never truncates).
pub const MAX_ALIAS: usize = 254;

/// Whether a link with this alias is a host veth of `network`'s pods.
pub fn is_network_veth(alias: Option<&str>, network: &str) -> bool {
    alias
        .and_then(parse_veth_alias)
        .is_some_and(|(net, _, _)| net == network)
}

/// Parses an alias made by `veth_alias`: (network, container id, ifname).
pub fn parse_veth_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let mut parts = alias.strip_prefix("weft/")?.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// The pod's MAC, derived from its IP (0a:58 + the four address bytes, the scheme OVN-Kubernetes
/// uses): a reused IP keeps its MAC, so stale ARP entries elsewhere stay right.
pub fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// In routed mode every host veth has this MAC and pods reach their gateway 169.254.1.1 through a
/// permanent neighbour entry for it, so no ARP is needed for the gateway (Calico's convention).
pub const ROUTED_HOST_MAC: [u8; 6] = [0xee; 6];

/// The pods' gateway in routed mode: link-local, never on the wire.
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_is_stable_short_and_distinct() {
        let a = host_veth("abc123", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weft"));
        assert_eq!(a, host_veth("abc123", "eth0"));
        assert_ne!(a, host_veth("abc123", "eth1"));
        assert_ne!(a, host_veth("abc124", "eth0"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(host_veth("ab", "c"), host_veth("a", "bc"));
    }

    #[test]
    fn alias_round_trip() {
        let a = veth_alias("weft", "c-1.x_y", "eth0");
        assert_eq!(parse_veth_alias(&a), Some(("weft", "c-1.x_y", "eth0")));
        assert_eq!(parse_veth_alias("other/x/y/z"), None);
    }

    #[test]
    fn pod_mac_from_ip() {
        assert_eq!(
            pod_mac(Ipv4Addr::new(10, 244, 1, 5)),
            [0x0a, 0x58, 10, 244, 1, 5]
        );
    }
}
