//! Links, addresses, routes and neighbours over rtnetlink.
//!
//! A `Netlink` is bound to the namespace its socket was opened in: `connect_in` opens the socket on
//! a throwaway thread inside the target namespace and hands it back, so the caller never changes
//! namespace itself. All methods need a tokio runtime (current-thread is enough).

use crate::{Error, Netns};
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourFlags;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

/// What Weft needs to know about a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The rtnetlink kind: "veth", "bridge", "vxlan", …; None for physical and loopback devices.
    pub kind: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub alias: Option<String>,
    /// The bridge (or bond) this link is a port of.
    pub controller: Option<u32>,
    pub up: bool,
    /// A VXLAN device's settings, as the kernel reports them.
    pub vxlan: Option<VxlanAttrs>,
    /// The other end of a veth: its index, and the id of its namespace as this one knows it
    /// (None: the same namespace).
    pub peer: Option<(u32, Option<i32>)>,
    /// A bridge's `nf_call_iptables`: whether its bridged IPv4 passes the IP hooks (with
    /// br_netfilter loaded).
    pub bridge_nf_call_iptables: Option<bool>,
}

/// What a VXLAN device was made with (the part Weft sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<Ipv4Addr>,
    /// The underlay device index.
    pub dev: Option<u32>,
    pub learning: Option<bool>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            mtu: 0,
            alias: None,
            controller: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            vxlan: None,
            peer: None,
            bridge_nf_call_iptables: None,
        };
        let (mut peer, mut peer_netns) = (None, None);
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Link(i) => peer = Some(*i),
                LinkAttribute::LinkNetNsId(n) => peer_netns = Some(*n),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    link.mac = Some(a[..].try_into().expect("length checked"))
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                                let mut v = VxlanAttrs::default();
                                for a in attrs {
                                    match a {
                                        InfoVxlan::Id(id) => v.vni = Some(*id),
                                        InfoVxlan::Port(p) => v.port = Some(*p),
                                        InfoVxlan::Local(ip) => v.local = Some(*ip),
                                        InfoVxlan::Link(dev) => v.dev = Some(*dev),
                                        InfoVxlan::Learning(l) => v.learning = Some(*l),
                                        _ => {}
                                    }
                                }
                                link.vxlan = Some(v);
                            }
                            LinkInfo::Data(InfoData::Bridge(attrs)) => {
                                link.bridge_nf_call_iptables = attrs.iter().find_map(|a| match a {
                                    InfoBridge::NfCallIpTables(on) => Some(*on),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if link.kind.as_deref() == Some("veth") {
            link.peer = peer.map(|i| (i, peer_netns));
        }
        link
    }
}

/// A veth pair whose peer is created directly inside another namespace, under its final name, in
/// one request: no temporary name, no move, no rename.
pub struct VethSpec<'a> {
    pub name: &'a str,
    pub mac: Option<[u8; 6]>,
    pub alias: Option<&'a str>,
    pub controller: Option<u32>,
    pub peer_name: &'a str,
    pub peer_mac: Option<[u8; 6]>,
    pub peer_netns: &'a Netns,
    pub mtu: Option<u32>,
}

/// A VXLAN device for unicast-only use: no learning, peers programmed as FDB entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    /// The underlay device index.
    pub dev: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl VxlanSpec {
    /// Whether `link` is this device as `add_vxlan` makes it, as far as the kernel reports it
    /// back: kind, MAC, VNI, port, local address, parent, and learning off. Not the MTU, which
    /// can be set in place (remaking the device drops every route, neighbour and FDB entry
    /// through it).
    pub fn matches(&self, link: &Link) -> bool {
        let made_as = VxlanAttrs {
            vni: Some(self.vni),
            port: Some(self.port),
            local: Some(self.local),
            dev: Some(self.dev),
            learning: Some(false),
        };
        link.kind.as_deref() == Some("vxlan")
            && link.mac == Some(self.mac)
            && link.vxlan.as_ref() == Some(&made_as)
    }
}

