//! A live copy of part of the registry.

use std::{collections::BTreeMap, time::Duration};

use weir_core::backoff::{Backoff, Jitter};

use crate::{
    Client, Error, Event, EventType, Instance, ServiceProtection, WatchKind, WatchRequest,
    WatchResponse,
};

/// What one [`WatchView::next`] call changed.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchUpdate {
    /// The view was replaced by a snapshot at `revision`. `resync_reason`
    /// is set when the server could not continue the previous stream (the
    /// watcher fell behind, or the resume revision was too old).
    Snapshot {
        revision: u64,
        resync_reason: Option<String>,
        /// Matching services in protection.
        protection: Vec<ServiceProtection>,
    },
    /// These changes were applied, in order; `protection` lists the
    /// services whose protection state changed.
    Changes {
        revision: u64,
        events: Vec<Event>,
        protection: Vec<ServiceProtection>,
    },
    /// Nothing changed; the view is current up to `revision`.
    Progress { revision: u64 },
}

type Key = (String, String, String);

fn key_of(i: &Instance) -> Key {
    (
        i.namespace.clone(),
        i.service.clone(),
        i.instance_id.clone(),
    )
}

/// A copy of the registry (or part of it) built from `WatchResponse`
/// messages, whatever stream they come from: the `Watch` RPC
/// ([`WatchView`]) or an agent session ([`crate::AgentSession`]). Pure: it
/// applies messages and answers lookups; it opens no stream.
#[derive(Debug, Default, Clone)]
pub struct RegistryMirror {
    instances: BTreeMap<Key, Instance>,
    /// Services in protection.
    protected: BTreeMap<(String, String), ServiceProtection>,
    /// A snapshot arriving in several messages.
    staging: Option<BTreeMap<Key, Instance>>,
    revision: u64,
}

/// A view of the instances of a namespace (or one service) kept current by
/// the `Watch` stream. When the stream breaks the view reconnects, to any
/// replica, and resumes from the last revision it applied, so no change is
/// missed or applied twice; if the server can no longer resume it, the
/// next update is a fresh [`WatchUpdate::Snapshot`].
#[derive(Debug)]
pub struct WatchView {
    client: Client,
    namespace: String,
    service: String,
    stream: Option<tonic::Streaming<WatchResponse>>,
    mirror: RegistryMirror,
    /// Between attempts to reopen the stream: 100 ms doubling to 2 s,
    /// jittered so that many views cut off together spread out.
    backoff: Backoff,
}

impl WatchView {
    pub(crate) fn new(client: Client, namespace: &str, service: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            service: service.to_string(),
            stream: None,
            mirror: RegistryMirror::default(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
                .with_jitter(Jitter::Half),
        }
    }

    /// Starts from `revision` instead of a snapshot: the first updates are
    /// the changes after it. The view holds only what those changes carry.
    pub fn resume_from(mut self, revision: u64) -> Self {
        self.mirror.revision = revision;
        self
    }

    /// What the view holds.
    pub fn mirror(&self) -> &RegistryMirror {
        &self.mirror
    }

    /// The revision the view is current up to (0 before the first update).
    pub fn revision(&self) -> u64 {
        self.mirror.revision
    }

