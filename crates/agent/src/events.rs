//! Warning events for what keeps a peer's pods out of reach from this node.
//!
//! One Kubernetes `Event` (core/v1 JSON, as the API server stores it) per current problem, under
//! `/registry/events/default/<node>.weft-<reason>-<peer>`. Each is written with the agent's store
//! lease, so the events of an agent that is gone expire with it. A problem that clears takes its
//! event with it, so the prefix says what is wrong now (`weftctl lab status` lists it).

use crate::backend::Problem;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use weft_store::{LeaseId, Store};

pub const EVENT_PREFIX: &str = "/registry/events/default/";
/// The events' source component.
pub const COMPONENT: &str = "weftd";

/// The events `node`'s agent owns all start with this.
fn node_prefix(node: &str) -> String {
    format!("{EVENT_PREFIX}{node}.weft-")
}

/// `<node>.weft-<reason in kebab case>-<peer>`: stable, so a lasting problem keeps one event.
/// Node names are DNS subdomains (config::valid_node_name), so the name is one too.
pub fn event_name(node: &str, p: &Problem) -> String {
    let mut reason = String::new();
    for (i, c) in p.reason.as_str().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            reason.push('-');
        }
        reason.push(c.to_ascii_lowercase());
    }
    format!("{node}.weft-{reason}-{}", p.peer)
}

/// The event for `p`, seen now; `previous` (the same problem's last event, if any) keeps its
/// first time and count.
pub fn event(node: &str, p: &Problem, now: Timestamp, previous: Option<&Event>) -> Event {
    let first = previous
        .and_then(|e| e.first_timestamp.clone())
        .unwrap_or(Time(now));
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(node, p)),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
        type_: Some("Warning".into()),
        reason: Some(p.reason.as_str().into()),
        message: Some(p.message.clone()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.into()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(first),
        last_timestamp: Some(Time(now)),
        count: Some(previous.and_then(|e| e.count).unwrap_or(0) + 1),
        ..Default::default()
    }
}

/// The time now, to the second (what an event's timestamps carry).
fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Makes the store's events of `node` say exactly `problems`: writes the new and changed ones
/// (attached to `lease`), deletes the ones whose problem cleared.
pub async fn publish<S: Store>(
    store: &S,
    node: &str,
    lease: LeaseId,
    problems: &[Problem],
) -> Result<(), String> {
    let (kvs, _) = store
        .list(&node_prefix(node))
        .await
        .map_err(|e| e.to_string())?;
    let mut stale: BTreeMap<String, weft_store::KeyValue> =
        kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    for p in problems {
        let key = format!("{EVENT_PREFIX}{}", event_name(node, p));
        let old = stale.remove(&key);
        let old_event = old
            .as_ref()
            .and_then(|kv| serde_json::from_slice::<Event>(&kv.value).ok());
        let same = old.as_ref().is_some_and(|kv| kv.lease == Some(lease))
            && old_event.as_ref().and_then(|e| e.message.as_deref()) == Some(&p.message);
        if same {
            continue;
        }
        let e = event(node, p, now(), old_event.as_ref());
        let json = serde_json::to_vec(&e).expect("serializable");
        store
            .put(&key, &json, Some(lease))
            .await
            .map_err(|e| format!("writing event {key}: {e}"))?;
    }
    for (key, kv) in stale {
        store
            .cad(&key, kv.mod_revision)
            .await
            .map_err(|e| format!("deleting event {key}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reason;

    fn problem() -> Problem {
        Problem {
            peer: "node2".into(),
            reason: Reason::PeerNotOnLink,
            message: "peer node2 is not on the underlay subnet".into(),
        }
    }

    #[test]
    fn an_event_is_standard_kubernetes_json() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let e = event("node1", &problem(), now, None);
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["apiVersion"], "v1");
        assert_eq!(j["kind"], "Event");
        assert_eq!(j["metadata"]["name"], "node1.weft-peer-not-on-link-node2");
        assert_eq!(j["involvedObject"]["kind"], "Node");
        assert_eq!(j["involvedObject"]["name"], "node1");
        assert_eq!(j["type"], "Warning");
        assert_eq!(j["reason"], "PeerNotOnLink");
        assert_eq!(j["source"]["component"], "weftd");
        assert_eq!(j["firstTimestamp"], "2026-12-01T12:00:00Z");
        assert_eq!(j["count"], 1);
        // Seen again later: the first time stays, the count goes up.
        let later: Timestamp = "2026-12-01T12:05:00Z".parse().unwrap();
        let again = event("node1", &problem(), later, Some(&e));
        let j = serde_json::to_value(&again).unwrap();
        assert_eq!(j["firstTimestamp"], "2026-12-01T12:00:00Z");
        assert_eq!(j["lastTimestamp"], "2026-12-01T12:05:00Z");
        assert_eq!(j["count"], 2);
    }

    #[test]
    fn publish_writes_keeps_and_clears() {
        crate::testing::with_store("events", async |store| {
            let lease = store
                .grant(std::time::Duration::from_secs(30))
                .await
                .unwrap();
            // Another node's event is not this agent's to clear.
            store
                .put(&format!("{EVENT_PREFIX}node3.weft-x-y"), b"{}", None)
                .await
                .unwrap();
            publish(store, "node1", lease, &[problem()]).await.unwrap();
            let key = format!("{EVENT_PREFIX}node1.weft-peer-not-on-link-node2");
            let kv = store.get(&key).await.unwrap().expect("written");
            assert_eq!(kv.lease, Some(lease));
            // The same problem again writes nothing.
            publish(store, "node1", lease, &[problem()]).await.unwrap();
            let again = store.get(&key).await.unwrap().unwrap();
            assert_eq!(again.mod_revision, kv.mod_revision);
            // Cleared: the event goes, the other node's stays.
            publish(store, "node1", lease, &[]).await.unwrap();
            assert!(store.get(&key).await.unwrap().is_none());
            let (left, _) = store.list(EVENT_PREFIX).await.unwrap();
            assert_eq!(left.len(), 1);
        });
    }
}
