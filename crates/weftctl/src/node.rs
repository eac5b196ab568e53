//! `weftctl node leave NODE`: take a node out of the cluster's network.
//!
//! The request is a key, `/weft/leave/<node>`, that the node's running agent watches: it releases
//! its subnet lease, removes its routes, VXLAN device and nft table, deletes the request and
//! exits. If no agent answers in time (the node is down, or its agent is), weftctl releases the
//! node's lease from the store itself, so that its peers drop their routes to it.

use clap::{Args, Subcommand};
use std::time::{Duration, Instant};
use weft_agent::daemon::leave_key;
use weft_agent::lease::{Lease, LEASE_PREFIX};
use weft_store::{AnyStore, Store};

#[derive(Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Ask NODE's agent to release its subnet, remove what it made and exit; if it does not
    /// answer within --timeout, release the node's lease from the store.
    Leave {
        node: String,
        /// The cluster store, as weftd's --store.
        #[arg(long, default_value = "sqlite:///var/lib/weft/store.db")]
        store: String,
        /// Seconds to wait for the node's agent (1-300).
        #[arg(long, default_value_t = 15)]
        timeout: u64,
    },
}

pub fn run(a: NodeArgs) -> i32 {
    let NodeCommand::Leave {
        node,
        store,
        timeout,
    } = a.command;
    match leave(&node, &store, timeout) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weftctl node leave: {e}");
            1
        }
    }
}

/// A Kubernetes node name: a DNS subdomain (lowercase letters, digits, '-' and '.').
fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn leave(node: &str, url: &str, timeout: u64) -> Result<(), String> {
    if !valid_node_name(node) {
        return Err(format!(
            "NODE: {node:?} is not a node name (lowercase letters, digits, '-' and '.')"
        ));
    }
    if !(1..=300).contains(&timeout) {
        return Err(format!("--timeout: {timeout} is not in 1..300 seconds"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let store = AnyStore::open(url)
            .await
            .map_err(|e| format!("--store {url}: {e}"))?;
        let held = node_leases(&store, node).await?;
        if held.is_empty() {
            return Err(format!(
                "node {node} holds no lease in {url}: it has left already, or never joined"
            ));
        }
        let subnets = held
            .iter()
            .map(|(_, l)| l.subnet.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // The request outlives the wait by a little, and then goes by itself.
        let lease = store
            .grant(Duration::from_secs(timeout + 30))
            .await
            .map_err(|e| e.to_string())?;
        let request = serde_json::json!({ "node": node, "requestedBy": "weftctl node leave" });
        let key = leave_key(node);
        store
            .put(&key, request.to_string().as_bytes(), Some(lease))
            .await
            .map_err(|e| format!("writing {key}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        while Instant::now() < deadline {
            if store.get(&key).await.map_err(|e| e.to_string())?.is_none() {
                println!("node {node} left: its agent released {subnets} and removed its routes");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = store.revoke(lease).await;
        let mut released = Vec::new();
        for (kv, l) in node_leases(&store, node).await? {
            if store
                .cad(&kv.key, kv.mod_revision)
                .await
                .map_err(|e| e.to_string())?
            {
                released.push(l.subnet.to_string());
            }
        }
        println!(
            "no agent on {node} answered within {timeout} s: released {} from the store, so its \
             peers drop their routes to it; its own routes, VXLAN device and nft table stay until \
             `weftd --leave` runs on it",
            if released.is_empty() {
                "nothing (its lease went meanwhile)".to_string()
            } else {
                released.join(", ")
            }
        );
        Ok(())
    })
}

async fn node_leases(
    store: &AnyStore,
    node: &str,
) -> Result<Vec<(weft_store::KeyValue, Lease)>, String> {
    let (kvs, _) = store.list(LEASE_PREFIX).await.map_err(|e| e.to_string())?;
    Ok(kvs
        .into_iter()
        .filter_map(|kv| {
            let l: Lease = serde_json::from_slice(&kv.value).ok()?;
            (l.node == node).then_some((kv, l))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_refused_before_the_store_is_opened() {
        let e = leave("Node_1", "sqlite:///nonexistent/x.db", 5).unwrap_err();
        assert!(e.contains("NODE") && e.contains("Node_1"), "{e}");
        let e = leave("node1", "sqlite:///nonexistent/x.db", 0).unwrap_err();
        assert!(e.contains("--timeout") && e.contains('0'), "{e}");
        let e = leave("node1", "postgres://x", 5).unwrap_err();
        assert!(e.contains("--store") && e.contains("postgres://x"), "{e}");
        assert!(valid_node_name("ip-10-0-0-1.ec2.internal"));
        assert!(!valid_node_name("-a") && !valid_node_name("a."));
    }
}
