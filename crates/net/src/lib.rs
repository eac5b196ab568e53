//! Kernel effects for Weft: network namespaces, links, addresses, routes, neighbours and sysctls.
//!
//! Everything here talks to the kernel directly (netlink, setns, /proc/sys); nothing forks `ip`.
//! Callers compute what they want first and use these calls to apply it.

mod error;
pub mod netlink;
pub mod netns;
pub mod sysctl;

pub use error::Error;
pub use netlink::{Link, Netlink, RouteSpec, VethSpec, VxlanAttrs, VxlanSpec};
pub use netns::{NamedNetns, Netns, ScratchNetns};

/// Route protocol number that marks the routes the CNI plugin installs for pods
/// (`ip route show proto 201`), so a sweep never touches routes that others made. Unassigned in
/// iproute2's rt_protos, like the next one.
pub const ROUTE_PROTOCOL: u8 = 201;

/// Route protocol number of the agent's routes to peer subnets (`ip route show proto 202`). Its
/// own number, so the agent's reconciler owns exactly these and never mistakes a pod route for one.
pub const PEER_ROUTE_PROTOCOL: u8 = 202;

/// Formats a MAC address the way `ip link` prints it.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let mac = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05];
        assert_eq!(format_mac(&mac), "0a:58:0a:f4:01:05");
        assert_eq!(parse_mac("0a:58:0a:f4:01:05"), Some(mac));
        assert_eq!(parse_mac("0a:58:0a:f4:01"), None);
        assert_eq!(parse_mac("0a:58:0a:f4:01:05:06"), None);
        assert_eq!(parse_mac("0a:58:0a:f4:01:zz"), None);
    }
}
