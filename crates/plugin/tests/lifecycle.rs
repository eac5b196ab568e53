//! GC, STATUS, VERSION, idempotent DEL, fixed addresses and rollback of a failed ADD.

mod common;
use common::*;
use serde_json::json;
use weft_cni::error::code;

#[test]
fn gc_releases_what_is_not_valid() {
    let node = Node::new("gc-host");
    let conf = node.conf("bridge", "10.244.4.0/24");
    let pods: Vec<Ns> = (0..3).map(|i| Ns::new(&format!("gc-pod{i}"))).collect();
    let results: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.add(&conf, p, &format!("gc{i}")).unwrap())
        .collect();
    assert_eq!(node.weft_veths().len(), 3);
    // An orphan veth of this network with no IPAM record (an ADD that died half way).
    let orphan_pod = Ns::new("gc-orphan");
    node.host.ip(&[
        "link",
        "add",
        "weftorphan",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &orphan_pod.name,
    ]);
    node.host
        .ip(&["link", "set", "weftorphan", "alias", "weft/weft/ghost/eth0"]);
    // A veth of another network must survive.
    node.host.ip(&[
        "link",
        "add",
        "weftother",
        "type",
        "veth",
        "peer",
        "name",
        "otherpeer",
    ]);
    node.host.ip(&[
        "link",
        "set",
        "weftother",
        "alias",
        "weft/othernet/ghost/eth0",
    ]);

    // A pod whose address record is lost (an ADD that died before writing it): its veth is found
    // by the alias ADD gave it.
    let made = results[2]["interfaces"][0]["name"].as_str().unwrap();
    let shown = node.host.ip(&["link", "show", made]);
    assert!(shown.contains("alias weft/weft/gc2/eth0"), "{shown}");
    let ipam = node.data_dir().join("weft");
    std::fs::remove_file(ipam.join(result_ip(&results[2]).to_string())).unwrap();
    for e in std::fs::read_dir(ipam.join("by-attachment")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().contains("gc2") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    assert_eq!(node.ipam_records().len(), 4, "{:?}", node.ipam_records());

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc0", "ifname": "eth0"}]);
    node.exec("GC", None, &gc).expect("GC");

    let left = node.weft_veths();
    let keep = results[0]["interfaces"][0]["name"].as_str().unwrap();
    assert!(
        left.contains(&keep.to_string()),
        "valid attachment kept: {left:?}"
    );
    assert!(
        !left.contains(&"weftorphan".to_string()),
        "orphan swept: {left:?}"
    );
    assert!(
        left.contains(&"weftother".to_string()),
        "other network untouched: {left:?}"
    );
    assert_eq!(left.len(), 2, "{left:?}");
    let records = node.ipam_records();
    assert!(
        records.contains(&result_ip(&results[0]).to_string()),
        "{records:?}"
    );
    assert_eq!(
        records.len(),
        2,
        "one record + its index entry: {records:?}"
    );
    // The kept pod still works.
    let r = Responder::start(&pods[0], result_ip(&results[0]), 80, "kept");
    assert_eq!(
        tcp_probe(&node.host, r.addr).expect("host reaches the kept pod"),
        "kept"
    );
    // GC without the list is a config error, not "release everything".
    let e = node.exec("GC", None, &conf).unwrap_err();
    assert_eq!(e.code, code::INVALID_CONFIG);
    assert!(e.msg.contains("cni.dev/valid-attachments"), "{e}");
}

