//! `weftctl`: the operator CLI: the lab, a node's leave, and what a node programs for Services.

mod lab;
mod network;
mod node;
mod services;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Weft operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A Weft cluster made of network namespaces on this machine.
    Lab(lab::LabArgs),
    /// Take a node out of the cluster's network.
    Node(node::NodeArgs),
    /// The cluster's network settings: show, set, or reset.
    Network(network::NetworkArgs),
    /// Services as this node programs them: frontends, endpoints, connection counters.
    Services(services::ServicesArgs),
}

/// Runs `f` with the store at `url` (as weftd's --store) on a one-thread runtime: the CLI's
/// commands are one-shot.
fn with_store<T>(
    url: &str,
    f: impl AsyncFnOnce(&weft_store::AnyStore) -> Result<T, String>,
) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let store = weft_store::AnyStore::open(url)
            .await
            .map_err(|e| format!("--store {url}: {e}"))?;
        f(&store).await
    })
}

fn main() {
    // Die quietly on a closed pipe (`weftctl lab status | head`), like other command-line tools.
    // SAFETY: resetting a signal to its default action before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Lab(args) => lab::run(args),
        Command::Node(args) => node::run(args),
        Command::Network(args) => network::run(args),
        Command::Services(args) => services::run(args),
    };
    std::process::exit(code);
}
