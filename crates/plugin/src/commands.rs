//! The CNI commands of `weft`: ADD, DEL, CHECK, GC and STATUS (VERSION is answered in `run`).

use crate::config::{Mode, WeftConf};
use crate::{names, reap, wiring};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use weft_cni::conf::NetConf;
use weft_cni::env::{Command, Env};
use weft_cni::error::{code, CniError};
use weft_cni::result::{CniResult, Interface, IpConfig, Route};
use weft_ipam::{Attachment, Pool, Request, Store};
use weft_net::{Netlink, Netns};

/// The `cniVersion` the runtime sent, read leniently (for VERSION and for rendering errors in
/// the runtime's version even when the rest of the conf is bad).
pub fn stdin_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(String::from)
}

/// Runs one plugin invocation; `Some(json)` is printed on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        let v = stdin_version(stdin).unwrap_or_else(|| weft_cni::LATEST_VERSION.to_string());
        return Ok(Some(weft_cni::version::version_info(&v)));
    }
    let conf = weft_cni::conf::parse_conf(stdin)?;
    // Commands newer than the conf's version do not exist for it (SPEC: CHECK since 0.4.0,
    // GC and STATUS since 1.1.0).
    let since = match env.command {
        Command::Check => Some("0.4.0"),
        Command::Gc | Command::Status => Some("1.1.0"),
        _ => None,
    };
    if let Some(since) = since {
        if weft_cni::version::cmp_versions(&conf.cni_version, since).is_lt() {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion: {} has no {}; it exists since {since}",
                    conf.cni_version,
                    env.command.as_str()
                ),
            ));
        }
    }
    let wc = WeftConf::from_extra(&conf.name, &conf.extra)?;
    match env.command {
        Command::Add => add(env, &conf, &wc).map(Some),
        Command::Del => del(env, &wc).map(|()| None),
        Command::Check => check(env, &conf, &wc).map(|()| None),
        Command::Gc => gc(&conf, &wc).map(|()| None),
        Command::Status => status(&wc).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::INTERNAL, format!("starting the I/O runtime: {e}")))
}

fn kernel(e: weft_net::Error) -> CniError {
    CniError::new(code::KERNEL, e.to_string())
}

/// Where a requested fixed address came from, so an error can name the field.
#[derive(Clone, Copy)]
enum FixedSource {
    CniArgs,
    RuntimeConfig,
}

fn ipam_error(e: weft_ipam::Error, fixed: Option<FixedSource>) -> CniError {
    use weft_ipam::Error as E;
    let field = match fixed {
        Some(FixedSource::CniArgs) => "CNI_ARGS IP",
        Some(FixedSource::RuntimeConfig) => "runtimeConfig.ips",
        None => "",
    };
    match e {
        E::Exhausted { .. } => CniError::new(code::IPAM_EXHAUSTED, e.to_string()),
        E::AddressInUse { .. } | E::AlreadyHolds { .. } => {
            CniError::new(code::ADDRESS_IN_USE, format!("{field}: {e}"))
        }
        E::OutsideSubnet { .. } | E::ReservedAddress { .. } => match fixed {
            Some(FixedSource::CniArgs) => CniError::new(code::INVALID_ENV, format!("{field}: {e}")),
            _ => CniError::new(code::INVALID_CONFIG, format!("{field}: {e}")),
        },
        E::SubnetTooSmall { .. } | E::InvalidGateway { .. } | E::InvalidNetworkName { .. } => {
            CniError::new(code::INVALID_CONFIG, e.to_string())
        }
        E::InvalidAttachment { .. } => CniError::new(code::INVALID_ENV, e.to_string()),
        E::Io { .. } | E::Corrupt { .. } => CniError::new(code::IO, e.to_string()),
    }
}

/// The fixed address asked for, if any: CNI_ARGS `IP=` or the `ips` capability.
fn fixed_ip(env: &Env, conf: &NetConf) -> Result<Option<(Ipv4Addr, FixedSource)>, CniError> {
    if let Some(ip) = env.arg("IP") {
        let parsed = ip.parse::<Ipv4Addr>().map_err(|_| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS IP={ip:?} is not an IPv4 address"),
            )
        })?;
        return Ok(Some((parsed, FixedSource::CniArgs)));
    }
    let mut v4 = Vec::new();
    for s in &conf.runtime_config.ips {
        let addr = s.split('/').next().unwrap_or("");
        match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => v4.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("runtimeConfig.ips: {s:?} is not an IP address"),
                ))
            }
        }
    }
    match v4.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one, FixedSource::RuntimeConfig))),
        _ => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("runtimeConfig.ips: weft assigns one IPv4 address per interface, got {v4:?}"),
        )),
    }
}

fn attachment(env: &Env) -> Result<Attachment, CniError> {
    Ok(Attachment {
        container_id: env.container_id()?.to_string(),
        ifname: env.ifname()?.to_string(),
    })
}

