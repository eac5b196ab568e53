//! `weftd`: the Weft node agent.

use clap::Parser;
use std::sync::Arc;

fn main() {
    let cfg = match weft_agent::config::Flags::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weftd: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let outcome = rt.block_on(async {
        let store = weft_store::AnyStore::open(&cfg.store)
            .await
            .map_err(|e| format!("--store {}: {e}", cfg.store))?;
        let store = Arc::new(store);
        tokio::select! {
            r = weft_agent::daemon::run(cfg, store) => r,
            // Exiting on a signal leaves the datapath and the lease in place: a restarted agent
            // takes both over without a blip.
            _ = shutdown() => Ok(()),
        }
    });
    if let Err(e) = outcome {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
