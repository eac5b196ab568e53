//! `weftctl`: the operator CLI. Today it drives the lab; node status, leases, services and policy
//! tracing come with the agent.

mod lab;

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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Lab(args) => lab::run(args),
    };
    std::process::exit(code);
}