fn open_netns(env: &Env) -> Result<Netns, CniError> {
    let path = env.netns()?;
    let ns = Netns::open(path).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {}: {e}", path.display()),
        )
    })?;
    // The plugin runs in the host's namespace: a "pod" there would rewire the node itself.
    if Netns::current().is_ok_and(|own| own.same_as(&ns)) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS {} is the plugin's own (host) network namespace",
                path.display()
            ),
        ));
    }
    Ok(ns)
}

fn store(wc: &WeftConf) -> Result<Store, CniError> {
    Store::open(&wc.data_dir, &wc.name).map_err(|e| {
        let e = ipam_error(e, None);
        CniError::new(
            e.code,
            format!("dataDir {}: {}", wc.data_dir.display(), e.msg),
        )
    })
}

fn add(env: &Env, conf: &NetConf, wc: &WeftConf) -> Result<Value, CniError> {
    let att = attachment(env)?;
    // Refused before anything is allocated: the kernel would refuse the alias only once the veth
    // exists.
    let alias = names::veth_alias(&wc.name, &att.container_id, &att.ifname);
    if alias.len() > names::MAX_ALIAS {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "name ({} bytes) with CNI_CONTAINERID ({} bytes) and CNI_IFNAME make the host \
                 veth's alias weft/<name>/<container id>/<ifname> {} bytes, over the kernel's {}: \
                 use a shorter network name",
                wc.name.len(),
                att.container_id.len(),
                alias.len(),
                names::MAX_ALIAS
            ),
        ));
    }
    let pod_ns = open_netns(env)?;
    let net = wc.network()?;
    let pool = Pool::new(net.subnet, net.gateway).map_err(|e| ipam_error(e, None))?;
    let fixed = fixed_ip(env, conf)?;
    let rt = runtime()?;
    let store = store(wc)?;
    let alloc = store
        .allocate(
            &pool,
            &Request {
                attachment: &att,
                fixed: fixed.map(|f| f.0),
                pod_namespace: env.arg("K8S_POD_NAMESPACE"),
                pod_name: env.arg("K8S_POD_NAME"),
            },
        )
        .map_err(|e| ipam_error(e, fixed.map(|f| f.1)))?;
    let id = wiring::PodIdentity {
        network: &wc.name,
        container_id: &att.container_id,
        ifname: &att.ifname,
    };
    let plan = wiring::plan(
        &id,
        net.mode,
        net.subnet,
        pool.gateway,
        alloc.ip,
        net.mtu,
        &wc.bridge,
        wc.hairpin,
    );

    let wired = rt.block_on(async {
        let host = Netlink::connect()?;
        let result = async {
            let pod = Netlink::connect_in(&pod_ns)?;
            wiring::apply(&plan, &host, &pod, &pod_ns).await
        }
        .await;
        if result.is_err() {
            // Roll back: the veth takes the pod end, its routes and sysctls with it.
            let _ = host.del_link(&plan.host_veth).await;
        }
        result
    });
    let applied = match wired {
        Ok(a) => a,
        Err(e) => {
            if !alloc.reused {
                let _ = store.release(&att);
            }
            return Err(kernel(e));
        }
    };

    let result = CniResult {
        interfaces: vec![
            Interface {
                name: plan.host_veth.clone(),
                mac: applied.host_mac.map(|m| weft_net::format_mac(&m)),
                mtu: Some(plan.mtu),
                sandbox: None,
            },
            Interface {
                name: plan.ifname.clone(),
                mac: Some(weft_net::format_mac(&plan.pod_mac)),
                mtu: Some(plan.mtu),
                sandbox: Some(pod_ns.path().display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            address: plan.address.into(),
            gateway: Some(plan.gateway.into()),
            interface: Some(1),
        }],
        routes: applied
            .pod_routes
            .iter()
            .map(|r| Route {
                dst: r.dst.into(),
                gw: r.gateway.map(Into::into),
                mtu: None,
                scope: None,
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    Ok(result.to_json(&conf.cni_version))
}

fn del(env: &Env, wc: &WeftConf) -> Result<(), CniError> {
    let att = attachment(env)?;
    let name = names::host_veth(&att.container_id, &att.ifname);
    let rt = runtime()?;
    // Cut the pod off before its address is released, so the address can never be live in two
    // pods at once; then hand the slow deletion to the reaper (see `reap`). A veth that vanishes
    // meanwhile (the runtime deleted the netns, which takes the pair with it) is success.
    let (host, index) = rt
        .block_on(async {
            let host = Netlink::connect()?;
            let index = match host.link(&name).await? {
                Some(l) if wc.async_delete => match host.set_down(l.index, &name).await {
                    Ok(()) => Some(l.index),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e),
                },
                Some(_) => {
                    host.del_link(&name).await?;
                    None
                }
                None => None,
            };
            Ok((host, index))
        })
        .map_err(kernel)?;
    store(wc)?.release(&att).map_err(|e| ipam_error(e, None))?;
    if let Some(index) = index {
        if reap::spawn(index, &name).is_err() {
            rt.block_on(host.del_link_index(index)).map_err(kernel)?;
        }
    }
    Ok(())
}

fn check(env: &Env, conf: &NetConf, wc: &WeftConf) -> Result<(), CniError> {
    let att = attachment(env)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult: CHECK needs the result of ADD",
        )
    })?;
    let prev = CniResult::from_json(prev)?;
    let ipc = prev
        .ips
        .iter()
        .find(|c| c.address.addr().is_ipv4())
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult.ips: no IPv4 address"))?;
    let ipnet::IpNet::V4(addr) = ipc.address else {
        unreachable!("filtered to IPv4")
    };
    let Some(IpAddr::V4(gateway)) = ipc.gateway else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("prevResult.ips: {addr} has no IPv4 gateway"),
        ));
    };
    let failed = |m: String| CniError::new(code::CHECK_FAILED, m);
    match store(wc)?.get(&att).map_err(|e| ipam_error(e, None))? {
        None => return Err(failed(format!("IPAM has no address for {att}"))),
        Some(r) if r.ip != addr.addr() => {
            return Err(failed(format!(
                "IPAM holds {} for {att} but prevResult says {}",
                r.ip,
                addr.addr()
            )))
        }
        Some(_) => {}
    }
    let pod_ns = open_netns(env)?;
    // The plan comes from prevResult and the IPAM record, not subnet.env: CHECK must not fail
    // while the agent restarts. A /32 is routed mode's signature.
    let mode = if addr.prefix_len() == 32 {
        Mode::Routed
    } else {
        Mode::Bridge
    };
    let id = wiring::PodIdentity {
        network: &wc.name,
        container_id: &att.container_id,
        ifname: &att.ifname,
    };
    let mtu = ipc
        .interface
        .and_then(|i| prev.interfaces.get(i))
        .and_then(|i| i.mtu);
    // Besides the recorded MTU, the one an ADD would give now: weftd moves running pods to the
    // node's new MTU when the underlay's changes. An unreadable subnet.env (the agent
    // restarting) leaves only the recorded one.
    let node_mtu = wc.current_mtu();
    let mut plan = wiring::plan(
        &id,
        mode,
        addr.trunc(),
        gateway,
        addr.addr(),
        mtu.unwrap_or(0),
        &wc.bridge,
        wc.hairpin,
    );
    // Only the routes ADD reported installing are expected.
    plan.pod_routes.retain(|r| {
        prev.routes
            .iter()
            .any(|pr| pr.dst == ipnet::IpNet::from(r.dst) && pr.gw == r.gateway.map(Into::into))
    });
    let problems = runtime()?
        .block_on(async {
            let host = Netlink::connect()?;
            let pod = Netlink::connect_in(&pod_ns)?;
            wiring::verify(&plan, &host, &pod, mtu.map(|m| (m, node_mtu))).await
        })
        .map_err(kernel)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(failed(problems.join("; ")))
    }
}

