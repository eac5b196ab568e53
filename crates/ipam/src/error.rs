use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

use crate::Attachment;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("no free address in {subnet} ({capacity} usable, all allocated)")]
    Exhausted { subnet: Ipv4Net, capacity: u32 },
    #[error("{ip} is already allocated to container {owner}")]
    AddressInUse { ip: Ipv4Addr, owner: Attachment },
    #[error(
        "container {attachment} already holds {held}; release it before requesting {requested}"
    )]
    AlreadyHolds {
        attachment: Attachment,
        held: Ipv4Addr,
        requested: Ipv4Addr,
    },
    #[error("{ip} is outside the subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    /// `what` is "network address", "gateway" or "broadcast address".
    #[error("{ip} is the {what} of {subnet} and cannot be allocated")]
    ReservedAddress {
        ip: Ipv4Addr,
        subnet: Ipv4Net,
        what: &'static str,
    },
    #[error(
        "subnet {subnet} is too small: a gateway and a pod address need a prefix of /30 or shorter"
    )]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("gateway {gateway} is {reason} {subnet}")]
    InvalidGateway {
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
        /// "outside the subnet", "the network address of" or "the broadcast address of".
        reason: &'static str,
    },
    #[error(
        "invalid network name {name:?}: must be a non-empty file name without '/', not '.' or '..'"
    )]
    InvalidNetworkName { name: String },
    #[error(
        "invalid attachment (container id {:?}, ifname {:?}): {reason}",
        .attachment.container_id,
        .attachment.ifname
    )]
    InvalidAttachment {
        attachment: Attachment,
        reason: &'static str,
    },
    #[error("{op} {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt IPAM file {}: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
}
