//! The view and policies kept under `--data-dir`, so an agent that starts
//! while no control plane answers routes on its last view.
//!
//! One file, [`FILE`] (`view.pb`): a `weir.agent.v1.PersistedState`
//! protobuf holding the registry mirror as one complete SNAPSHOT
//! `WatchResponse` (instances, protection, revision), the policies as one
//! SNAPSHOT `PolicyUpdate` (at the policy revision), the versions
//! acknowledged, and the topic subscriptions, the retained ones included
//! (`PersistedSubscription`: since when each is unlisted in unix ms, and
//! its retention; see [`crate::outbox::subscriptions`]). The
//! subscriptions are written with the view, so whenever a registry change
//! (which is what changes them, expiry included) is; at start they are
//! added back after the view, a retained one on its original retention
//! clock, one past its retention dropped. A file without them (from an
//! earlier build) loads with none. It is written atomically (a temporary file in the same
//! directory, fsync, rename, fsync of the directory), never more than once
//! per [`DEBOUNCE`], and once more on a clean stop. At start a file that
//! does not decode, or that another node wrote, is ignored with a warning:
//! the agent then starts empty, as without a data dir.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use prost::Message;
use tokio::sync::{watch, Notify};
use weir_client::{
    agent::{
        policy_update, PersistedAck, PersistedState, PersistedSubscription, PolicyChange,
        PolicyUpdate,
    },
    RegistryMirror, WatchKind, WatchResponse,
};
use weir_core::time::now_unix_ms;

use crate::{
    outbox::subscriptions::SavedSubscription,
    session::{PolicyAck, SessionState},
    view::{Routes, View},
};

/// The file under the data dir.
pub const FILE: &str = "view.pb";
const TEMP: &str = "view.pb.tmp";
/// The `PersistedState.format` this build writes and reads.
pub const FORMAT: u32 = 1;
/// After a change, how long the writer waits (gathering more changes)
/// before it writes: at most one write per period, whatever the rate of
/// changes.
pub const DEBOUNCE: Duration = Duration::from_secs(1);

/// The policies as the session holds them: `namespace/service` to its
/// latest change.
pub type PolicySet = BTreeMap<(String, String), PolicyChange>;

/// Why the data dir cannot be used, or a write failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create the data dir {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data dir {path} is not writable: {source}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a file was ignored at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("it does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("format {0}, this agent reads {FORMAT}")]
    Format(u32),
    #[error("node {0:?} wrote it")]
    OtherNode(String),
    #[error("{0}")]
    Invalid(&'static str),
}

/// The data dir of one node.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
    node_id: String,
    /// The routes whose subscriptions are saved with the view: those of
    /// the view [`Store::restore`] loaded into.
    routes: std::sync::OnceLock<Arc<Routes>>,
}

/// What a file held, checked.
#[derive(Clone, Debug)]
pub struct Saved {
    /// A complete SNAPSHOT message.
    pub registry: WatchResponse,
    pub policies: PolicySet,
    pub policy_revision: u64,
    pub acks: BTreeMap<String, PolicyAck>,
    /// Empty in a file from a build that did not keep them.
    pub subscriptions: Vec<SavedSubscription>,
}

/// The policy state the session starts from, read from disk.
#[derive(Clone, Debug, Default)]
pub struct Seed {
    pub policies: PolicySet,
    pub policy_revision: u64,
    pub acks: BTreeMap<String, PolicyAck>,
}

