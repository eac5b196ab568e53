use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::Error;

/// The addresses one node hands to its pods: a subnet minus its network, broadcast and gateway
/// addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Pool {
    /// `subnet` is truncated to its network address; `gateway` defaults to the first host address.
    pub fn new(subnet: Ipv4Net, gateway: Option<Ipv4Addr>) -> Result<Pool, Error> {
        let subnet = subnet.trunc();
        // /31 (RFC 3021) and /32 have no room for both a gateway and a pod.
        if subnet.prefix_len() > 30 {
            return Err(Error::SubnetTooSmall { subnet });
        }
        let gateway = gateway.unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
        let reason = if !subnet.contains(&gateway) {
            Some("outside the subnet")
        } else if gateway == subnet.network() {
            Some("the network address of")
        } else if gateway == subnet.broadcast() {
            Some("the broadcast address of")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidGateway {
                gateway,
                subnet,
                reason,
            }),
            None => Ok(Pool { subnet, gateway }),
        }
    }

    /// Whether `ip` may be given to a pod.
    pub fn contains_usable(&self, ip: Ipv4Addr) -> bool {
        self.check_usable(ip).is_ok()
    }

    pub(crate) fn check_usable(&self, ip: Ipv4Addr) -> Result<(), Error> {
        let subnet = self.subnet;
        let what = if !subnet.contains(&ip) {
            return Err(Error::OutsideSubnet { ip, subnet });
        } else if ip == subnet.network() {
            "network address"
        } else if ip == subnet.broadcast() {
            "broadcast address"
        } else if ip == self.gateway {
            "gateway"
        } else {
            return Ok(());
        };
        Err(Error::ReservedAddress { ip, subnet, what })
    }

    /// How many pod addresses the pool has.
    pub fn capacity(&self) -> u32 {
        (self.hosts() - u64::from(self.is_host(self.gateway))) as u32
    }

    /// Addresses strictly between network and broadcast. The fields are public, so this must not
    /// assume `new` checked the prefix.
    fn hosts(&self) -> u64 {
        (1u64 << (32 - self.subnet.prefix_len())).saturating_sub(2)
    }

    fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip) && ip != self.subnet.network() && ip != self.subnet.broadcast()
    }

    /// Every usable address once, starting after `last` and wrapping around, so that a just
    /// released address is handed out again as late as possible.
    pub(crate) fn candidates_after(
        &self,
        last: Option<Ipv4Addr>,
    ) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.subnet.network()).wrapping_add(1);
        let hosts = self.hosts();
        let start = match last {
            Some(ip) if self.is_host(ip) => u64::from(u32::from(ip) - first) + 1,
            _ => 0,
        };
        (0..hosts)
            .map(move |i| Ipv4Addr::from(first + ((start + i) % hosts) as u32))
            .filter(move |ip| *ip != self.gateway)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn slash24_defaults() {
        let pool = Pool::new(net("10.244.1.77/24"), None).unwrap();
        assert_eq!(pool.subnet, net("10.244.1.0/24"));
        assert_eq!(pool.gateway, ip("10.244.1.1"));
        assert_eq!(pool.capacity(), 253);
        assert!(pool.contains_usable(ip("10.244.1.2")));
        assert!(pool.contains_usable(ip("10.244.1.254")));
        for reserved in ["10.244.1.0", "10.244.1.1", "10.244.1.255", "10.244.2.1"] {
            assert!(!pool.contains_usable(ip(reserved)), "{reserved}");
        }
    }

    #[test]
    fn slash30_has_one_pod_address() {
        let pool = Pool::new(net("192.168.0.4/30"), None).unwrap();
        assert_eq!(pool.capacity(), 1);
        assert_eq!(
            pool.candidates_after(None).collect::<Vec<_>>(),
            [ip("192.168.0.6")]
        );
    }

    #[test]
    fn slash31_and_slash32_rejected() {
        for s in ["10.0.0.0/31", "10.0.0.0/32"] {
            let err = Pool::new(net(s), None).unwrap_err();
            assert!(matches!(err, Error::SubnetTooSmall { .. }), "{err}");
            assert!(err.to_string().contains(s), "{err}");
        }
    }

    #[test]
    fn custom_gateway() {
        let pool = Pool::new(net("10.244.1.0/24"), Some(ip("10.244.1.254"))).unwrap();
        assert_eq!(pool.capacity(), 253);
        assert!(pool.contains_usable(ip("10.244.1.1")));
        assert!(!pool.contains_usable(ip("10.244.1.254")));
        let all: Vec<_> = pool.candidates_after(None).collect();
        assert_eq!(all.len(), 253);
        assert!(!all.contains(&ip("10.244.1.254")));
    }

    #[test]
    fn bad_gateway_named() {
        let cases = [
            (
                "10.9.0.1",
                "gateway 10.9.0.1 is outside the subnet 10.244.1.0/24",
            ),
            (
                "10.244.1.0",
                "gateway 10.244.1.0 is the network address of 10.244.1.0/24",
            ),
            (
                "10.244.1.255",
                "gateway 10.244.1.255 is the broadcast address of 10.244.1.0/24",
            ),
        ];
        for (gw, msg) in cases {
            let err = Pool::new(net("10.244.1.0/24"), Some(ip(gw))).unwrap_err();
            assert_eq!(err.to_string(), msg);
        }
    }

    #[test]
    fn candidates_wrap_after_last() {
        let pool = Pool::new(net("10.0.0.0/29"), None).unwrap();
        let after = |last| pool.candidates_after(last).collect::<Vec<_>>();
        let all = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip);
        assert_eq!(after(None), all);
        assert_eq!(
            after(Some(ip("10.0.0.4"))),
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"].map(ip)
        );
        assert_eq!(after(Some(ip("10.0.0.6"))), all);
        // A hint from another subnet (the node's subnet changed) restarts at the beginning.
        assert_eq!(after(Some(ip("10.1.0.4"))), all);
    }
}
