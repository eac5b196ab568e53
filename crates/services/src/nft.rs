//! Running `nft`. Input goes on stdin as one file, which nft applies as one transaction.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `nft ARGS` with `stdin`; returns its stdout, or its stderr as the error.
pub fn run(stdin: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (is nftables installed?): {e}"))?;
    let mut input = child.stdin.take().expect("piped");
    // Write from a thread: nft may print (and block on a full pipe) before it has read it all.
    let text = stdin.to_owned();
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    writer
        .join()
        .expect("writer thread")
        .map_err(|e| format!("writing to nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        // nft quotes each failing line; the first few say what went wrong.
        let err: Vec<&str> = err.lines().take(6).collect();
        Err(format!("nft {}: {}", args.join(" "), err.join(" | ")))
    }
}

/// Applies `text` (nft commands) as one transaction.
pub fn apply(text: &str) -> Result<(), String> {
    run(text, &["-f", "-"]).map(|_| ())
}

/// Removes Weft's table (node leave). A missing table is fine.
pub fn remove_table() -> Result<(), String> {
    match run("", &["delete", "table", "ip", crate::render::TABLE]) {
        Ok(_) => Ok(()),
        Err(e) if e.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}
