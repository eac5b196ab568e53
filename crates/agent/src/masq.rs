//! Masquerade for pod traffic leaving the cluster CIDR, in Weft's own nft table. The table is
//! replaced whole in one `nft -f` transaction (delete-and-recreate inside one batch is atomic:
//! no packet sees it half made), and never touches other tables.

use ipnet::Ipv4Net;
use std::io::Write;
use std::process::{Command, Stdio};

pub const TABLE: &str = "weft";

/// The ruleset, as `nft -f` input. Traffic from pods to pods (any node) and to multicast keeps
/// its source address; everything else from the cluster CIDR leaves as the node.
pub fn ruleset(cluster: Ipv4Net) -> String {
    format!(
        "table ip {TABLE} {{}}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster} ip daddr {cluster} return\n\
         \t\tip saddr {cluster} ip daddr 224.0.0.0/4 return\n\
         \t\tip saddr {cluster} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(stdin: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (is nftables installed?): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .map_err(|e| format!("writing to nft: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs the table if it is missing or differs from the desired rules; returns whether it
/// changed anything.
pub fn ensure(cluster: Ipv4Net) -> Result<bool, String> {
    let want = format!("ip saddr {cluster} masquerade fully-random");
    if let Ok(current) = nft("", &["list", "table", "ip", TABLE]) {
        if current.contains(&want)
            && current.contains(&format!("ip saddr {cluster} ip daddr {cluster} return"))
        {
            return Ok(false);
        }
    }
    nft(&ruleset(cluster), &["-f", "-"]).map(|_| true)
}

/// Removes the table (node leave).
pub fn remove() -> Result<(), String> {
    match nft("", &["delete", "table", "ip", TABLE]) {
        Ok(_) => Ok(()),
        Err(e) if e.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_shape() {
        let r = ruleset("10.244.0.0/16".parse().unwrap());
        assert!(r.starts_with("table ip weft {}\ndelete table ip weft\n"));
        assert!(r.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(r.contains("ip saddr 10.244.0.0/16 masquerade fully-random"));
        assert!(r.contains("type nat hook postrouting priority srcnat"));
    }
}
