//! `weft`: the CNI plugin binary. Reads the conf on stdin and CNI_* from the environment, prints
//! the result (or a CNI error) on stdout, exits non-zero on error (CNI spec, "Output").

use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(weft_plugin::reap::ARG) {
        std::process::exit(weft_plugin::reap::run(&args[1..]));
    }
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome =
        weft_cni::env::Env::from_process().and_then(|env| weft_plugin::commands::run(&env, &stdin));
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            // Errors are reported in the version the runtime speaks when it can be read.
            let version = weft_plugin::commands::stdin_version(&stdin)
                .filter(|v| weft_cni::version::is_supported(v))
                .unwrap_or_else(|| weft_cni::LATEST_VERSION.to_string());
            let _ = writeln!(out, "{}", e.to_json(&version));
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
