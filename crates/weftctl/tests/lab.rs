//! `weftctl lab` end to end: up, status, check (real TCP between pods and to the node), pod
//! add/del, exec, a broken route caught by check, and down leaving no namespace behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Lab {
    name: String,
    state_dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the lab creates network namespaces and needs root (CI runs as root)"
        );
        // Labs of earlier test runs that crashed before their Drop.
        for ns in weft_net::NamedNetns::list("weftlab-t") {
            let pid = ns["weftlab-t".len()..]
                .split(['-', 'x'])
                .next()
                .unwrap_or("");
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let _ = weft_net::NamedNetns::delete(&ns);
            }
        }
        let name = format!("t{}x{tag}", std::process::id());
        let state_dir = std::env::temp_dir().join(format!("weftctl-test-{name}"));
        Lab { name, state_dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_weftctl")).parent().unwrap();
        assert!(
            bin_dir.join("weft").exists(),
            "the weft plugin binary is missing beside weftctl: cargo test --workspace builds it"
        );
        Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .arg("lab")
            .args(["--name", &self.name, "--state-dir"])
            .arg(&self.state_dir)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "weftctl lab {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn namespaces(&self) -> Vec<String> {
        weft_net::NamedNetns::list(&format!("weftlab-{}-", self.name))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        for ns in self.namespaces() {
            let _ = weft_net::NamedNetns::delete(&ns);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn lab_round_trip(mode: &str, tag: &str) {
    let lab = Lab::new(tag);
    lab.ok(&["up", "--pods", "3", "--mode", mode]);
    let status = lab.ok(&["status"]);
    assert!(status.contains("pod3") && status.contains(mode), "{status}");
    let matrix = lab.ok(&["check"]);
    assert!(
        matrix.contains("12 passed, 0 failed") || matrix.contains("9 passed, 0 failed"),
        "{matrix}"
    );
    assert!(!matrix.contains("FAIL"), "{matrix}");

    lab.ok(&["pod", "add", "extra"]);
    let matrix = lab.ok(&["check"]);
    assert!(
        matrix.contains("16 passed, 0 failed"),
        "4 pods × (3 pods + node): {matrix}"
    );
    let addr = lab.ok(&["exec", "extra", "--", "ip", "-br", "addr", "show", "eth0"]);
    assert!(addr.contains("10.244.1."), "{addr}");

    // A pod without its default route cannot answer anyone: check must say so and fail.
    lab.ok(&["exec", "pod1", "--", "ip", "route", "del", "default"]);
    let out = lab.run(&["check"]);
    assert!(!out.status.success(), "check must fail with a broken pod");
    let matrix = String::from_utf8_lossy(&out.stdout);
    assert!(matrix.contains("FAIL"), "{matrix}");

    lab.ok(&["pod", "del", "extra"]);
    assert!(!lab.namespaces().iter().any(|n| n.ends_with("-extra")));
    lab.ok(&["down"]);
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    assert!(!lab.state_dir.join(&lab.name).exists());
    // Down twice is fine; status of a lab that is not up is a clear error.
    lab.ok(&["down"]);
    let out = lab.run(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not up"));
}

#[test]
fn bridge_lab() {
    lab_round_trip("bridge", "b");
}

#[test]
fn routed_lab() {
    lab_round_trip("routed", "r");
}

#[test]
fn bad_flags_are_named() {
    let lab = Lab::new("bad");
    let out = lab.run(&["up", "--mode", "tunnel"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tunnel"));
    assert_eq!(lab.namespaces(), Vec::<String>::new(), "nothing made");
    let out = lab.run(&["up", "--subnet", "10.0.0.0/33"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10.0.0.0/33"));
}
