//! Network namespaces: opening them, running code inside them, and named namespaces in /run/netns.
//!
//! A thread that enters a foreign namespace never comes back to do other work: every entry happens
//! on a fresh thread that ends with the closure (the idea of netavark and plugins' `ns.Do`), so a
//! failed restore can never leave the process half in a pod.

use crate::Error;
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// Where iproute2 keeps named namespaces; `ip netns` sees ours and we see its.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// f_type of nsfs (linux/magic.h NSFS_MAGIC): tells a namespace file from an ordinary one.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace. Holding the file keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (a /run/netns entry or /proc/PID/ns/net).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, Error> {
        let path = path.as_ref();
        let op = || format!("opening network namespace {}", path.display());
        let file = File::open(path).map_err(|e| Error::io(op(), e))?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| Error::io(op(), e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(Error::io(
                op(),
                std::io::Error::other("not a network namespace file (nsfs)"),
            ));
        }
        Ok(Netns {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns, Error> {
        Netns::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether both handles name the same namespace (same nsfs inode).
    pub fn same_as(&self, other: &Netns) -> bool {
        match (self.inode(), other.inode()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// The namespace's identity: device and inode of the open nsfs file.
    pub fn inode(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a new thread that has entered this namespace. The thread ends with `f`.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::io(
                        format!("entering network namespace {}", self.path.display()),
                        e.into(),
                    )
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Named namespaces, compatible with `ip netns`. Creating one does not fork (unlike
/// `ip netns add` and rtnetlink's helper), so it is safe in a threaded program.
pub struct NamedNetns;

impl NamedNetns {
    pub fn path(name: &str) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(name)
    }

    /// Creates the namespace `name` and returns it open. Fails if it exists.
    pub fn create(name: &str) -> Result<Netns, Error> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::io(
                format!("creating network namespace {name:?}"),
                std::io::Error::other("invalid name"),
            ));
        }
        let path = Self::path(name);
        let op = || format!("creating network namespace {name}");
        fs::create_dir_all(NETNS_RUN_DIR).map_err(|e| Error::io(op(), e))?;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(op(), e))?;
        let made = std::thread::scope(|s| {
            s.spawn(|| -> Result<(), nix::Error> {
                unshare(CloneFlags::CLONE_NEWNET)?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(Error::io(op(), e.into()));
        }
        Netns::open(&path)
    }

    /// Removes the namespace `name`; a missing one is success. The namespace itself lives on
    /// until its last process or open file goes.
    pub fn delete(name: &str) -> Result<(), Error> {
        let path = Self::path(name);
        if !path.exists() {
            return Ok(());
        }
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("deleting network namespace {name}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Names in /run/netns that start with `prefix`.
    pub fn list(prefix: &str) -> Vec<String> {
        let Ok(dir) = fs::read_dir(NETNS_RUN_DIR) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }
}

/// A named namespace for tests and benchmarks: `<prefix><pid>-<seq>-<tag>`, deleted on drop.
/// `sweep` removes those of processes that no longer run (a crash skips Drop).
pub struct ScratchNetns {
    pub name: String,
    pub netns: Netns,
}

static SCRATCH_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl ScratchNetns {
    pub fn new(prefix: &str, tag: &str) -> Result<ScratchNetns, Error> {
        let seq = SCRATCH_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}{}-{seq}-{tag}", std::process::id());
        let netns = NamedNetns::create(&name)?;
        Ok(ScratchNetns { name, netns })
    }

    pub fn path(&self) -> PathBuf {
        NamedNetns::path(&self.name)
    }

    /// Deletes `<prefix><pid>-…` namespaces whose pid is not running.
    pub fn sweep(prefix: &str) {
        for name in NamedNetns::list(prefix) {
            let pid = name[prefix.len()..].split('-').next().unwrap_or("");
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let _ = NamedNetns::delete(&name);
            }
        }
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = NamedNetns::delete(&self.name);
    }
}