/// An IPv4 route as Weft installs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// Link scope: a directly connected destination (the /32 to a pod over its veth).
    pub scope_link: bool,
    pub onlink: bool,
    pub protocol: u8,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the caller's current namespace.
    pub fn connect() -> Result<Netlink, Error> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection whose socket lives in `ns`. Must be called inside a tokio runtime.
    pub fn connect_in(ns: &Netns) -> Result<Netlink, Error> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns
            .run(|| {
                // The socket registers with the runtime's reactor when it is made.
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|e| {
                Error::io(
                    format!("opening a netlink socket in {}", ns.path().display()),
                    e,
                )
            })?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let req = self.handle.link().get().match_name(name.to_string());
        first_link(req, || format!("looking up link {name}")).await
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, Error> {
        let req = self.handle.link().get().match_index(index);
        first_link(req, || format!("looking up link #{index}")).await
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("listing links", e))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates an up bridge with a fixed MAC, whose bridged IPv4 passes the IP hooks
    /// (`nf_call_iptables`, see [`Netlink::set_bridge_nf_call_iptables`]). A fixed MAC matters:
    /// otherwise the bridge takes the lowest port MAC, which changes as pods come and go and
    /// breaks the pods' ARP entry for the gateway. Returns false if the bridge already existed.
    pub async fn add_bridge(&self, name: &str, mac: [u8; 6]) -> Result<bool, Error> {
        let msg = LinkBridge::new(name)
            .address(mac.to_vec())
            .append_info_data(InfoBridge::NfCallIpTables(true))
            .up()
            .build();
        benign(
            self.handle.link().add(msg).execute().await,
            || format!("creating bridge {name}"),
            Error::is_exists,
        )
    }

    /// Creates an up VXLAN device with learning off. Fails with EEXIST if one of that name exists.
    pub async fn add_vxlan(&self, v: &VxlanSpec) -> Result<(), Error> {
        let msg = LinkVxlan::new(&v.name, v.vni)
            .dev(v.dev)
            .local(v.local)
            .port(v.port)
            .learning(false)
            .address(v.mac.to_vec())
            .mtu(v.mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("creating vxlan device {}", v.name), e))
    }

    /// A permanent FDB entry on a VXLAN device (`bridge fdb replace MAC dev D dst IP self
    /// permanent`): frames for MAC go to the peer's underlay IP.
    pub async fn replace_fdb(&self, index: u32, mac: [u8; 6], dst: Ipv4Addr) -> Result<(), Error> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                Error::netlink(
                    format!("adding fdb entry {} dst {dst}", crate::format_mac(&mac)),
                    e,
                )
            })
    }

    /// Permanent FDB entries (MAC, destination) on `index`.
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<([u8; 6], Ipv4Addr)>, Error> {
        let entries = self
            .permanent_entries(AddressFamily::Bridge, index, "listing fdb entries")
            .await?;
        Ok(entries.into_iter().map(|(ip, mac)| (mac, ip)).collect())
    }

    /// The permanent (IPv4 address, MAC) pairs of one neighbour table on `index`: the ARP table
    /// for `Inet`, the FDB for `Bridge` (where the address is the VXLAN destination).
    async fn permanent_entries(
        &self,
        family: AddressFamily,
        index: u32,
        op: &'static str,
    ) -> Result<Vec<(Ipv4Addr, [u8; 6])>, Error> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink(op, e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some(<[u8; 6]>::try_from(&l[..]).expect("length checked"))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(*v4),
                    // AF_BRIDGE entries carry NDA_DST as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((ip, mac));
            }
        }
        Ok(out)
    }

    pub async fn del_fdb(&self, index: u32, mac: [u8; 6], dst: Ipv4Addr) -> Result<(), Error> {
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        benign(
            self.handle.neighbours().del(msg).execute().await,
            || format!("deleting fdb entry {}", crate::format_mac(&mac)),
            Error::is_not_found,
        )
        .map(drop)
    }

    pub async fn del_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), Error> {
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        benign(
            self.handle.neighbours().del(msg).execute().await,
            || format!("deleting neighbour {ip}"),
            Error::is_not_found,
        )
        .map(drop)
    }

    pub async fn add_veth(&self, spec: &VethSpec<'_>) -> Result<(), Error> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.peer_name.to_string())
            .setns_by_fd(spec.peer_netns.fd().as_raw_fd());
        if let Some(mac) = spec.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        let mut b = LinkVeth::new(spec.name, spec.peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .up();
        if let Some(mac) = spec.mac {
            b = b.address(mac.to_vec());
        }
        if let Some(mtu) = spec.mtu {
            b = b.mtu(mtu);
        }
        if let Some(c) = spec.controller {
            b = b.controller(c);
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(|e| {
                Error::netlink(
                    format!(
                        "creating veth {} with peer {} in {}",
                        spec.name,
                        spec.peer_name,
                        spec.peer_netns.path().display()
                    ),
                    e,
                )
            })?;
        // The kernel ignores an alias in the message that creates a link: it is set after.
        if let Some(alias) = spec.alias {
            let msg = LinkUnspec::new_with_name(spec.name).alias(alias).build();
            self.set_link(msg, || format!("setting the alias of veth {}", spec.name))
                .await?;
        }
        Ok(())
    }

    /// RTM_SETLINK with `msg`; `op` says what it was for when it fails.
    async fn set_link(&self, msg: LinkMessage, op: impl FnOnce() -> String) -> Result<(), Error> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(op(), e))
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.set_link(msg, || format!("setting {name} up")).await
    }

    /// Whether this bridge's bridged IPv4 passes the IP hooks (with br_netfilter loaded). Pods on
    /// one bridge need it for Services: an endpoint's reply to a client on the same bridge is
    /// switched, and only there is its DNAT undone. Unlike the namespace-wide sysctl
    /// `net.bridge.bridge-nf-call-iptables`, it touches no other bridge.
    pub async fn set_bridge_nf_call_iptables(&self, name: &str, on: bool) -> Result<(), Error> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .append_info_data(InfoBridge::NfCallIpTables(on))
            .build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("setting nf_call_iptables of bridge {name}"), e))
    }

    /// Sets the MTU of a link of this connection's namespace. (Not of another namespace's by its
    /// id: in RTM_SETLINK a target namespace id means "move the link there".)
    pub async fn set_mtu(&self, index: u32, what: &str, mtu: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(msg, || format!("setting the MTU of {what} to {mtu}"))
            .await
    }

    /// The id by which this connection's namespace knows `ns` (as in [`Link::peer`]), or None if
    /// it has given it none.
    pub async fn netns_id(&self, ns: &Netns) -> Result<Option<i32>, Error> {
        use futures::StreamExt;
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
        use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
        use netlink_packet_route::RouteNetlinkMessage;
        let op = || format!("asking the id of namespace {}", ns.path().display());
        let mut msg = NsidMessage::default();
        msg.attributes = vec![NsidAttribute::Fd(ns.fd().as_raw_fd() as u32)];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut answers = self
            .handle
            .clone()
            .request(req)
            .map_err(|e| Error::netlink(op(), e))?;
        while let Some(m) = answers.next().await {
            match m.payload {
                NetlinkPayload::Error(e) => {
                    return Err(Error::netlink(op(), rtnetlink::Error::NetlinkError(e)))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    return Ok(m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                        _ => None,
                    }));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// The namespaces that this connection's namespace knows by `ids`, looked for among the
    /// named ones (/run/netns, where container runtimes keep pods' too) and then those of every
    /// process (/proc/*/ns/net). One pass, each namespace asked once, until all are found; an id
    /// not found is left out.
    pub async fn netns_by_ids(
        &self,
        ids: &std::collections::HashSet<i32>,
    ) -> Result<std::collections::HashMap<i32, Netns>, Error> {
        let mut found = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(found);
        }
        let mut seen = std::collections::HashSet::new();
        let named = crate::NamedNetns::list("")
            .into_iter()
            .map(|n| crate::NamedNetns::path(&n));
        let procs = std::fs::read_dir("/proc")
            .map_err(|e| Error::io("listing /proc", e))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .map(|e| e.path().join("ns/net"));
        for path in named.chain(procs) {
            if found.len() == ids.len() {
                break;
            }
            // Processes come and go, and not every file there is a namespace; one that cannot be
            // asked is passed over.
            let Ok(ns) = Netns::open(&path) else { continue };
            if !ns.inode().is_some_and(|i| seen.insert(i)) {
                continue;
            }
            if let Ok(Some(id)) = self.netns_id(&ns).await {
                if ids.contains(&id) {
                    found.insert(id, ns);
                }
            }
        }
        Ok(found)
    }

    /// Lets a frame leave a bridge port it came in on: a pod reaching itself through a service
    /// address is DNATed back out of its own port.
    pub async fn set_hairpin(&self, index: u32, name: &str, on: bool) -> Result<(), Error> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("setting hairpin on bridge port {name}"), e))
    }

    /// Takes a link down. Cheap, unlike deleting it: a down port carries no traffic, and IPv4
    /// routes through it go with it.
    pub async fn set_down(&self, index: u32, name: &str) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        self.set_link(msg, || format!("setting {name} down")).await
    }

    /// Deletes the link with this index (indexes are handed out cyclically, so unlike a name an
    /// index is not soon reused by a new link); returns false if it is already gone.
    pub async fn del_link_index(&self, index: u32) -> Result<bool, Error> {
        benign(
            self.handle.link().del(index).execute().await,
            || format!("deleting link #{index}"),
            Error::is_not_found,
        )
    }

    /// Deletes a link; returns false if there was none by that name.
    pub async fn del_link(&self, name: &str) -> Result<bool, Error> {
        let msg = LinkUnspec::new_with_name(name).build();
        benign(
            self.handle.link().del_with_message(msg).execute().await,
            || format!("deleting link {name}"),
            Error::is_not_found,
        )
    }

    /// Adds an address; an address already there is success (returns false).
    pub async fn add_address(&self, index: u32, name: &str, addr: IpNet) -> Result<bool, Error> {
        benign(
            self.handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .execute()
                .await,
            || format!("adding address {addr} to {name}"),
            Error::is_exists,
        )
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, Error> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("listing addresses", e))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    if let Ok(net) = IpNet::new(*ip, m.header.prefix_len) {
                        out.push(net);
                    }
                }
            }
        }
        Ok(out)
    }

    fn route_message(r: &RouteSpec) -> RouteMessage {
        let mut b = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .protocol(RouteProtocol::from(r.protocol));
        if let Some(gw) = r.gateway {
            b = b.gateway(gw);
        }
        if let Some(oif) = r.oif {
            b = b.output_interface(oif);
        }
        if r.scope_link {
            b = b.scope(RouteScope::Link);
        }
        if r.onlink {
            b = b.onlink();
        }
        b.build()
    }

    /// Installs a route, replacing one to the same destination.
    pub async fn replace_route(&self, r: &RouteSpec) -> Result<(), Error> {
        self.handle
            .route()
            .add(Self::route_message(r))
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("adding route {}", describe(r)), e))
    }

    /// Adds a route unless one to the same destination exists (then returns false and leaves
    /// the existing one alone).
    pub async fn add_route(&self, r: &RouteSpec) -> Result<bool, Error> {
        benign(
            self.handle
                .route()
                .add(Self::route_message(r))
                .execute()
                .await,
            || format!("adding route {}", describe(r)),
            Error::is_exists,
        )
    }

    /// IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<RouteSpec>, Error> {
        let req = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("listing routes", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.table == 254)
            .map(route_from_message)
            .collect())
    }

    /// Deletes a route; one that is not there is success.
    pub async fn del_route(&self, r: &RouteSpec) -> Result<(), Error> {
        let mut b = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .protocol(RouteProtocol::from(r.protocol));
        if let Some(oif) = r.oif {
            b = b.output_interface(oif);
        }
        if r.scope_link {
            b = b.scope(RouteScope::Link);
        }
        match self.handle.route().del(b.build()).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = Error::netlink(format!("deleting route {}", describe(r)), e);
                if e.errno() == Some(libc::ESRCH) || e.is_not_found() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// A permanent neighbour entry (IP → MAC) on `index`, replacing any other.
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                Error::netlink(
                    format!("adding neighbour {ip} lladdr {}", crate::format_mac(&mac)),
                    e,
                )
            })
    }

    /// Permanent neighbour entries (IP, MAC) on `index`.
    pub async fn permanent_neighbours(&self, index: u32) -> Result<Vec<(IpAddr, [u8; 6])>, Error> {
        let entries = self
            .permanent_entries(AddressFamily::Inet, index, "listing neighbours")
            .await?;
        Ok(entries
            .into_iter()
            .map(|(ip, mac)| (IpAddr::V4(ip), mac))
            .collect())
    }
}