#[test]
fn status_and_version() {
    let node = Node::new("status-host");
    // No subnet in the conf and no subnet.env yet: not available (50).
    let mut conf = node.conf("bridge", "10.244.5.0/24");
    conf.as_object_mut().unwrap().remove("subnet");
    conf.as_object_mut().unwrap().remove("mode");
    let e = node.exec("STATUS", None, &conf).unwrap_err();
    assert_eq!(e.code, code::PLUGIN_NOT_AVAILABLE, "{e}");
    assert!(e.msg.contains("subnet.env"), "{e}");
    // ADD in the same state asks the runtime to try again later (11).
    let pod = Ns::new("status-pod");
    let e = node.add(&conf, &pod, "st").unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    // Once the agent writes subnet.env, STATUS is fine and ADD takes its subnet and MTU.
    std::fs::create_dir_all(node.run_dir()).unwrap();
    std::fs::write(
        node.run_dir().join("subnet.env"),
        "WEFT_SUBNET=10.244.5.0/24\nWEFT_MTU=1400\nWEFT_MODE=routed\nWEFT_NETWORK_NAME=weft\n",
    )
    .unwrap();
    node.exec("STATUS", None, &conf)
        .expect("STATUS with subnet.env");
    let r = node.add(&conf, &pod, "st").unwrap();
    assert!(result_ip(&r).to_string().starts_with("10.244.5."));
    assert_eq!(
        r["ips"][0]["gateway"], "169.254.1.1",
        "mode from subnet.env"
    );
    assert!(pod.ip(&["link", "show", "eth0"]).contains("mtu 1400"));
    node.del(&conf, &pod, "st").unwrap();

    let v = node
        .exec("VERSION", None, &json!({"cniVersion": "0.4.0"}))
        .unwrap()
        .unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn result_follows_the_conf_version() {
    let node = Node::new("ver-host");
    let pod = Ns::new("ver-pod");
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = node.conf("bridge", "10.244.6.0/24");
        conf["cniVersion"] = json!(v);
        let r = node.add(&conf, &pod, "ver").unwrap();
        assert_eq!(r["cniVersion"], v);
        let has_version = r["ips"][0].get("version").is_some();
        assert_eq!(has_version, v.starts_with("0."), "{v}: {r}");
        let mut check = conf.clone();
        check["prevResult"] = r;
        let checked = node.exec("CHECK", Some(&rt(&pod, "ver")), &check);
        if v.starts_with("0.3") {
            // CHECK exists since 0.4.0.
            assert_eq!(checked.unwrap_err().code, code::INCOMPATIBLE_VERSION, "{v}");
        } else {
            checked.unwrap_or_else(|e| panic!("CHECK at {v}: {e}"));
        }
        if v != "1.1.0" {
            let e = node.exec("STATUS", None, &conf).unwrap_err();
            assert_eq!(
                e.code,
                code::INCOMPATIBLE_VERSION,
                "STATUS exists since 1.1.0"
            );
        }
        node.del(&conf, &pod, "ver").unwrap();
    }
}

#[test]
fn del_is_idempotent() {
    let node = Node::new("del-host");
    let conf = node.conf("bridge", "10.244.7.0/24");
    let pod = Ns::new("del-pod");
    // Unknown container: success.
    node.del(&conf, &pod, "never-added").unwrap();
    // Netns already gone: success, and the address is released.
    let r = node.add(&conf, &pod, "gone").unwrap();
    let path = pod.path();
    drop(pod);
    let mut rc = rt(&Ns::new("del-other"), "gone");
    rc.netns = path;
    node.exec("DEL", Some(&rc), &conf).unwrap();
    assert_eq!(node.ipam_records(), Vec::<String>::new(), "{r}");
    // No CNI_NETNS at all: success.
    let mut no_ns = rt(&Ns::new("del-x"), "never");
    no_ns.netns = std::path::PathBuf::new();
    node.exec("DEL", Some(&no_ns), &conf).unwrap();
}

#[test]
fn fixed_addresses() {
    let node = Node::new("fixed-host");
    let mut conf = node.conf("bridge", "10.244.8.0/24");
    conf["capabilities"] = json!({"ips": true});
    let a = Ns::new("fixed-a");
    let b = Ns::new("fixed-b");
    // CNI_ARGS IP=
    let mut rc = rt(&a, "fa");
    rc.args = vec![("IP".into(), "10.244.8.77".into())];
    let r = node.exec("ADD", Some(&rc), &conf).unwrap().unwrap();
    assert_eq!(result_ip(&r).to_string(), "10.244.8.77");
    // The same address for another container is taken (101), and nothing is left behind.
    let mut rc = rt(&b, "fb");
    rc.args = vec![("IP".into(), "10.244.8.77".into())];
    let e = node.exec("ADD", Some(&rc), &conf).unwrap_err();
    assert_eq!(e.code, code::ADDRESS_IN_USE, "{e}");
    assert!(e.msg.contains("10.244.8.77") && e.msg.contains("fa"), "{e}");
    // runtimeConfig.ips (the "ips" capability).
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({"ips": ["10.244.8.78/24"]});
    let r = node.add(&c, &b, "fb").unwrap();
    assert_eq!(result_ip(&r).to_string(), "10.244.8.78");
    assert_eq!(node.weft_veths().len(), 2);
    node.del(&conf, &a, "fa").unwrap();
    node.del(&conf, &b, "fb").unwrap();
    assert_eq!(node.ipam_records(), Vec::<String>::new());
}