impl Store {
    /// Uses `dir` (created if missing) for `node_id`'s state; fails if the
    /// directory cannot be created or written to.
    pub fn open(dir: &Path, node_id: &str) -> Result<Self, PersistError> {
        std::fs::create_dir_all(dir).map_err(|source| PersistError::Create {
            path: dir.to_owned(),
            source,
        })?;
        // Find out now, not at the first write a second after a change.
        let probe = dir.join(".weir-agent-probe");
        std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"probe"))
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|source| PersistError::NotWritable {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            node_id: node_id.to_owned(),
            routes: std::sync::OnceLock::new(),
        })
    }

    /// The state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Reads the file back. `Ok(None)`: there is none.
    pub fn read(&self) -> Result<Option<Saved>, LoadError> {
        let bytes = match std::fs::read(self.path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LoadError::Read(e)),
        };
        let state = PersistedState::decode(bytes.as_slice())?;
        if state.format != FORMAT {
            return Err(LoadError::Format(state.format));
        }
        if state.node_id != self.node_id {
            return Err(LoadError::OtherNode(state.node_id));
        }
        let registry = state
            .registry
            .filter(|r| r.kind == WatchKind::Snapshot as i32 && r.snapshot_complete)
            .ok_or(LoadError::Invalid("no complete registry snapshot"))?;
        let (policies, policy_revision) = match state.policies {
            Some(p) if p.kind == policy_update::Kind::Snapshot as i32 => (
                p.changes
                    .into_iter()
                    .filter(|c| c.policy.is_some())
                    .map(|c| ((c.namespace.clone(), c.service.clone()), c))
                    .collect(),
                p.revision,
            ),
            Some(_) => return Err(LoadError::Invalid("the policies are not a snapshot")),
            None => (PolicySet::new(), 0),
        };
        let acks = state
            .acks
            .into_iter()
            .map(|a| {
                (
                    format!("{}/{}", a.namespace, a.service),
                    PolicyAck {
                        version: a.version,
                        at_unix_ms: a.at_unix_ms,
                        unenforced: a.unenforced,
                    },
                )
            })
            .collect();
        let subscriptions = state
            .subscriptions
            .into_iter()
            .filter(|s| !s.namespace.is_empty() && !s.topic.is_empty() && !s.service.is_empty())
            .map(saved_subscription)
            .collect();
        Ok(Some(Saved {
            registry,
            policies,
            policy_revision,
            acks,
            subscriptions,
        }))
    }

    /// Loads the file into `view` (its subscriptions into `view`'s
    /// routes, after the registry view) and returns the policy state to
    /// start the session from. A file that is missing, does not decode, or
    /// is another node's, gives `None` and leaves `view` empty (with a
    /// warning for the last two). Either way, from then on what is written
    /// holds the subscriptions of `view`'s routes.
    pub fn restore(&self, view: &mut View) -> Option<Seed> {
        let _ = self.routes.set(view.routes().clone());
        let saved = match self.read() {
            Ok(Some(saved)) => saved,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(file = %self.path().display(), error = %e,
                    "ignoring the persisted view; starting empty");
                return None;
            }
        };
        let instances = saved.registry.events.len();
        if let Err(e) = view.apply(saved.registry) {
            tracing::warn!(file = %self.path().display(), error = %e,
                "ignoring the persisted view; starting empty");
            return None;
        }
        // Balancing as the saved policies say: a resumed policy stream may
        // bring no change for a long time.
        view.apply_policies(
            saved
                .policies
                .iter()
                .map(|(key, change)| (key, change.policy.as_ref())),
        );
        // After the view: what it lists stays listed, the rest is retained
        // on its original clock.
        let subscriptions = view
            .routes()
            .restore_subscriptions(saved.subscriptions, now_unix_ms());
        tracing::info!(
            file = %self.path().display(),
            instances,
            retained_subscriptions = subscriptions.retained,
            expired_subscriptions = subscriptions.expired,
            registry_revision = view.revision(),
            policy_revision = saved.policy_revision,
            policies = saved.policies.len(),
            "routing on the persisted view until the control plane answers"
        );
        Some(Seed {
            policies: saved.policies,
            policy_revision: saved.policy_revision,
            acks: saved.acks,
        })
    }

    /// Writes `state` atomically: a temporary file in the same directory,
    /// fsync, rename over [`FILE`], fsync of the directory.
    pub fn write(&self, state: &PersistedState) -> Result<(), PersistError> {
        let temp = self.dir.join(TEMP);
        let failed = |source| PersistError::Write {
            path: self.path(),
            source,
        };
        let bytes = state.encode_to_vec();
        {
            let mut f = std::fs::File::create(&temp).map_err(failed)?;
            f.write_all(&bytes).map_err(failed)?;
            f.sync_all().map_err(failed)?;
        }
        std::fs::rename(&temp, self.path()).map_err(failed)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(failed)?;
        Ok(())
    }
}

/// A subscription as read from the file: an unset (or nonsensical)
/// since means listed when written.
fn saved_subscription(s: PersistedSubscription) -> SavedSubscription {
    SavedSubscription {
        namespace: s.namespace,
        topic: s.topic,
        service: s.service,
        unlisted_since_unix_ms: (s.unlisted_since_unix_ms > 0).then_some(s.unlisted_since_unix_ms),
        retention: Duration::from_millis(s.retention_ms),
    }
}