/// The one link a filtered GET returns; a missing one is `None`, not an error.
async fn first_link(
    req: rtnetlink::LinkGetRequest,
    op: impl FnOnce() -> String,
) -> Result<Option<Link>, Error> {
    match req.execute().try_next().await {
        Ok(m) => Ok(m.map(|m| Link::from_message(&m))),
        Err(e) => benign(Err(e), op, Error::is_not_found).map(|_| None),
    }
}

/// `Ok(true)` if the request succeeded, `Ok(false)` if the kernel refused it in a way the
/// caller counts as success (`ok_if`: "not found" for deletes, "exists" for adds).
fn benign(
    r: Result<(), rtnetlink::Error>,
    op: impl FnOnce() -> String,
    ok_if: fn(&Error) -> bool,
) -> Result<bool, Error> {
    match r {
        Ok(()) => Ok(true),
        Err(e) => {
            let e = Error::netlink(op(), e);
            if ok_if(&e) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

fn route_from_message(m: &RouteMessage) -> RouteSpec {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    RouteSpec {
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length)
            .unwrap_or_else(|_| Ipv4Net::default()),
        gateway,
        oif,
        scope_link: m.header.scope == RouteScope::Link,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        protocol: m.header.protocol.into(),
    }
}

fn describe(r: &RouteSpec) -> String {
    let mut s = r.dst.to_string();
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = r.oif {
        s.push_str(&format!(" dev #{oif}"));
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    s
}
