//! Kubernetes Services on nftables, replacing kube-proxy: [`model`] reads Services and
//! EndpointSlices, [`compile`] turns them into the variable part of Weft's table, [`render`]
//! writes nft transactions, and [`Proxy`] applies them incrementally and cleans up conntrack.

pub mod compile;
pub mod conntrack;
pub mod model;
pub mod nft;
pub mod render;

pub use compile::{compile, Compiler, Flat, NodeFacts, Ruleset};
pub use model::{parse_all, Cache, Objects};

use std::time::Instant;

/// How a sync reached the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Nothing differed.
    Unchanged,
    /// Only the differing chains and elements.
    Incremental,
    /// The whole table replaced (start-up, new node facts, or after a failed update).
    Full,
    /// Every chain and map rewritten in place (the periodic drift repair).
    Repair,
}

#[derive(Debug)]
pub struct SyncReport {
    pub kind: SyncKind,
    /// Bytes of nft input sent.
    pub bytes: usize,
    pub seconds: f64,
    /// conntrack deletions run for UDP flows of removed endpoints.
    pub conntrack_deletes: usize,
    /// Set when an incremental update failed and a full sync repaired it.
    pub recovered_from: Option<String>,
}

/// Keeps Weft's table equal to the latest ruleset. It remembers what it applied last, so each
/// sync sends only the difference; any failure falls back to replacing the whole table.
#[derive(Default)]
pub struct Proxy {
    applied: Option<(NodeFacts, Ruleset)>,
    /// conntrack deletions that failed, retried on the next sync.
    pending: Vec<conntrack::Delete>,
}

impl Proxy {
    pub fn new() -> Proxy {
        Proxy::default()
    }

    /// What was applied last (`None` before the first successful sync).
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref().map(|(_, r)| r)
    }

    /// Makes the table match `rs`. UDP flows to endpoints that left are deleted from conntrack
    /// after the table changed (so new packets already pick a live endpoint).
    pub fn sync(&mut self, facts: &NodeFacts, rs: Ruleset) -> Result<SyncReport, String> {
        let start = Instant::now();
        // What differs from the last sync, computed once for the nft update and for conntrack.
        // Before the first sync that is everything, and the same view renders the full table.
        let (old_view, new_view) = match &self.applied {
            Some((_, old)) => old.changed_views(&rs),
            None => (Flat::default(), rs.flat()),
        };
        let (kind, text, recovered_from) = match &self.applied {
            None => {
                let full = render::full_flat(facts, &new_view);
                nft::apply(&full)?;
                (SyncKind::Full, full, None)
            }
            Some((f, _)) if f == facts => {
                let text = render::diff_views(&old_view, &new_view);
                if text.is_empty() {
                    (SyncKind::Unchanged, text, None)
                } else {
                    match nft::apply(&text) {
                        Ok(()) => (SyncKind::Incremental, text, None),
                        Err(e) => {
                            let full = render::full(facts, &rs);
                            nft::apply(&full)?;
                            (SyncKind::Full, full, Some(e))
                        }
                    }
                }
            }
            _ => {
                let full = render::full(facts, &rs);
                nft::apply(&full)?;
                (SyncKind::Full, full, None)
            }
        };
        let mut deletes = std::mem::take(&mut self.pending);
        deletes.extend(conntrack::stale_udp_views(&old_view, &new_view));
        deletes.sort();
        deletes.dedup();
        let conntrack_deletes = deletes.len();
        self.applied = Some((facts.clone(), rs));
        let mut first_error = None;
        for d in deletes {
            if let Err(e) = conntrack::delete(&d) {
                first_error.get_or_insert(e);
                self.pending.push(d);
            }
        }
        if let Some(e) = first_error {
            return Err(format!(
                "the table is in sync, but {} conntrack deletion(s) failed and will be retried: {e}",
                self.pending.len()
            ));
        }
        Ok(SyncReport {
            kind,
            bytes: text.len(),
            seconds: start.elapsed().as_secs_f64(),
            conntrack_deletes,
            recovered_from,
        })
    }

    /// Rewrites every chain in place and re-adds every element (drift repair), keeping affinity
    /// and counters.
    pub fn repair(&mut self) -> Result<SyncReport, String> {
        let Some((facts, rs)) = &self.applied else {
            return Err("nothing applied yet".into());
        };
        let start = Instant::now();
        let text = render::repair(facts, rs);
        if let Err(e) = nft::apply(&text) {
            let full = render::full(facts, rs);
            nft::apply(&full)?;
            return Ok(SyncReport {
                kind: SyncKind::Full,
                bytes: full.len(),
                seconds: start.elapsed().as_secs_f64(),
                conntrack_deletes: 0,
                recovered_from: Some(e),
            });
        }
        Ok(SyncReport {
            kind: SyncKind::Repair,
            bytes: text.len(),
            seconds: start.elapsed().as_secs_f64(),
            conntrack_deletes: 0,
            recovered_from: None,
        })
    }
}