    /// The instances, ordered by namespace, service and id.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.mirror.instances()
    }

    /// Whether a service is in protection (route to all its instances).
    pub fn in_protection(&self, namespace: &str, service: &str) -> bool {
        self.mirror.in_protection(namespace, service)
    }

    /// Looks one instance up.
    pub fn get(&self, namespace: &str, service: &str, instance_id: &str) -> Option<&Instance> {
        self.mirror.get(namespace, service, instance_id)
    }

    /// Waits for the next change and applies it. Transient failures
    /// (a replica going away, the store being unavailable) are retried
    /// here, with a capped backoff; other errors (a bad namespace, say) are
    /// returned.
    pub async fn next(&mut self) -> Result<WatchUpdate, Error> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.open().await?;
                continue;
            };
            match stream.message().await {
                Ok(Some(msg)) => {
                    self.backoff.reset();
                    if let Some(update) = self.mirror.apply(msg)? {
                        return Ok(update);
                    }
                }
                Ok(None) => {
                    tracing::info!(
                        revision = self.mirror.revision,
                        "watch stream ended; resuming"
                    );
                    self.stream = None;
                }
                Err(status) => {
                    let e = Error::from(status);
                    if !e.is_transient() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, revision = self.mirror.revision, "watch stream broke; resuming");
                    self.stream = None;
                    self.backoff().await;
                }
            }
        }
    }

    async fn open(&mut self) -> Result<(), Error> {
        loop {
            let request = WatchRequest {
                namespace: self.namespace.clone(),
                service: self.service.clone(),
                start_revision: self.mirror.revision,
            };
            match self.client.watch(request).await {
                Ok(stream) => {
                    self.stream = Some(stream);
                    self.mirror.drop_partial_snapshot();
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "cannot open the watch; retrying");
                    self.backoff().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn backoff(&mut self) {
        tokio::time::sleep(self.backoff.next_delay()).await;
    }
}

impl RegistryMirror {
    /// An empty mirror that takes changes after `revision`.
    pub fn at(revision: u64) -> Self {
        Self {
            revision,
            ..Self::default()
        }
    }

    /// The revision the mirror is current up to (0 before the first update).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The instances, ordered by namespace, service and id.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    /// Whether a service is in protection (route to all its instances).
    pub fn in_protection(&self, namespace: &str, service: &str) -> bool {
        self.protected
            .contains_key(&(namespace.to_owned(), service.to_owned()))
    }

    fn note_protection(&mut self, protection: &[ServiceProtection]) {
        for p in protection {
            let key = (p.namespace.clone(), p.service.clone());
            if p.active {
                self.protected.insert(key, p.clone());
            } else {
                self.protected.remove(&key);
            }
        }
    }

    /// Looks one instance up.
    pub fn get(&self, namespace: &str, service: &str, instance_id: &str) -> Option<&Instance> {
        self.instances
            .get(&(namespace.into(), service.into(), instance_id.into()))
    }

    /// The instances of one service, ordered by id.
    pub fn service<'a>(
        &'a self,
        namespace: &str,
        service: &str,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        let from = (namespace.to_owned(), service.to_owned(), String::new());
        let (ns, svc) = (namespace.to_owned(), service.to_owned());
        self.instances
            .range(from..)
            .take_while(move |(k, _)| k.0 == ns && k.1 == svc)
            .map(|(_, i)| i)
    }

    /// The whole mirror as one complete SNAPSHOT message at its revision
    /// (with the protection state), such that [`RegistryMirror::apply`] on
    /// an empty mirror rebuilds it. For saving a view to disk: the agent
    /// persists it and re-applies it at start. A half-received snapshot is
    /// not included.
    pub fn snapshot(&self) -> WatchResponse {
        WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: self
                .instances
                .values()
                .map(|i| Event {
                    r#type: EventType::Put as i32,
                    instance: Some(i.clone()),
                    revision: self.revision,
                })
                .collect(),
            revision: self.revision,
            snapshot_complete: true,
            resync_reason: String::new(),
            protection: self.protected.values().cloned().collect(),
        }
    }

    /// Keeps the contents but forgets the revision, so the next stream
    /// opened from [`RegistryMirror::revision`] starts with a snapshot
    /// (after the mirror disagreed with its stream, say).
    pub fn forget_revision(&mut self) {
        self.revision = 0;
        self.staging = None;
    }

    /// A half-received snapshot is void once its stream is gone: call this
    /// when a new stream opens.
    pub fn drop_partial_snapshot(&mut self) {
        self.staging = None;
    }

    /// Applies one message; returns the update once a whole one arrived.
    pub fn apply(&mut self, msg: WatchResponse) -> Result<Option<WatchUpdate>, Error> {
        let kind = WatchKind::try_from(msg.kind)
            .map_err(|_| Error::Protocol(format!("unknown watch message kind {}", msg.kind)))?;
        match kind {
            WatchKind::Snapshot => {
                let staging = self.staging.get_or_insert_with(BTreeMap::new);
                for e in msg.events {
                    if let Some(i) = e.instance {
                        staging.insert(key_of(&i), i);
                    }
                }
                if !msg.snapshot_complete {
                    return Ok(None);
                }
                self.instances = self.staging.take().unwrap_or_default();
                self.revision = msg.revision;
                self.protected.clear();
                self.note_protection(&msg.protection);
                Ok(Some(WatchUpdate::Snapshot {
                    revision: msg.revision,
                    resync_reason: (!msg.resync_reason.is_empty()).then_some(msg.resync_reason),
                    protection: msg.protection,
                }))
            }
            WatchKind::Changes => {
                for e in &msg.events {
                    if e.revision <= self.revision && self.revision != 0 {
                        return Err(Error::Protocol(format!(
                            "change at revision {} after the view reached {}",
                            e.revision, self.revision
                        )));
                    }
                    let Some(i) = &e.instance else { continue };
                    match EventType::try_from(e.r#type) {
                        Ok(EventType::Put) => {
                            self.instances.insert(key_of(i), i.clone());
                        }
                        Ok(EventType::Delete) => {
                            self.instances.remove(&key_of(i));
                        }
                        _ => {
                            return Err(Error::Protocol(format!("unknown event type {}", e.r#type)))
                        }
                    }
                }
                self.revision = self.revision.max(msg.revision);
                self.note_protection(&msg.protection);
                Ok(Some(WatchUpdate::Changes {
                    revision: msg.revision,
                    events: msg.events,
                    protection: msg.protection,
                }))
            }
            WatchKind::Progress => {
                self.revision = self.revision.max(msg.revision);
                Ok(Some(WatchUpdate::Progress {
                    revision: msg.revision,
                }))
            }
            WatchKind::Unspecified => Err(Error::Protocol("watch message without a kind".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view that never connects (its endpoint is not listened on): only
    /// `apply` is exercised.
    fn view() -> WatchView {
        let client = Client::with_config(["127.0.0.1:1"], crate::ClientConfig::default())
            .expect("valid endpoint");
        WatchView::new(client, "default", "")
    }

    fn inst(id: &str) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
            ..Instance::default()
        }
    }

    fn event(t: EventType, id: &str, revision: u64) -> Event {
        Event {
            r#type: t as i32,
            instance: Some(inst(id)),
            revision,
        }
    }

    fn protection(active: bool) -> ServiceProtection {
        ServiceProtection {
            namespace: "default".into(),
            service: "orders".into(),
            active,
            threshold_percent: 50,
            healthy: 1,
            total: 3,
        }
    }

    fn ids(v: &WatchView) -> Vec<String> {
        v.instances().map(|i| i.instance_id.clone()).collect()
    }

    #[tokio::test]
    async fn snapshots_replace_the_view_once_complete_and_changes_apply_in_order() {
        let mut v = view();
        let part = |ids: &[&str], complete: bool, rev: u64| WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: ids.iter().map(|i| event(EventType::Put, i, 1)).collect(),
            revision: rev,
            snapshot_complete: complete,
            resync_reason: String::new(),
            protection: if complete {
                vec![protection(true)]
            } else {
                Vec::new()
            },
        };
        assert_eq!(
            v.mirror.apply(part(&["a", "b"], false, 7)).expect("ok"),
            None
        );
        assert!(ids(&v).is_empty(), "a partial snapshot is not shown");
        assert!(v.mirror.apply(part(&["c"], true, 7)).expect("ok").is_some());
        assert_eq!(ids(&v), ["a", "b", "c"]);
        assert_eq!(v.revision(), 7);
        assert!(v.in_protection("default", "orders"));

        let changes = WatchResponse {
            kind: WatchKind::Changes as i32,
            events: vec![
                event(EventType::Delete, "b", 8),
                event(EventType::Put, "d", 9),
            ],
            revision: 9,
            protection: vec![protection(false)],
            ..WatchResponse::default()
        };
        assert!(matches!(
            v.mirror.apply(changes.clone()).expect("ok"),
            Some(WatchUpdate::Changes { revision: 9, .. })
        ));
        assert_eq!(ids(&v), ["a", "c", "d"]);
        assert!(!v.in_protection("default", "orders"), "released");
        assert!(
            matches!(v.mirror.apply(changes), Err(Error::Protocol(_))),
            "a replayed change is a protocol error"
        );

        let resync = WatchResponse {
            resync_reason: "fell behind".into(),
            ..part(&["z"], true, 20)
        };
        assert_eq!(
            v.mirror.apply(resync).expect("ok"),
            Some(WatchUpdate::Snapshot {
                revision: 20,
                resync_reason: Some("fell behind".into()),
                protection: vec![protection(true)],
            })
        );
        assert_eq!(ids(&v), ["z"]);
        assert!(v.get("default", "orders", "z").is_some());
    }

    #[test]
    fn a_snapshot_of_a_mirror_rebuilds_it() {
        let mut m = RegistryMirror::default();
        m.apply(WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: vec![event(EventType::Put, "a", 3), event(EventType::Put, "b", 4)],
            revision: 5,
            snapshot_complete: true,
            protection: vec![protection(true)],
            ..WatchResponse::default()
        })
        .expect("ok");
        let mut copy = RegistryMirror::default();
        assert!(copy.apply(m.snapshot()).expect("ok").is_some());
        assert_eq!(copy.revision(), 5);
        let ids: Vec<_> = copy.instances().map(|i| i.instance_id.clone()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(copy.in_protection("default", "orders"));
    }

    #[tokio::test]
    async fn unknown_kinds_are_errors_not_panics() {
        let mut v = view();
        let bad = WatchResponse {
            kind: 42,
            ..WatchResponse::default()
        };
        assert!(matches!(v.mirror.apply(bad), Err(Error::Protocol(_))));
    }
}
