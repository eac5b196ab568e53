//! Weft's built-in IPAM: IPv4 pod addresses from a node subnet, one per attachment
//! (container id, interface name), kept on disk so that concurrent, short-lived CNI plugin
//! processes agree.
//!
//! # On-disk layout
//!
//! Each network has a directory `<data_dir>/<network>/` (mode 0755, files 0644):
//!
//! | path | content |
//! |------|---------|
//! | `lock` | empty; every mutation holds an exclusive `flock(2)` on it, reads a shared one |
//! | `last_reserved` | the last dynamically allocated address, e.g. `10.244.1.5` |
//! | `10.244.1.5` (one per allocation) | the allocation as one line of JSON, a [`Record`] |
//! | `by-attachment/<container_id>=<ifname>` | a hard link to that attachment's record file |
//!
//! A record file's existence reserves its address: it is created with `O_EXCL`, so an address is
//! never handed out twice. The index lets ADD, DEL and CHECK find an attachment's allocation by
//! reading one file instead of every record; the CNI spec does not allow `=` in a container id, so
//! the key is unambiguous. It is a hard link (`ls -li` shows the shared inode) rather than a file
//! of its own because creating an inode is by far the most expensive step of an allocation, and
//! link(2) is cheap. For the same reason `last_reserved` is rewritten in place, not replaced by
//! rename(2): it is only where the search starts, so a garbled one merely restarts it at the
//! beginning of the subnet. After every allocation has been released, only `lock`,
//! `last_reserved` and the empty `by-attachment/` remain.
//!
//! # Interrupted mutations
//!
//! Readers take the shared lock, so they never see a record that is being written. An allocation
//! creates the record, then links the index entry; a release removes the record, then the index
//! entry. An index entry that no longer shares its inode with the record file of its address, or
//! whose record names another attachment, is ignored and removed by the next mutation for that
//! attachment. A record without an index entry keeps its address reserved (allocation skips it)
//! until [`Store::gc`] links it again, if its attachment is still valid, or releases it.
//!
//! Nothing is fsynced: a record only matters while its pod's network namespace exists, and a
//! machine crash destroys those as well. Whatever a crash leaves behind, including empty or
//! truncated records (reported as [`Error::Corrupt`]), is reclaimed by the runtime's next CNI GC.

mod error;
mod pool;
mod store;

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use error::Error;
pub use pool::Pool;
pub use store::Store;

/// What an address is allocated to: one interface of one container (the CNI attachment key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// Shown as `<container_id>/<ifname>`.
impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// One allocation, as stored in its record file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

impl Record {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    fn is_held_by(&self, a: &Attachment) -> bool {
        self.container_id == a.container_id && self.ifname == a.ifname
    }
}

/// An allocation request for one attachment.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub attachment: &'a Attachment,
    /// A specific address (e.g. from the `ips` capability); `None` takes the next free one.
    pub fixed: Option<Ipv4Addr>,
    pub pod_namespace: Option<&'a str>,
    pub pod_name: Option<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The attachment already held `ip` (a repeated ADD) and got it back.
    pub reused: bool,
}
