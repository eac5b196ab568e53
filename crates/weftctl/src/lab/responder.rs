//! The lab pods' responder: answers every TCP connection and UDP datagram on its ports with the
//! pod's name, so a check can tell which pod answered (services and policy tests rely on it).

use nix::sched::{setns, CloneFlags};
use std::io::Write;
use std::net::{TcpListener, UdpSocket};

/// Runs until killed. Enters `netns` first: this process is single-threaded at that point, so
/// the whole process (and every thread it makes after) lives in the pod.
pub fn serve(netns: &str, name: &str, ports: &[u16]) -> i32 {
    let ns = match std::fs::File::open(netns) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("responder: opening {netns}: {e}");
            return 1;
        }
    };
    if let Err(e) = setns(&ns, CloneFlags::CLONE_NEWNET) {
        eprintln!("responder: entering {netns}: {e}");
        return 1;
    }
    let mut threads = Vec::new();
    for &port in ports {
        let tcp = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("responder: tcp port {port}: {e}");
                return 1;
            }
        };
        let udp = match UdpSocket::bind(("0.0.0.0", port)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("responder: udp port {port}: {e}");
                return 1;
            }
        };
        let reply = format!("{name}\n").into_bytes();
        let r = reply.clone();
        threads.push(std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                let _ = conn.write_all(&r);
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&reply, from);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    0
}
