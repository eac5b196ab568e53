//! Bad input gets the spec's error code, a message naming the field and value, and leaves nothing
//! behind: no address, no veth, no route.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use weft_cni::error::{code, CniError};

/// Runs the plugin binary directly with raw stdin (for input that is not even JSON).
fn raw(env: &[(&str, &str)], stdin: &[u8]) -> (i32, Value) {
    let mut child = Command::new(weft_bin())
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn malformed_json_is_a_decode_error() {
    let (status, v) = raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ],
        b"{\"cniVersion\": \"1.0.0\", \"name\": ",
    );
    assert_ne!(status, 0);
    assert_eq!(v["code"], code::DECODE, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("line 1"), "{v}");
}

#[test]
fn unknown_command_and_bad_env() {
    let (_, v) = raw(&[("CNI_COMMAND", "FROB")], b"{}");
    assert_eq!(v["code"], code::INVALID_ENV);
    assert!(v["msg"].as_str().unwrap().contains("FROB"), "{v}");
    let (_, v) = raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "bad/id"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ],
        b"{}",
    );
    assert_eq!(v["code"], code::INVALID_ENV);
    assert!(
        v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{v}"
    );
    let (_, v) = raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ok"),
            ("CNI_IFNAME", "a-name-longer-than-15"),
            ("CNI_NETNS", "/x"),
        ],
        b"{}",
    );
    assert_eq!(v["code"], code::INVALID_ENV);
    assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"), "{v}");
}

/// Each case: (what to change, expected code, a word the message must contain).
#[test]
fn bad_conf_and_env_leave_nothing_behind() {
    let node = Node::new("bad-host");
    let pod = Ns::new("bad-pod");
    let base = node.conf("bridge", "10.244.40.0/24");
    let expect = |e: CniError, c: u32, word: &str| {
        assert_eq!(e.code, c, "{e:?}");
        assert!(e.msg.contains(word), "message names {word:?}: {e:?}");
        assert_eq!(node.weft_veths(), Vec::<String>::new(), "after {e:?}");
        assert_eq!(node.ipam_records(), Vec::<String>::new(), "after {e:?}");
    };

    let mut c = base.clone();
    c["cniVersion"] = json!("9.9.9");
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INCOMPATIBLE_VERSION,
        "9.9.9",
    );

    let mut c = base.clone();
    c["subnet"] = json!("10.244.40.0/33");
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "10.244.40.0/33",
    );

    let mut c = base.clone();
    c["subnet"] = json!("10.244.40.0/31");
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "10.244.40.0/31",
    );

    let mut c = base.clone();
    c["mode"] = json!("overlay");
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "overlay",
    );

    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("name");
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "name",
    );

    // A network name so long that the host veth's alias would be over the kernel's 254 bytes
    // (weft/<name>/<container id>/<ifname>, here 12 bytes besides the name): refused before any
    // address is taken. At exactly 254 it works.
    let mut c = base.clone();
    c["name"] = json!("n".repeat(243));
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "255 bytes, over the kernel's 254",
    );
    assert!(!node.data_dir().join("n".repeat(243)).exists());
    let mut c = base.clone();
    c["name"] = json!("n".repeat(242));
    let r = node.add(&c, &pod, "b").expect("an alias of 254 bytes");
    let veth = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    let shown = node.host.ip(&["link", "show", &veth]);
    assert!(
        shown.contains(&format!("alias weft/{}/b/eth0", "n".repeat(242))),
        "{shown}"
    );
    node.del(&c, &pod, "b").unwrap();
    node.wait_no_veths();

    // Missing CNI_NETNS on ADD.
    let mut r = rt(&pod, "b");
    r.netns = Default::default();
    expect(
        node.exec("ADD", Some(&r), &base).unwrap_err(),
        code::INVALID_ENV,
        "CNI_NETNS",
    );

    // A netns path that does not exist.
    let mut r = rt(&pod, "b");
    r.netns = "/run/netns/wtest-does-not-exist".into();
    expect(
        node.exec("ADD", Some(&r), &base).unwrap_err(),
        code::INVALID_ENV,
        "wtest-does-not-exist",
    );

    // A fixed address outside the subnet, both ways of asking.
    let mut r = rt(&pod, "b");
    r.args = vec![("IP".into(), "10.9.9.9".into())];
    expect(
        node.exec("ADD", Some(&r), &base).unwrap_err(),
        code::INVALID_ENV,
        "10.9.9.9",
    );
    let mut c = base.clone();
    c["runtimeConfig"] = json!({"ips": ["10.9.9.8/24"]});
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "10.9.9.8",
    );
    let mut c = base.clone();
    c["runtimeConfig"] = json!({"ips": ["10.244.40.1"]});
    expect(
        node.add(&c, &pod, "b").unwrap_err(),
        code::INVALID_CONFIG,
        "gateway",
    );
}

#[test]
fn exhausted_subnet() {
    let node = Node::new("exh-host");
    // A /29 has 8 addresses: network, gateway, broadcast, and 5 for pods.
    let conf = node.conf("routed", "10.244.50.0/29");
    let pods: Vec<Ns> = (0..6).map(|i| Ns::new(&format!("exh{i}"))).collect();
    for (i, p) in pods.iter().take(5).enumerate() {
        node.add(&conf, p, &format!("e{i}")).unwrap();
    }
    let before = node.ipam_records();
    let e = node.add(&conf, &pods[5], "e5").unwrap_err();
    assert_eq!(e.code, code::IPAM_EXHAUSTED, "{e}");
    assert_eq!(
        node.ipam_records(),
        before,
        "the failed ADD changed no IPAM record"
    );
    assert!(e.msg.contains("10.244.50.0/29"), "{e}");
    assert_eq!(node.weft_veths().len(), 5, "the failed ADD made no veth");
    assert!(!pods[5].links().contains(&"eth0".to_string()));
    // Releasing one makes room again.
    node.del(&conf, &pods[0], "e0").unwrap();
    node.add(&conf, &pods[5], "e5").unwrap();
}
