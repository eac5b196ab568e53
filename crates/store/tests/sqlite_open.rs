//! Many processes opening one new SQLite file at once (every agent of a node set starting
//! together): SQLite answers some of their lock conflicts, such as two connections each upgrading
//! a lock while switching the file to WAL, with SQLITE_BUSY at once, without waiting in its busy
//! handler. Every open must still succeed.

use std::sync::{Arc, Barrier};

#[test]
fn concurrent_opens_of_a_new_file_all_succeed() {
    const OPENERS: usize = 16;
    const ROUNDS: usize = 30;
    let dir = std::env::temp_dir().join(format!("weft-sqlite-open-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let path = dir.join(format!("r{round}.db"));
        let barrier = Arc::new(Barrier::new(OPENERS));
        let threads: Vec<_> = (0..OPENERS)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    barrier.wait();
                    rt.block_on(weft_store::SqliteStore::open(&path))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for t in threads {
            if let Err(e) = t.join().unwrap() {
                failures.push(format!("round {round}: {e}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} failed opens: {failures:#?}",
        failures.len()
    );
}
