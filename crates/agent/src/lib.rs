//! weftd, the node agent: leases the node's pod subnet, connects the node to its peers with a
//! backend, masquerades pod traffic that leaves the cluster, and programs Services (kube-proxy's
//! job) into Weft's nft table.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod events;
mod http;
pub mod lease;
pub mod network;
mod pod_mtu;
pub mod services;
mod underlay;

/// For unit tests that need a real store.
#[cfg(test)]
mod testing {
    /// Runs `f` against a fresh SQLite store in a directory of its own, removed afterwards.
    pub fn with_store(tag: &str, f: impl AsyncFnOnce(&weft_store::SqliteStore)) {
        let dir = std::env::temp_dir().join(format!("weft-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = weft_store::SqliteStore::open(dir.join("s.db"))
                .await
                .unwrap();
            f(&store).await
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