#[test]
fn failed_add_rolls_back() {
    let node = Node::new("rb-host");
    let conf = node.conf("bridge", "10.244.9.0/24");
    let pod = Ns::new("rb-pod");
    // eth0 already exists in the pod: the veth cannot be made, and nothing may leak.
    pod.ip(&["link", "add", "eth0", "type", "bridge"]);
    let e = node.add(&conf, &pod, "rb").unwrap_err();
    assert_eq!(e.code, code::KERNEL, "{e}");
    assert!(e.msg.contains("eth0"), "names the interface: {e}");
    node.wait_no_veths();
    assert_eq!(node.ipam_records(), Vec::<String>::new());
    pod.ip(&["link", "del", "eth0"]);
}

#[test]
fn failure_after_the_veth_exists_rolls_back() {
    for (point, mode) in [
        ("after-veth", "routed"),
        ("after-pod-address", "routed"),
        ("after-veth", "bridge"),
        ("after-pod-address", "bridge"),
    ] {
        let node = Node::new("rb2-host");
        let conf = node.conf(mode, "10.244.10.0/24");
        let pod = Ns::new("rb2-pod");
        let mut faulty = node.invoker.clone();
        faulty.env.push(("WEFT_FAULT".into(), point.into()));
        let e = faulty
            .exec("weft", "ADD", Some(&rt(&pod, "rb2")), &conf)
            .unwrap_err();
        assert!(e.msg.contains(point), "{e}");
        assert_eq!(node.weft_veths(), Vec::<String>::new(), "{point}");
        assert_eq!(node.ipam_records(), Vec::<String>::new(), "{point}");
        assert!(!pod.links().contains(&"eth0".to_string()), "{point}");
        assert_eq!(
            node.host.ip(&["route", "show", "proto", "201"]).trim(),
            "",
            "{point}"
        );
    }
}

#[test]
fn a_bridge_name_taken_by_another_device_is_refused() {
    let node = Node::new("br-host");
    let conf = node.conf("bridge", "10.244.11.0/24");
    node.host.ip(&[
        "link", "add", "weft0", "type", "veth", "peer", "name", "notweft",
    ]);
    let pod = Ns::new("br-pod");
    let e = node.add(&conf, &pod, "br").unwrap_err();
    assert_eq!(e.code, code::KERNEL);
    assert!(
        e.msg.contains("weft0") && e.msg.contains("not a bridge"),
        "{e}"
    );
    assert_eq!(node.ipam_records(), Vec::<String>::new());
}

/// Runs `weft reap-link INDEX NAME` by hand in the node's host namespace.
fn run_reaper(node: &Node, index: &str, name: &str) {
    let reaper = std::process::Command::new("ip")
        .args(["netns", "exec", &node.host.name])
        .arg(weft_bin())
        .args([weft_plugin::reap::ARG, index, name])
        .status()
        .unwrap();
    assert!(reaper.success());
}

#[test]
fn a_late_reaper_spares_the_readded_veth() {
    // DEL leaves the veth's deletion to a detached reaper. Make the reaper as late as it can be:
    // run it by hand, for the old veth's index, after a re-ADD of the same attachment made a new
    // veth with the same name. It must delete nothing (it deletes by index and checks the name).
    let node = Node::new("reap-host");
    let mut conf = node.conf("bridge", "10.244.12.0/24");
    let pod = Ns::new("reap-pod");
    let r = node.add(&conf, &pod, "reap").unwrap();
    let hv = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    let old_index: String = node
        .host
        .ip(&["-o", "link", "show", &hv])
        .split(':')
        .next()
        .unwrap()
        .into();
    // Synchronous DEL here, so that only the hand-run reaper is in play.
    conf["asyncDelete"] = serde_json::json!(false);
    node.del(&conf, &pod, "reap").unwrap();
    assert_eq!(
        node.weft_veths(),
        Vec::<String>::new(),
        "asyncDelete=false deletes at once"
    );
    let r = node.add(&conf, &pod, "reap").unwrap();
    run_reaper(&node, &old_index, &hv);
    assert_eq!(node.weft_veths(), vec![hv.clone()], "the new veth survives");
    let resp = Responder::start(&pod, result_ip(&r), 80, "survivor");
    assert_eq!(tcp_probe(&node.host, resp.addr).unwrap(), "survivor");
    // And a reaper for the live index does delete it.
    let index: String = node
        .host
        .ip(&["-o", "link", "show", &hv])
        .split(':')
        .next()
        .unwrap()
        .into();
    run_reaper(&node, &index, &hv);
    assert_eq!(node.weft_veths(), Vec::<String>::new());
}

