//! `weftctl network show|reset`: the cluster's network settings as the agents recorded them
//! (`/weft/config/network`, see weft-agent's network.rs).

use clap::{Args, Subcommand};
use weft_agent::network::NETWORK_KEY;
use weft_store::Store;

#[derive(Args)]
pub struct NetworkArgs {
    /// The cluster store, as weftd's --store.
    #[arg(long, default_value = "sqlite:///var/lib/weft/store.db", global = true)]
    store: String,
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Print the recorded settings (JSON).
    Show,
    /// Forget them: the next agent to start records its own (given or default). To change the
    /// cluster's settings, reset, restart one node with the new ones given, then the others
    /// (those given none take the new ones; one given the old ones that starts first records
    /// those again).
    Reset,
}

pub fn run(a: NetworkArgs) -> i32 {
    match network(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weftctl network: {e}");
            1
        }
    }
}

fn network(a: NetworkArgs) -> Result<(), String> {
    crate::with_store(&a.store, async |store| {
        match a.command {
            NetworkCommand::Show => {
                let kv = store
                    .get(NETWORK_KEY)
                    .await
                    .map_err(|e| format!("reading {NETWORK_KEY}: {e}"))?
                    .ok_or_else(|| {
                        format!("no {NETWORK_KEY} in {}: no agent has started yet", a.store)
                    })?;
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
            NetworkCommand::Reset => {
                let gone = store
                    .delete(NETWORK_KEY)
                    .await
                    .map_err(|e| format!("deleting {NETWORK_KEY}: {e}"))?;
                println!(
                    "{}",
                    if gone {
                        "forgot the cluster's network settings: the next agent to start records its own \
                         (restart one with the new settings given, then the others)"
                    } else {
                        "no network settings were recorded"
                    }
                );
            }
        }
        Ok(())
    })
}
