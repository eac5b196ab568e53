//! `weftctl node leave NODE`: take a node out of the cluster's network.
//!
//! The request is a key, `/weft/leave/<node>`, that the node's agent watches (and looks for when
//! it starts): it releases its subnet lease, removes its routes, VXLAN device and nft table,
//! deletes the request and exits; if a step fails, it writes the error into the request instead.
//! If no agent answers in time (the node is down, or its agent is), weftctl releases the node's
//! lease from the store itself, so that its peers drop their routes to it, and leaves the request
//! in place without a TTL: the agent carries it out when it runs again.

use clap::{Args, Subcommand};
use std::time::{Duration, Instant};
use weft_agent::config::valid_node_name;
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
        #[arg(long, default_value = weft_agent::config::DEFAULT_STORE)]
        store: String,
        /// Seconds to wait for the node's agent (1-300).
        #[arg(long, default_value_t = 15)]
        timeout: u64,
        /// Drop a leave request that is still waiting for the node's agent (the node then joins
        /// as usual when its agent starts).
        #[arg(long)]
        cancel: bool,
    },
}

pub fn run(a: NodeArgs) -> i32 {
    let NodeCommand::Leave {
        node,
        store,
        timeout,
        cancel,
    } = a.command;
    let done = if cancel {
        cancel_leave(&node, &store)
    } else {
        leave(&node, &store, timeout)
    };
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weftctl node leave: {e}");
            1
        }
    }
}

fn check_node(node: &str) -> Result<(), String> {
    if valid_node_name(node) {
        Ok(())
    } else {
        Err(format!(
            "NODE: {node:?} is not a node name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

fn leave(node: &str, url: &str, timeout: u64) -> Result<(), String> {
    check_node(node)?;
    if !(1..=300).contains(&timeout) {
        return Err(format!("--timeout: {timeout} is not in 1..300 seconds"));
    }
    crate::with_store(url, async |store| {
        let held = node_leases(store, node).await?;
        let key = leave_key(node);
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
        // While weftctl waits, the request lives on a lease of its own: if weftctl dies, it
        // goes by itself a little after the wait would have ended.
        let wait_lease = store
            .grant(Duration::from_secs(timeout + 30))
            .await
            .map_err(|e| format!("granting a store lease for {key}: {e}"))?;
        let request = serde_json::json!({ "node": node, "requestedBy": "weftctl node leave" });
        let request = request.to_string();
        store
            .put(&key, request.as_bytes(), Some(wait_lease))
            .await
            .map_err(|e| format!("writing {key}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        loop {
            let kv = store
                .get(&key)
                .await
                .map_err(|e| format!("reading {key}: {e}"))?;
            let Some(kv) = kv else {
                println!("node {node} left: its agent released {subnets} and removed its routes");
                return Ok(());
            };
            let answer: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            if let Some(e) = answer["error"].as_str() {
                return Err(format!(
                    "the agent on {node} could not leave: {e} (it tries again when it starts; \
                     the request stays in {key}; `weftctl node leave {node} --cancel` drops it)"
                ));
            }
            if Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            // The agent is away: the request stays, without a TTL, until it comes back and
            // carries it out. Compared with what was just read, so that an answer the agent
            // wrote meanwhile is not overwritten (the loop then reads it).
            let kept = store
                .cas(&key, kv.mod_revision, request.as_bytes(), None)
                .await
                .map_err(|e| format!("writing {key}: {e}"))?;
            if kept.is_some() {
                break;
            }
        }
        let _ = store.revoke(wait_lease).await;
        let mut released = Vec::new();
        for (kv, l) in node_leases(store, node).await? {
            let gone = store
                .cad(&kv.key, kv.mod_revision)
                .await
                .map_err(|e| format!("releasing {}: {e}", kv.key))?;
            if gone {
                released.push(l.subnet.to_string());
            }
        }
        println!(
            "no agent on {node} answered within {timeout} s: released {} from the store, so its \
             peers drop their routes to it; its own routes, VXLAN device and nft table stay until \
             its agent runs again (it leaves then, as {key} asks) or `weftd --leave` runs there",
            if released.is_empty() {
                "nothing (its lease went meanwhile)".to_string()
            } else {
                released.join(", ")
            }
        );
        Ok(())
    })
}

fn cancel_leave(node: &str, url: &str) -> Result<(), String> {
    check_node(node)?;
    crate::with_store(url, async |store| {
        let key = leave_key(node);
        let gone = store
            .delete(&key)
            .await
            .map_err(|e| format!("deleting {key}: {e}"))?;
        if gone {
            println!("dropped the leave request for {node}: its agent joins when it starts");
        } else {
            println!("no leave request for {node} was waiting");
        }
        Ok(())
    })
}

async fn node_leases(
    store: &AnyStore,
    node: &str,
) -> Result<Vec<(weft_store::KeyValue, Lease)>, String> {
    let all = weft_agent::lease::leases(store)
        .await
        .map_err(|e| format!("listing {LEASE_PREFIX}: {e}"))?;
    Ok(all.into_iter().filter(|(_, l)| l.node == node).collect())
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