#[test]
fn the_host_namespace_is_not_a_pod() {
    let node = Node::new("self-host");
    let conf = node.conf("bridge", "10.244.13.0/24");
    let mut r = rt(&node.host, "self");
    r.ifname = "ens9".into();
    let e = node.exec("ADD", Some(&r), &conf).unwrap_err();
    assert_eq!(e.code, code::INVALID_ENV, "{e}");
    assert!(e.msg.contains("CNI_NETNS") && e.msg.contains("own"), "{e}");
    assert!(!node.host.links().contains(&"ens9".to_string()));
    assert_eq!(node.ipam_records(), Vec::<String>::new());
}

#[test]
fn a_second_attachment_keeps_the_pods_default_route() {
    let node = Node::new("multi-host");
    let first = node.conf("bridge", "10.244.14.0/24");
    let pod = Ns::new("multi-pod");
    let r1 = node.add(&first, &pod, "multi").unwrap();
    // A second network on another bridge, attached as net1.
    let mut second = node.conf("bridge", "10.244.15.0/24");
    second["name"] = serde_json::json!("second");
    second["bridge"] = serde_json::json!("weft1");
    let mut rc = rt(&pod, "multi");
    rc.ifname = "net1".into();
    let r2 = node.exec("ADD", Some(&rc), &second).unwrap().unwrap();
    let def = pod.ip(&["route", "show", "default"]);
    assert!(
        def.contains("via 10.244.14.1 dev eth0"),
        "first default kept: {def}"
    );
    assert!(!def.contains("net1"), "{def}");
    assert!(
        r2.get("routes")
            .is_none_or(|r| r.as_array().is_some_and(|a| a.is_empty())),
        "{r2}"
    );
    let mut check = second.clone();
    check["prevResult"] = r2;
    node.exec("CHECK", Some(&rc), &check)
        .expect("CHECK of the second attachment");
    let mut check = first.clone();
    check["prevResult"] = r1;
    node.exec("CHECK", Some(&rt(&pod, "multi")), &check)
        .expect("CHECK of the first");
}

/// weftd moves running pods to the node's new MTU when the underlay's changes: CHECK then takes
/// the node's current MTU (subnet.env) as well as the recorded one, but still wants both ends of
/// the veth alike.
#[test]
fn check_takes_the_mtu_the_node_moved_its_pods_to() {
    let node = Node::new("mtu-host");
    let pod = Ns::new("mtu-pod");
    std::fs::create_dir_all(node.run_dir()).unwrap();
    let env = |mtu: u32| {
        std::fs::write(
            node.run_dir().join("subnet.env"),
            format!("WEFT_SUBNET=10.244.9.0/24\nWEFT_MTU={mtu}\nWEFT_NETWORK_NAME=weft\n"),
        )
        .unwrap()
    };
    env(1450);
    let mut conf = node.conf("bridge", "10.244.9.0/24");
    conf.as_object_mut().unwrap().remove("subnet");
    let r = node.add(&conf, &pod, "mtu").unwrap();
    assert_eq!(r["interfaces"][1]["mtu"], 1450, "{r}");
    let host_veth = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    let mut check = conf.clone();
    check["prevResult"] = r;
    let check = || {
        node.exec("CHECK", Some(&rt(&pod, "mtu")), &check)
            .map(|_| ())
    };
    check().expect("CHECK as made");
    // Without its alias (GC and the agent find the veth by it): wrong.
    node.host.ip(&["link", "set", &host_veth, "alias", ""]);
    let e = check().unwrap_err();
    assert!(
        e.msg
            .contains("has alias \"\" instead of \"weft/weft/mtu/eth0\""),
        "{e}"
    );
    node.host
        .ip(&["link", "set", &host_veth, "alias", "weft/weft/mtu/eth0"]);
    check().expect("CHECK with the alias back");
    let set = |ns: &Ns, dev: &str, mtu: &str| ns.ip(&["link", "set", dev, "mtu", mtu]);
    // Moved to 1400 while the node still says 1450: wrong.
    set(&pod, "eth0", "1400");
    set(&node.host, &host_veth, "1400");
    let e = check().unwrap_err();
    assert_eq!(e.code, code::CHECK_FAILED, "{e}");
    assert!(
        e.msg
            .contains("pod interface eth0 has MTU 1400 instead of 1450"),
        "{e}"
    );
    // The node's MTU is 1400 now: right.
    env(1400);
    check().expect("CHECK at the node's new MTU");
    // Only one end moved: wrong, with both named.
    set(&pod, "eth0", "1300");
    let e = check().unwrap_err();
    for part in [
        "pod interface eth0 has MTU 1300 instead of 1450 (or the node's current 1400)",
        &format!("pod interface eth0 has MTU 1300, its host end {host_veth} 1400"),
    ] {
        assert!(e.msg.contains(part), "{e} lacks {part}");
    }
    node.del(&conf, &pod, "mtu").unwrap();
}
