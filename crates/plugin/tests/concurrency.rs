//! 64 plugin processes at once: distinct addresses, no errors, and parallel DELs leave IPAM empty.

mod common;
use common::*;
use std::collections::HashSet;

#[test]
fn sixty_four_parallel_adds_and_dels() {
    const N: usize = 64;
    let node = Node::new("par-host");
    let conf = node.conf("bridge", "10.244.30.0/24");
    let pods: Vec<Ns> = (0..N).map(|i| Ns::new(&format!("par{i}"))).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || node.add(conf, pod, &format!("par{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<_> = results
        .iter()
        .enumerate()
        .map(|(i, r)| result_ip(r.as_ref().unwrap_or_else(|e| panic!("ADD par{i}: {e}"))))
        .collect();
    assert_eq!(ips.len(), N, "every pod got its own address");
    assert_eq!(node.weft_veths().len(), N);
    assert_eq!(
        node.ipam_records().len(),
        2 * N,
        "a record and an index entry each"
    );

    // Pods on the bridge reach each other (a sample: each pod to its neighbour).
    let ipv: Vec<_> = results
        .iter()
        .map(|r| result_ip(r.as_ref().unwrap()))
        .collect();
    let responders: Vec<_> = (0..N)
        .step_by(16)
        .map(|i| Responder::start(&pods[i], ipv[i], 80, &format!("par{i}")))
        .collect();
    for (k, r) in responders.iter().enumerate() {
        let from = &pods[(k * 16 + 1) % N];
        assert_eq!(tcp_probe(from, r.addr).unwrap(), format!("par{}", k * 16));
    }
    drop(responders);

    let dels: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || node.del(conf, pod, &format!("par{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, d) in dels.iter().enumerate() {
        d.as_ref().unwrap_or_else(|e| panic!("DEL par{i}: {e}"));
    }
    assert_eq!(node.ipam_records(), Vec::<String>::new());
    node.wait_no_veths();
}
