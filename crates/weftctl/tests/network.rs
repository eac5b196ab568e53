//! `weftctl network show|set|reset` on a SQLite store of its own (no namespaces, no root): set
//! starts from the defaults or the record, checks what it writes, and names the nodes that still
//! run other settings.

use std::path::PathBuf;
use std::process::Command;
use weft_agent::backend::BackendKind;
use weft_agent::lease::{lease_key, Lease, VxlanSettings};
use weft_store::{SqliteStore, Store};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn network(store: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .arg("network")
        .args(args)
        .args(["--store", store])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn set_show_reset() {
    let dir = Dir(std::env::temp_dir().join(format!("weftctl-network-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let db = dir.0.join("store.db");
    let store = format!("sqlite://{}", db.display());

    let (ok, out) = network(&store, &["show"]);
    assert!(!ok && out.contains("no /weft/config/network"), "{out}");
    // The cluster CIDR must leave the agents' Service CIDR alone: 10.0.0.0/9 holds the default
    // 10.96.0.0/12; with the agents' own, it is fine.
    let (ok, out) = network(&store, &["set", "--cluster-cidr", "10.0.0.0/9"]);
    assert!(
        !ok && out.contains("--cluster-cidr 10.0.0.0/9 overlaps --service-cidr 10.96.0.0/12"),
        "{out}"
    );
    let (ok, out) = network(
        &store,
        &[
            "set",
            "--cluster-cidr",
            "10.0.0.0/9",
            "--service-cidr",
            "172.20.0.0/16",
        ],
    );
    assert!(ok, "{out}");
    // Before any agent: the defaults, with what is given.
    let (ok, out) = network(&store, &["set", "--cluster-cidr", "10.50.3.0/16"]);
    assert!(ok, "{out}");
    let (_, shown) = network(&store, &["show"]);
    let v: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"clusterCidr": "10.50.0.0/16", "subnetLen": 24, "backend": "vxlan",
            "vxlan": {"vni": 1, "port": 4789}})
    );

    // A node leasing under the recorded settings, one under others.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = SqliteStore::open(&db).await.unwrap();
        for (node, subnet) in [("n1", "10.50.1.0/24"), ("n2", "10.50.2.0/24")] {
            let l = Lease {
                node: node.into(),
                subnet: subnet.parse().unwrap(),
                underlay_ip: "10.100.0.2".parse().unwrap(),
                backend: BackendKind::Vxlan,
                vtep_mac: None,
                vxlan: Some(VxlanSettings {
                    vni: 1,
                    port: if node == "n1" { 4789 } else { 8472 },
                }),
            };
            let key = lease_key(l.subnet);
            s.put(&key, &serde_json::to_vec(&l).unwrap(), None)
                .await
                .unwrap();
        }
    });
    // From the record: only the port changes, and n1 (on 4789) is behind; n2 already runs it.
    let (ok, out) = network(&store, &["set", "--vxlan-port", "8472"]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""port":8472"#) && out.contains(r#""clusterCidr":"10.50.0.0/16""#));
    assert!(
        out.contains("restart these nodes to take the new settings: n1\n"),
        "{out}"
    );
    // A wider CIDR keeps every lease inside it, but no node runs it yet: all are behind.
    let (ok, out) = network(&store, &["set", "--cluster-cidr", "10.50.0.0/15"]);
    assert!(
        ok && out.contains("restart these nodes to take the new settings: n1 n2\n"),
        "{out}"
    );
    let (ok, out) = network(&store, &["set", "--cluster-cidr", "10.50.0.0/16"]);
    assert!(ok && out.contains("n1 n2\n"), "{out}");
    // The backend alone: n1 and n2 run vxlan, so both are behind. A host-gw record keeps no
    // VXLAN settings, so back on vxlan the port is the default again, and n2 is behind.
    let (ok, out) = network(&store, &["set", "--backend", "host-gw"]);
    assert!(ok && !out.contains("vxlan"), "{out}");
    assert!(
        out.contains("restart these nodes to take the new settings: n1 n2\n"),
        "{out}"
    );
    let (ok, out) = network(&store, &["set", "--backend", "vxlan"]);
    assert!(ok && out.contains(r#""port":4789"#), "{out}");
    assert!(
        out.contains("restart these nodes to take the new settings: n2\n"),
        "{out}"
    );

    // Refused, naming the flag or the setting, and nothing written.
    let before = network(&store, &["show"]).1;
    for (args, needle) in [
        (
            &["--backend", "ipsec"][..],
            r#"--backend: "ipsec" is not one of"#,
        ),
        (
            &["--subnet-len", "8"][..],
            "--subnet-len 8 is not between --cluster-cidr 10.50.0.0/16's /16 and /30",
        ),
        (
            &["--cluster-cidr", "10.50.0.0/26"][..],
            "--subnet-len 24 is not between --cluster-cidr 10.50.0.0/26's /26 and /30",
        ),
        (
            &["--vxlan-vni", "16777216"][..],
            "--vxlan-vni 16777216 is not in",
        ),
        (&["--vxlan-port", "0"][..], "--vxlan-port 0 is not a port"),
        (
            &["--backend", "host-gw", "--vxlan-port", "4789"][..],
            "--vxlan-port 4789: the backend host-gw does not use VXLAN",
        ),
    ] {
        let mut a = vec!["set"];
        a.extend(args);
        let (ok, out) = network(&store, &a);
        assert!(!ok && out.contains(needle), "{args:?}: {out}");
    }
    assert_eq!(network(&store, &["show"]).1, before);

    let (ok, out) = network(&store, &["reset"]);
    assert!(ok && out.contains("forgot"), "{out}");
    let (ok, out) = network(&store, &["reset"]);
    assert!(
        ok && out.contains("no network settings were recorded"),
        "{out}"
    );
}
