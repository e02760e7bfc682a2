//! Splitting watch messages under the gRPC message size: a large snapshot
//! or change batch becomes several messages, each with a revision a
//! watcher can safely resume from.

use prost::Message;
use weir_proto::registry::v1::{watch_response::Kind, Event, ServiceProtection, WatchResponse};

/// Largest encoded watch message the hub builds (snapshots and large change
/// batches are split across messages below this).
pub(super) const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Splits events (in revision order) into messages below
/// [`MAX_MESSAGE_BYTES`]. A snapshot always yields at least one message, the
/// last marked complete. Each message's `revision` is a safe resume point:
/// the batch revision on the last message; on an intermediate CHANGES message
/// the revision just before the next message's first event; 0 on an
/// intermediate SNAPSHOT message (half a snapshot is no view to resume from).
pub(super) fn chunk(
    kind: Kind,
    events: Vec<Event>,
    revision: u64,
    resync_reason: &str,
    protection: Vec<ServiceProtection>,
) -> Vec<WatchResponse> {
    let mut protection = Some(protection);
    let mut groups: Vec<Vec<Event>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for event in events {
        let len = event.encoded_len() + 8;
        if !current.is_empty() && size + len > MAX_MESSAGE_BYTES {
            groups.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(event);
    }
    if !current.is_empty() || groups.is_empty() {
        groups.push(current);
    }
    let next_firsts: Vec<Option<u64>> = groups
        .iter()
        .skip(1)
        .map(|g| g.first().map(|e| e.revision))
        .chain([None])
        .collect();
    groups
        .into_iter()
        .zip(next_firsts)
        .map(|(events, next_first)| {
            let last = next_first.is_none();
            let revision = match (last, kind) {
                (true, _) => revision,
                (false, Kind::Snapshot) => 0,
                (false, _) => next_first.map_or(revision, |r| r.saturating_sub(1)),
            };
            WatchResponse {
                kind: kind as i32,
                revision,
                events,
                snapshot_complete: kind == Kind::Snapshot && last,
                resync_reason: resync_reason.to_owned(),
                // Protection flips belong to the batch's last revision.
                protection: if last {
                    protection.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use weir_proto::registry::v1::{EventType, Instance};

    use super::*;

    #[test]
    fn chunks_stay_under_the_size_limit_with_safe_resume_points() {
        let big = |rev: u64| Event {
            r#type: EventType::Put as i32,
            instance: Some(Instance {
                metadata: [("k".to_string(), "v".repeat(300_000))].into(),
                ..Instance::default()
            }),
            revision: rev,
        };
        let events: Vec<Event> = (1..=10).map(big).collect();
        let changes = chunk(Kind::Changes, events.clone(), 10, "", Vec::new());
        assert!(changes.len() > 1);
        for m in &changes {
            assert!(m.encoded_len() <= MAX_MESSAGE_BYTES + 1024);
        }
        // Each message's revision is the last revision it completes.
        for pair in changes.windows(2) {
            assert_eq!(pair[0].revision + 1, pair[1].events[0].revision);
        }
        assert_eq!(changes.last().unwrap().revision, 10);
        let snapshot = chunk(Kind::Snapshot, events, 42, "why", Vec::new());
        assert!(snapshot[..snapshot.len() - 1]
            .iter()
            .all(|m| m.revision == 0 && !m.snapshot_complete));
        let last = snapshot.last().unwrap();
        assert!(last.snapshot_complete && last.revision == 42 && last.resync_reason == "why");
        assert_eq!(
            chunk(Kind::Snapshot, Vec::new(), 7, "", Vec::new()).len(),
            1
        );
    }
}
