use crate::{LeaseId, Revision};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A watch needed history that compaction has discarded: list again and watch from the
    /// list's revision.
    #[error("watch after revision {requested}: history before revision {compacted} is compacted")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("lease {0:#x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The store could not be reached or was busy (connection refused or lost, timeout, a
    /// locked database file). Retrying later may succeed; the outcome of a write that failed this
    /// way is unknown.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Other(String),
}

impl Error {
    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// Says what was being done, keeping the kind (retryable or not).
    pub(crate) fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            Error::Unavailable(m) => Error::Unavailable(format!("{what}: {m}")),
            Error::Other(m) => Error::Other(format!("{what}: {m}")),
            e => e,
        }
    }
}
