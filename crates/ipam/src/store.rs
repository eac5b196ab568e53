use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::{Allocation, Attachment, Error, Pool, Record, Request};

const LOCK: &str = "lock";
const LAST_RESERVED: &str = "last_reserved";
const INDEX: &str = "by-attachment";
const PROBE: &str = ".writable";
/// Each taken address costs the search a failed open(2); past this many, listing the directory
/// once is cheaper than probing the rest one by one.
const PROBES_BEFORE_LISTING: usize = 16;

/// The allocations of one network on this node; see the crate docs for the layout.
///
/// Every operation opens the lock file anew: `flock(2)` locks belong to an open file description,
/// so a shared descriptor would not exclude threads of one process from each other.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Identifies an inode, telling whether an index entry and a record file are one file.
type FileId = (u64, u64);

/// What an attachment's index entry leads to.
enum Lookup {
    Absent,
    Held(Record),
    /// The entry outlived its record (an interrupted release), or was tampered with.
    Dangling,
}

impl Store {
    /// Opens `<data_dir>/<network>`, creating it if needed.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, Error> {
        if network.is_empty() || network == "." || network == ".." || network.contains(['/', '\0'])
        {
            return Err(Error::InvalidNetworkName {
                name: network.to_owned(),
            });
        }
        let dir = data_dir.join(network);
        let index = dir.join(INDEX);
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&index)
            .map_err(io_err(&index, "creating directory"))?;
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Allocates an address to `req.attachment`, or returns the one it already holds.
    pub fn allocate(&self, pool: &Pool, req: &Request) -> Result<Allocation, Error> {
        let a = req.attachment;
        let index = self.index_path(a)?;
        if let Some(ip) = req.fixed {
            pool.check_usable(ip)?;
        }
        let _lock = self.lock(FlockArg::LockExclusive)?;
        match self.lookup(a, &index)? {
            Lookup::Held(held) => {
                return match req.fixed {
                    Some(requested) if requested != held.ip => Err(Error::AlreadyHolds {
                        attachment: a.clone(),
                        held: held.ip,
                        requested,
                    }),
                    _ => Ok(Allocation {
                        ip: held.ip,
                        reused: true,
                    }),
                };
            }
            Lookup::Dangling => remove_if_exists(&index)?,
            Lookup::Absent => {}
        }

        let mut new = Record {
            ip: Ipv4Addr::UNSPECIFIED,
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            pod_namespace: req.pod_namespace.map(str::to_owned),
            pod_name: req.pod_name.map(str::to_owned),
        };
        match req.fixed {
            Some(ip) => {
                new.ip = ip;
                if let Err(e) = self.create_record(&new) {
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(io_err(&self.record_path(ip), "creating")(e));
                    }
                    return match self.read_record(ip)? {
                        // A record whose index entry was lost: restore the entry.
                        Some((r, _)) if r.is_held_by(a) => {
                            self.link_index(ip, &index)?;
                            Ok(Allocation { ip, reused: true })
                        }
                        Some((r, _)) => Err(Error::AddressInUse {
                            ip,
                            owner: r.attachment(),
                        }),
                        None => Err(io_err(&self.record_path(ip), "creating")(e)),
                    };
                }
            }
            None => self.create_next(pool, &mut new)?,
        }
        if let Err(e) = self.link_index(new.ip, &index) {
            // Best effort: should this fail too, gc reclaims the unindexed record.
            let _ = fs::remove_file(self.record_path(new.ip));
            return Err(e);
        }
        Ok(Allocation {
            ip: new.ip,
            reused: false,
        })
    }

    /// Creates the record for the first free address after `last_reserved`, setting `new.ip`.
    fn create_next(&self, pool: &Pool, new: &mut Record) -> Result<(), Error> {
        let path = self.dir.join(LAST_RESERVED);
        // Rewritten in place, not replaced: rename(2) would cost a new inode, and ext4
        // (auto_da_alloc) flushes a file renamed over another.
        let mut cursor = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        let mut buf = [0; 32];
        let len = cursor.read(&mut buf).map_err(io_err(&path, "reading"))?;
        let last = std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(|s| s.trim().parse().ok());

        let mut found = false;
        let mut taken = None;
        for (tried, ip) in pool.candidates_after(last).enumerate() {
            if tried == PROBES_BEFORE_LISTING {
                taken = Some(self.record_ips()?.into_iter().collect::<HashSet<_>>());
            }
            if taken.as_ref().is_some_and(|t| t.contains(&ip)) {
                continue;
            }
            new.ip = ip;
            match self.create_record(new) {
                Ok(()) => {
                    found = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&self.record_path(ip), "creating")(e)),
            }
        }
        if !found {
            return Err(Error::Exhausted {
                subnet: pool.subnet,
                capacity: pool.capacity(),
            });
        }
        let text = format!("{}\n", new.ip);
        let written = cursor.write_all_at(text.as_bytes(), 0).and_then(|()| {
            if text.len() < len {
                cursor.set_len(text.len() as u64)
            } else {
                Ok(())
            }
        });
        written.map_err(|e| {
            let _ = fs::remove_file(self.record_path(new.ip));
            io_err(&path, "writing")(e)
        })
    }

    /// Releases the address held by `a`, returning it; an attachment holding none is not an error.
    pub fn release(&self, a: &Attachment) -> Result<Option<Ipv4Addr>, Error> {
        // An attachment that cannot be allocated to cannot hold anything.
        let Ok(index) = self.index_path(a) else {
            return Ok(None);
        };
        let _lock = self.lock(FlockArg::LockExclusive)?;
        let released = match self.lookup(a, &index) {
            Ok(Lookup::Held(r)) => {
                remove_if_exists(&self.record_path(r.ip))?;
                Some(r.ip)
            }
            Ok(Lookup::Absent) => return Ok(None),
            Ok(Lookup::Dangling) => None,
            // DEL must not get stuck on an unreadable record; gc removes it once unindexed.
            Err(Error::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        remove_if_exists(&index)?;
        Ok(released)
    }

    pub fn get(&self, a: &Attachment) -> Result<Option<Record>, Error> {
        let Ok(index) = self.index_path(a) else {
            return Ok(None);
        };
        let _lock = self.lock(FlockArg::LockShared)?;
        match self.lookup(a, &index)? {
            Lookup::Held(r) => Ok(Some(r)),
            Lookup::Absent | Lookup::Dangling => Ok(None),
        }
    }

    /// All allocations, sorted by address.
    pub fn list(&self) -> Result<Vec<Record>, Error> {
        let _lock = self.lock(FlockArg::LockShared)?;
        let mut records = Vec::new();
        for ip in self.record_ips()? {
            records.extend(self.read_record(ip)?.map(|(r, _)| r));
        }
        Ok(records)
    }

    /// Releases every allocation whose attachment is not in `valid` (CNI GC) and returns them,
    /// sorted by address. Also repairs the index: a kept record gets the entry it lacks, entries
    /// that lead nowhere go, and unreadable records that no valid attachment's entry links to are
    /// removed (they are not in the returned list, having no readable owner).
    pub fn gc(&self, valid: &[Attachment]) -> Result<Vec<Record>, Error> {
        let valid: HashSet<&Attachment> = valid.iter().collect();
        let _lock = self.lock(FlockArg::LockExclusive)?;

        // None: unreadable.
        let mut records: BTreeMap<Ipv4Addr, Option<Record>> = BTreeMap::new();
        let mut by_id: HashMap<FileId, Ipv4Addr> = HashMap::new();
        for ip in self.record_ips()? {
            let path = self.record_path(ip);
            let Some((bytes, id)) = read_with_id(&path)? else {
                continue;
            };
            records.insert(ip, parse_record(&path, &bytes, ip).ok());
            by_id.insert(id, ip);
        }
        let entries = self.index_entries()?;

        // The address each valid attachment keeps: the record its index entry links to if that is
        // its own (or unreadable), otherwise its lowest record. Further records of it are leftovers
        // of an allocation interrupted before its index entry was made.
        let mut keep: HashMap<Attachment, Ipv4Addr> = HashMap::new();
        for (a, _, id) in &entries {
            let Some(&ip) = by_id.get(id) else { continue };
            let own = records[&ip].as_ref().is_none_or(|r| r.is_held_by(a));
            if own && valid.contains(a) {
                keep.insert(a.clone(), ip);
            }
        }
        for r in records.values().flatten() {
            let a = r.attachment();
            if valid.contains(&a) {
                keep.entry(a).or_insert(r.ip);
            }
        }

        let kept: HashSet<Ipv4Addr> = keep.values().copied().collect();
        let mut released = Vec::new();
        for (ip, record) in records {
            if !kept.contains(&ip) {
                remove_if_exists(&self.record_path(ip))?;
                released.extend(record);
            }
        }
        for (a, path, id) in &entries {
            if by_id.get(id).is_some_and(|ip| keep.get(a) == Some(ip)) {
                keep.remove(a);
            } else {
                remove_if_exists(path)?;
            }
        }
        // Left in `keep`: kept records without an index entry.
        for (a, ip) in keep {
            if let Ok(index) = self.index_path(&a) {
                self.link_index(ip, &index)?;
            }
        }
        Ok(released)
    }

    /// Whether allocations can be written (CNI STATUS).
    pub fn check_writable(&self) -> Result<(), Error> {
        let _lock = self.lock(FlockArg::LockExclusive)?;
        let probe = self.dir.join(PROBE);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"probe\n"))
            .map_err(io_err(&probe, "writing"))?;
        remove_if_exists(&probe)
    }

    fn lock(&self, arg: FlockArg) -> Result<Flock<File>, Error> {
        let path = self.dir.join(LOCK);
        // O_CREAT without write access: std's `create` insists on write access, which a read-only
        // mount would refuse even though the lock file exists.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_CREAT.bits())
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        loop {
            match Flock::lock(file, arg) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => return Err(io_err(&path, "locking")(errno.into())),
            }
        }
    }

    fn record_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Checks that `a` makes a file name, since the index is keyed by it.
    fn index_path(&self, a: &Attachment) -> Result<PathBuf, Error> {
        let reason = if a.container_id.is_empty() || a.ifname.is_empty() {
            "container id and interface name must not be empty"
        } else if a.container_id.contains(['/', '=', '\0']) {
            "container id must not contain '/', '=' or NUL"
        } else if a.ifname.contains(['/', '\0']) {
            "interface name must not contain '/' or NUL"
        } else if a.container_id.len() + a.ifname.len() >= 255 {
            "container id and interface name are longer than 254 bytes together"
        } else {
            return Ok(self
                .dir
                .join(INDEX)
                .join(format!("{}={}", a.container_id, a.ifname)));
        };
        Err(Error::InvalidAttachment {
            attachment: a.clone(),
            reason,
        })
    }

    /// Reserves `r.ip`: `O_EXCL` makes an existing record fail with `AlreadyExists`. One write(2)
    /// under the exclusive lock, so readers (who take the shared lock) never see it partial.
    fn create_record(&self, r: &Record) -> io::Result<()> {
        let path = self.record_path(r.ip);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        let mut json = serde_json::to_vec(r).map_err(io::Error::other)?;
        json.push(b'\n');
        file.write_all(&json).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })
    }

    fn read_record(&self, ip: Ipv4Addr) -> Result<Option<(Record, FileId)>, Error> {
        let path = self.record_path(ip);
        let Some((bytes, id)) = read_with_id(&path)? else {
            return Ok(None);
        };
        Ok(Some((parse_record(&path, &bytes, ip)?, id)))
    }

    /// The index entry is a hard link to the record; it holds only if the record file of the
    /// address it names is still that same file.
    fn lookup(&self, a: &Attachment, index: &Path) -> Result<Lookup, Error> {
        let Some((bytes, id)) = read_with_id(index)? else {
            return Ok(Lookup::Absent);
        };
        let r: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(index, e))?;
        let linked = match fs::symlink_metadata(self.record_path(r.ip)) {
            Ok(m) => (m.dev(), m.ino()) == id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&self.record_path(r.ip), "reading")(e)),
        };
        Ok(if linked && r.is_held_by(a) {
            Lookup::Held(r)
        } else {
            Lookup::Dangling
        })
    }

    fn link_index(&self, ip: Ipv4Addr, index: &Path) -> Result<(), Error> {
        fs::hard_link(self.record_path(ip), index).map_err(io_err(index, "linking"))
    }

    fn record_ips(&self) -> Result<Vec<Ipv4Addr>, Error> {
        let mut ips = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir, "listing"))? {
            let entry = entry.map_err(io_err(&self.dir, "listing"))?;
            if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                ips.push(ip);
            }
        }
        ips.sort();
        Ok(ips)
    }

    /// Every index entry: its attachment, path and the file it links to.
    fn index_entries(&self) -> Result<Vec<(Attachment, PathBuf, FileId)>, Error> {
        let dir = self.dir.join(INDEX);
        let mut entries = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "listing"))? {
            let entry = entry.map_err(io_err(&dir, "listing"))?;
            let name = entry.file_name();
            let Some((container_id, ifname)) = name.to_str().and_then(|n| n.split_once('=')) else {
                continue;
            };
            let a = Attachment {
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
            };
            let path = entry.path();
            let m = entry.metadata().map_err(io_err(&path, "reading"))?;
            entries.push((a, path, (m.dev(), m.ino())));
        }
        Ok(entries)
    }
}

fn parse_record(path: &Path, bytes: &[u8], ip: Ipv4Addr) -> Result<Record, Error> {
    let r: Record = serde_json::from_slice(bytes).map_err(|e| corrupt(path, e))?;
    if r.ip != ip {
        return Err(corrupt(path, format!("it holds the record of {}", r.ip)));
    }
    Ok(r)
}

fn read_with_id(path: &Path) -> Result<Option<(Vec<u8>, FileId)>, Error> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let m = file.metadata().map_err(io_err(path, "reading"))?;
    let mut bytes = Vec::with_capacity(m.len() as usize + 1);
    file.read_to_end(&mut bytes)
        .map_err(io_err(path, "reading"))?;
    Ok(Some((bytes, (m.dev(), m.ino()))))
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path, "removing")(e)),
        _ => Ok(()),
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn corrupt(path: &Path, reason: impl ToString) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}