fn gc(conf: &NetConf, wc: &WeftConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "cni.dev/valid-attachments: GC needs the list of attachments to keep",
        )
    })?;
    let valid: Vec<Attachment> = valid
        .iter()
        .map(|a| Attachment {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let store = store(wc)?;
    let stale: Vec<Attachment> = store
        .list()
        .map_err(|e| ipam_error(e, None))?
        .iter()
        .map(|r| r.attachment())
        .filter(|a| !valid.contains(a))
        .collect();
    // Teardown keeps going past errors and reports them all at the end (SPEC: GC).
    let mut errors: Vec<String> = Vec::new();
    runtime()?.block_on(async {
        let host = match Netlink::connect() {
            Ok(h) => h,
            Err(e) => return errors.push(e.to_string()),
        };
        for a in &stale {
            if let Err(e) = host
                .del_link(&names::host_veth(&a.container_id, &a.ifname))
                .await
            {
                errors.push(e.to_string());
            }
        }
        // Veths of this network without an address record (an ADD that died between the two)
        // are found by their alias.
        match host.links().await {
            Err(e) => errors.push(e.to_string()),
            Ok(links) => {
                for link in links {
                    let Some((network, cid, ifname)) =
                        link.alias.as_deref().and_then(names::parse_veth_alias)
                    else {
                        continue;
                    };
                    let keep = valid
                        .iter()
                        .any(|a| a.container_id == cid && a.ifname == ifname);
                    if network == wc.name && !keep {
                        if let Err(e) = host.del_link(&link.name).await {
                            errors.push(e.to_string());
                        }
                    }
                }
            }
        }
    });
    if let Err(e) = store.gc(&valid) {
        errors.push(ipam_error(e, None).msg);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::KERNEL,
            format!("GC: {}", errors.join("; ")),
        ))
    }
}

fn status(wc: &WeftConf) -> Result<(), CniError> {
    let unavailable = |e: CniError| CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg);
    let net = wc.network().map_err(unavailable)?;
    Pool::new(net.subnet, net.gateway).map_err(|e| unavailable(ipam_error(e, None)))?;
    store(wc)
        .and_then(|s| s.check_writable().map_err(|e| ipam_error(e, None)))
        .map_err(unavailable)
}
