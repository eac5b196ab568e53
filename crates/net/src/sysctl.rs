//! /proc/sys writes. Files under /proc/sys/net belong to the network namespace of the thread that
//! opens them, so these act on the caller's current namespace.

use crate::Error;
use std::fs;

fn path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Sets `key` (dotted, as `sysctl` writes it) to `value`, skipping the write when it already holds it.
pub fn set(key: &str, value: &str) -> Result<(), Error> {
    let p = path(key);
    if fs::read_to_string(&p).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(&p, value).map_err(|e| Error::io(format!("setting sysctl {key}={value}"), e))
}

pub fn get(key: &str) -> Result<String, Error> {
    fs::read_to_string(path(key))
        .map(|v| v.trim().to_string())
        .map_err(|e| Error::io(format!("reading sysctl {key}"), e))
}

/// Sets a per-interface IPv4 setting, e.g. `proxy_arp` or `forwarding`. Interface names may hold
/// dots, which the dotted form cannot express, so this writes the path directly.
pub fn set_ipv4_conf(ifname: &str, key: &str, value: &str) -> Result<(), Error> {
    let p = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
    if fs::read_to_string(&p).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(&p, value)
        .map_err(|e| Error::io(format!("setting net.ipv4.conf.{ifname}.{key}={value}"), e))
}

pub fn get_ipv4_conf(ifname: &str, key: &str) -> Result<String, Error> {
    let p = format!("/proc/sys/net/ipv4/conf/{ifname}/{key}");
    fs::read_to_string(&p)
        .map(|v| v.trim().to_string())
        .map_err(|e| Error::io(format!("reading net.ipv4.conf.{ifname}.{key}"), e))
}
