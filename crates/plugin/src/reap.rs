//! Deleting a veth makes the kernel wait for an RCU barrier (`netdev_run_todo`): 10–20 ms here,
//! most of a DEL's time, and the reference plugins make the runtime wait for it. `weft` instead
//! takes the host veth down (cheap, and the pod is cut off at once: no carrier, its routes gone),
//! releases the address, returns, and leaves the deletion to a detached copy of itself.
//!
//! The reaper deletes by interface index, not name: a quick re-ADD of the same attachment makes
//! a new veth with the same name, which must survive. Indexes are allocated cyclically, so the
//! reaper also checks that the index still carries the name it was given. If the reaper never
//! runs (killed, or the spawn failed and the synchronous fallback failed too), the link is down
//! and inert, and GC, the next ADD of the attachment, or the pod namespace's own teardown removes
//! it.
//!
//! The reaper outlives the plugin, so it is reaped by PID 1 or the nearest subreaper. Where that
//! process never reaps orphans (some containerised runtimes), set `"asyncDelete": false` in the
//! conf: DEL then deletes the veth itself and waits for the kernel.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use weft_net::Netlink;

/// argv[1] that makes the `weft` binary a reaper. Runtimes never pass arguments to plugins.
pub const ARG: &str = "reap-link";

/// Starts the reaper for `index`/`name` and returns without waiting for it.
pub fn spawn(index: u32, name: &str) -> std::io::Result<()> {
    Command::new(std::env::current_exe()?)
        .arg(ARG)
        .arg(index.to_string())
        .arg(name)
        .env_clear()
        // No inherited pipes: the runtime reads our stdout to EOF and must not wait for this.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

/// The reaper's body: delete `index` if it is still the link called `name`.
pub fn run(args: &[String]) -> i32 {
    let (Some(index), Some(name)) = (
        args.first().and_then(|i| i.parse::<u32>().ok()),
        args.get(1),
    ) else {
        eprintln!("usage: weft {ARG} IFINDEX NAME");
        return 2;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return 1;
    };
    let done = rt.block_on(async {
        let host = Netlink::connect()?;
        match host.link_by_index(index).await? {
            Some(l) if l.name == *name => host.del_link_index(index).await.map(|_| ()),
            _ => Ok(()),
        }
    });
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weft {ARG}: {e}");
            1
        }
    }
}
