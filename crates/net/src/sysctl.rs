//! /proc/sys writes. Files under /proc/sys/net belong to the network namespace of the thread that
//! opens them, so these act on the caller's current namespace.

use crate::Error;
use std::fs;

fn path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Writes `value` to `path` unless it already holds it (a read is cheaper than a write that
/// makes the kernel walk every interface, as `ip_forward` does).
fn write_if_changed(path: &str, value: &str, what: &str) -> Result<(), Error> {
    if fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(path, value).map_err(|e| Error::io(format!("setting {what}={value}"), e))
}

/// Sets `key` (dotted, as `sysctl` writes it) to `value`, skipping the write when it already holds it.
pub fn set(key: &str, value: &str) -> Result<(), Error> {
    write_if_changed(&path(key), value, &format!("sysctl {key}"))
}

pub fn get(key: &str) -> Result<String, Error> {
    fs::read_to_string(path(key))
        .map(|v| v.trim().to_string())
        .map_err(|e| Error::io(format!("reading sysctl {key}"), e))
}

/// Sets a per-interface IPv4 setting, e.g. `proxy_arp` or `forwarding`. Interface names may hold
/// dots, which the dotted form cannot express, so this writes the path directly.
pub fn set_ipv4_conf(ifname: &str, key: &str, value: &str) -> Result<(), Error> {
    write_if_changed(
        &format!("/proc/sys/net/ipv4/conf/{ifname}/{key}"),
        value,
        &format!("net.ipv4.conf.{ifname}.{key}"),
    )
}

pub fn get_ipv4_conf(ifname: &str, key: &str) -> Result<String, Error> {
    let p = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
    fs::read_to_string(&p)
        .map(|v| v.trim().to_string())
        .map_err(|e| Error::io(format!("reading net.ipv4.conf.{ifname}.{key}"), e))
}