fn persisted_subscription(s: &SavedSubscription) -> PersistedSubscription {
    PersistedSubscription {
        namespace: s.namespace.clone(),
        topic: s.topic.clone(),
        service: s.service.clone(),
        unlisted_since_unix_ms: s.unlisted_since_unix_ms.unwrap_or(0),
        retention_ms: u64::try_from(s.retention.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The message for a mirror, policies, acknowledgements and
/// subscriptions.
pub fn state_of(
    node_id: &str,
    mirror: &RegistryMirror,
    policies: &PolicySet,
    policy_revision: u64,
    acks: &BTreeMap<String, PolicyAck>,
    subscriptions: &[SavedSubscription],
) -> PersistedState {
    PersistedState {
        format: FORMAT,
        node_id: node_id.to_owned(),
        written_unix_ms: now_unix_ms(),
        registry: Some(mirror.snapshot()),
        policies: Some(PolicyUpdate {
            kind: policy_update::Kind::Snapshot as i32,
            changes: policies.values().cloned().collect(),
            revision: policy_revision,
            resync_reason: String::new(),
        }),
        acks: acks
            .iter()
            .map(|(key, a)| {
                let (namespace, service) = key.split_once('/').unwrap_or(("", key));
                PersistedAck {
                    namespace: namespace.to_owned(),
                    service: service.to_owned(),
                    version: a.version,
                    at_unix_ms: a.at_unix_ms,
                    unenforced: a.unenforced.clone(),
                }
            })
            .collect(),
        subscriptions: subscriptions.iter().map(persisted_subscription).collect(),
    }
}

/// Saves the agent's state after it changes, debounced. The session task
/// says when something changed ([`Persister::touch`],
/// [`Persister::set_policies`]); [`Persister::run`] writes.
#[derive(Clone, Debug)]
pub struct Persister {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    mirror: Arc<RwLock<RegistryMirror>>,
    /// The policies and their revision, as the session holds them.
    policies: Mutex<(PolicySet, u64)>,
    /// Acknowledgements and whether the view is loaded.
    state: watch::Receiver<SessionState>,
    dirty: AtomicBool,
    changed: Notify,
    /// One write at a time (the writer task and the final flush).
    writing: tokio::sync::Mutex<()>,
}

impl Persister {
    /// Saves `mirror` (the view's), the policies given to it and the acks
    /// in `state`, to `store`. `seed` is what was loaded (nothing is
    /// written until something changes).
    pub fn new(
        store: Store,
        mirror: Arc<RwLock<RegistryMirror>>,
        state: watch::Receiver<SessionState>,
        seed: Option<&Seed>,
    ) -> Self {
        let policies = seed.map_or_else(Default::default, |s| {
            (s.policies.clone(), s.policy_revision)
        });
        Self {
            inner: Arc::new(Inner {
                store,
                mirror,
                policies: Mutex::new(policies),
                state,
                dirty: AtomicBool::new(false),
                changed: Notify::new(),
                writing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Something changed: write within [`DEBOUNCE`] or so.
    pub fn touch(&self) {
        self.inner.dirty.store(true, Ordering::Release);
        self.inner.changed.notify_one();
    }

    /// The policies changed.
    pub fn set_policies(&self, policies: &PolicySet, revision: u64) {
        *self
            .inner
            .policies
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (policies.clone(), revision);
        self.touch();
    }

    /// Writes after each change, at most once per [`DEBOUNCE`], until the
    /// task is dropped. Call [`Persister::flush`] on a clean stop.
    pub async fn run(self) {
        loop {
            self.inner.changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            self.flush().await;
        }
    }

    /// Writes now if anything changed since the last write (and a view is
    /// loaded: an empty one is not worth keeping). Failures are logged;
    /// the agent goes on without them.
    pub async fn flush(&self) {
        let _one = self.inner.writing.lock().await;
        if !self.inner.state.borrow().view_loaded || !self.inner.dirty.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let state = {
            let subscriptions = self
                .inner
                .store
                .routes
                .get()
                .map(|r| r.saved_subscriptions(now_unix_ms()))
                .unwrap_or_default();
            let acks = self.inner.state.borrow().policies.clone();
            let (policies, revision) = self
                .inner
                .policies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mirror = self.inner.mirror.read().unwrap_or_else(|p| p.into_inner());
            state_of(
                &self.inner.store.node_id,
                &mirror,
                &policies,
                revision,
                &acks,
                &subscriptions,
            )
        };
        let store = self.inner.store.clone();
        let started = std::time::Instant::now();
        let written = tokio::task::spawn_blocking(move || {
            let n = state.registry.as_ref().map_or(0, |r| r.events.len());
            store.write(&state).map(|()| n)
        })
        .await;
        match written {
            Ok(Ok(instances)) => {
                tracing::debug!(instances, took = ?started.elapsed(), "persisted the view");
            }
            Ok(Err(e)) => {
                // Try again at the next change.
                self.inner.dirty.store(true, Ordering::Release);
                tracing::warn!(error = %e, "persisting the view failed");
            }
            Err(e) => tracing::warn!(error = %e, "the persisting task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Routes;
    use weir_client::{
        agent::PolicyChange,
        policy::{load_balancer::Algorithm, EventMatch, LoadBalancer, Rule, TrafficPolicy},
        Event, EventType, Instance, ServiceProtection,
    };

    fn instance(id: &str, port: u32) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port,
            ..Instance::default()
        }
    }

    fn mirror() -> RegistryMirror {
        let mut m = RegistryMirror::default();
        m.apply(WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: [instance("a", 1001), instance("b", 1002)]
                .into_iter()
                .map(|i| Event {
                    r#type: EventType::Put as i32,
                    instance: Some(i),
                    revision: 40,
                })
                .collect(),
            revision: 42,
            snapshot_complete: true,
            protection: vec![ServiceProtection {
                namespace: "default".into(),
                service: "orders".into(),
                active: true,
                ..ServiceProtection::default()
            }],
            ..WatchResponse::default()
        })
        .expect("a valid snapshot");
        m
    }

    fn policies() -> PolicySet {
        let change = PolicyChange {
            namespace: "default".into(),
            service: "orders".into(),
            version: 17,
            policy: Some(TrafficPolicy {
                rules: vec![Rule {
                    name: "heavy".into(),
                    r#match: Some(EventMatch {
                        type_prefix: "com.example.heavy.".into(),
                        ..EventMatch::default()
                    }),
                    load_balancer: Some(LoadBalancer {
                        algorithm: Algorithm::WeightedRoundRobin as i32,
                        ..LoadBalancer::default()
                    }),
                    ..Rule::default()
                }],
                ..TrafficPolicy::default()
            }),
        };
        [(("default".into(), "orders".into()), change)].into()
    }

    fn acks() -> BTreeMap<String, PolicyAck> {
        [(
            "default/orders".to_owned(),
            PolicyAck {
                version: 17,
                at_unix_ms: 5,
                unenforced: vec!["rate_limit".into()],
            },
        )]
        .into()
    }

    /// node-a's state with the test mirror, policies (revision 18) and
    /// acknowledgements, and no subscriptions.
    fn sample_state() -> PersistedState {
        state_of("node-a", &mirror(), &policies(), 18, &acks(), &[])
    }

    #[test]
    fn a_written_state_reads_back_into_a_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("nested/data"), "node-a").expect("open");
        store.write(&sample_state()).expect("write");
        assert!(!dir.path().join("nested/data").join(TEMP).exists());

        let saved = store.read().expect("reads").expect("a file");
        assert_eq!(saved.policy_revision, 18);
        assert_eq!(saved.policies, policies());
        assert_eq!(saved.acks["default/orders"].version, 17);
        assert_eq!(saved.acks["default/orders"].unenforced, ["rate_limit"]);

        let mut view = View::new(Arc::new(Routes::default()), Duration::from_secs(30));
        let seed = store.restore(&mut view).expect("restored");
        assert_eq!(seed.policy_revision, 18);
        assert!(view.is_loaded());
        assert_eq!(view.revision(), 42);
        let route = view.routes().get("default", "orders").expect("a route");
        assert_eq!(route.balancer.endpoints().len(), 2);
        assert!(route.protection, "the protection state is kept");
        assert!(route.has_rules(), "the saved policy's rules are applied");
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), "node-a").expect("open");
        let mut view = View::new(Arc::new(Routes::default()), Duration::from_secs(30));
        assert!(store.read().expect("no file").is_none());
        assert!(store.restore(&mut view).is_none());

        std::fs::write(store.path(), b"\xff\xff\xff not a protobuf").expect("write");
        assert!(matches!(store.read(), Err(LoadError::Decode(_))));
        assert!(store.restore(&mut view).is_none());
        assert!(!view.is_loaded(), "a corrupt file leaves the view empty");

        let other = Store::open(dir.path(), "node-b").expect("open");
        store.write(&sample_state()).expect("write");
        assert!(matches!(other.read(), Err(LoadError::OtherNode(n)) if n == "node-a"));
        assert!(other.restore(&mut view).is_none());
        assert!(!view.is_loaded());

        let mut partial = state_of("node-a", &mirror(), &policies(), 18, &acks(), &[]);
        if let Some(r) = partial.registry.as_mut() {
            r.snapshot_complete = false;
        }
        store.write(&partial).expect("write");
        assert!(matches!(store.read(), Err(LoadError::Invalid(_))));

        let future = PersistedState {
            format: FORMAT + 1,
            ..state_of("node-a", &mirror(), &policies(), 18, &acks(), &[])
        };
        store.write(&future).expect("write");
        assert!(matches!(store.read(), Err(LoadError::Format(_))));
    }

    #[test]
    fn an_unusable_data_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        let e = Store::open(&file.join("data"), "node-a").expect_err("under a file");
        assert!(matches!(e, PersistError::Create { .. }), "{e}");
        assert!(e.to_string().contains("cannot create the data dir"), "{e}");
        let e = Store::open(&file, "node-a").expect_err("a file, not a directory");
        assert!(
            matches!(
                e,
                PersistError::NotWritable { .. } | PersistError::Create { .. }
            ),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_data_dir_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        // Root writes anywhere: the test above covers it.
        if std::fs::File::create(ro.join("x")).is_ok() {
            return;
        }
        let e = Store::open(&ro, "node-a").expect_err("not writable");
        assert!(matches!(e, PersistError::NotWritable { .. }), "{e}");
        assert!(e.to_string().contains("not writable"));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_written_debounced_and_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), "node-a").expect("open");
        let mirror = Arc::new(RwLock::new(mirror()));
        let (state_tx, state_rx) = watch::channel(SessionState::default());
        let p = Persister::new(store.clone(), mirror.clone(), state_rx, None);
        p.touch();
        p.flush().await;
        assert!(!store.path().exists(), "no view loaded: nothing written");

        state_tx.send_modify(|s| {
            s.view_loaded = true;
            s.policies = acks();
        });
        let writer = tokio::spawn(p.clone().run());
        p.set_policies(&policies(), 18);
        for _ in 0..100 {
            p.touch();
        }
        tokio::time::sleep(DEBOUNCE / 2).await;
        assert!(!store.path().exists(), "not before the debounce period");
        tokio::time::sleep(DEBOUNCE).await;
        // The write runs on a blocking thread: wait for it, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !store.path().exists() {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(5));
        }
        let saved = store.read().expect("reads").expect("a file");
        assert_eq!(saved.policy_revision, 18);
        assert_eq!(saved.registry.revision, 42);
        writer.abort();

        mirror
            .write()
            .expect("lock")
            .apply(WatchResponse {
                kind: WatchKind::Progress as i32,
                revision: 50,
                ..WatchResponse::default()
            })
            .expect("ok");
        p.touch();
        p.flush().await;
        assert_eq!(
            store
                .read()
                .expect("reads")
                .expect("a file")
                .registry
                .revision,
            50
        );
        std::fs::remove_file(store.path()).expect("rm");
        p.flush().await;
        assert!(!store.path().exists(), "nothing changed: no write");
    }

    fn retained(service: &str, since: i64) -> SavedSubscription {
        SavedSubscription {
            namespace: "default".into(),
            topic: "orders".into(),
            service: service.into(),
            unlisted_since_unix_ms: Some(since),
            retention: Duration::from_secs(3600),
        }
    }

    #[test]
    fn subscriptions_round_trip_and_restore_after_the_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), "node-a").expect("open");
        let now = now_unix_ms();
        let subscriptions = [
            // Listed by orders' instances when written (they list no topic
            // here: the restored view does not list it).
            SavedSubscription {
                topic: "audit".into(),
                service: "orders".into(),
                unlisted_since_unix_ms: None,
                ..retained("orders", 0)
            },
            retained("billing", now - 60_000),
            // Past its retention by the restore.
            retained("gone", now - 3_600_000),
        ];
        store
            .write(&state_of(
                "node-a",
                &mirror(),
                &policies(),
                18,
                &acks(),
                &subscriptions,
            ))
            .expect("write");
        let saved = store.read().expect("reads").expect("a file");
        assert_eq!(saved.subscriptions, subscriptions);

        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), Duration::from_secs(30));
        store.restore(&mut view).expect("restored");
        assert_eq!(
            routes.subscription_list(),
            [
                ("default".into(), "audit".into(), "orders".into(), false),
                ("default".into(), "orders".into(), "billing".into(), false),
            ],
            "retained ones are back, not listed; the expired one is dropped"
        );
        assert_eq!(routes.subscribers("default", "orders").len(), 1);
        // Saved again on the original clock, not the restart's.
        let again = routes.saved_subscriptions(now_unix_ms());
        let billing = again
            .iter()
            .find(|s| s.service == "billing")
            .expect("billing");
        let since = billing.unlisted_since_unix_ms.expect("unlisted");
        assert!(
            (now - 60_000 - 1_000..=now - 60_000 + 1_000).contains(&since),
            "{since} vs {}",
            now - 60_000
        );
    }

    /// `PersistedState` as the previous build wrote it: no subscriptions.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PersistedStateV1 {
        #[prost(uint32, tag = "1")]
        format: u32,
        #[prost(string, tag = "2")]
        node_id: String,
        #[prost(int64, tag = "3")]
        written_unix_ms: i64,
        #[prost(message, optional, tag = "4")]
        registry: Option<WatchResponse>,
        #[prost(message, optional, tag = "5")]
        policies: Option<PolicyUpdate>,
        #[prost(message, repeated, tag = "6")]
        acks: Vec<PersistedAck>,
    }

    #[test]
    fn a_file_from_the_previous_build_loads_without_subscriptions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), "node-a").expect("open");
        let now = state_of("node-a", &mirror(), &policies(), 18, &acks(), &[]);
        let old = PersistedStateV1 {
            format: now.format,
            node_id: now.node_id,
            written_unix_ms: now.written_unix_ms,
            registry: now.registry,
            policies: now.policies,
            acks: now.acks,
        };
        std::fs::write(store.path(), old.encode_to_vec()).expect("write");
        let saved = store.read().expect("reads").expect("a file");
        assert!(saved.subscriptions.is_empty());
        assert_eq!(saved.policy_revision, 18);
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), Duration::from_secs(30));
        store.restore(&mut view).expect("restored");
        assert_eq!(view.revision(), 42);
        assert!(routes.subscription_list().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_persister_writes_the_subscriptions_with_the_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), "node-a").expect("open");
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), Duration::from_secs(30));
        assert!(store.restore(&mut view).is_none(), "no file yet");
        let (state_tx, state_rx) = watch::channel(SessionState::default());
        let p = Persister::new(store.clone(), view.mirror(), state_rx, None);
        state_tx.send_modify(|s| s.view_loaded = true);
        let billing = Instance {
            service: "billing".into(),
            topics: vec!["orders".into()],
            ..instance("b0", 1003)
        };
        let event = |t: EventType| Event {
            r#type: t as i32,
            instance: Some(billing.clone()),
            revision: 50,
        };
        view.apply(WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: vec![event(EventType::Put)],
            revision: 50,
            snapshot_complete: true,
            ..WatchResponse::default()
        })
        .expect("applies");
        p.touch();
        p.flush().await;
        let saved = store.read().expect("reads").expect("a file");
        assert_eq!(saved.subscriptions.len(), 1);
        assert_eq!(saved.subscriptions[0].unlisted_since_unix_ms, None);

        // Billing's instance leaves: the retained subscription is saved.
        view.apply(WatchResponse {
            kind: WatchKind::Changes as i32,
            events: vec![Event {
                revision: 51,
                ..event(EventType::Delete)
            }],
            revision: 51,
            ..WatchResponse::default()
        })
        .expect("applies");
        p.touch();
        p.flush().await;
        let saved = store.read().expect("reads").expect("a file");
        assert!(saved.registry.events.is_empty());
        let since = saved.subscriptions[0]
            .unlisted_since_unix_ms
            .expect("unlisted");
        assert!(since <= now_unix_ms());

        // A restart on that file routes nothing but keeps the subscriber.
        let restarted = Arc::new(Routes::default());
        let mut again = View::new(restarted.clone(), Duration::from_secs(30));
        store.restore(&mut again).expect("restored");
        assert_eq!(
            restarted.subscription_list(),
            [("default".into(), "orders".into(), "billing".into(), false)]
        );
        assert_eq!(
            restarted.subscribers("default", "orders").len(),
            1,
            "an event published now is kept for billing"
        );
    }
}
