//! End-to-end tests of the registry: real etcd, real `weir-control-plane`
//! processes, gRPC over loopback.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tonic::{transport::Channel, Code};
use weir_proto::registry::v1::{
    registry_client::RegistryClient, watch_response::Kind, DeregisterRequest, EventType,
    GetServiceRequest, HeartbeatRequest, Instance, InstanceRef, ListServicesRequest,
    RegisterRequest, WatchRequest, WatchResponse,
};
use weir_tests::{
    fixtures::{ephemeral, instance},
    http_get, init_tracing, start_replicas, unique_prefix, wait_until, ControlPlaneProcess, Etcd,
};

async fn client(plane: &ControlPlaneProcess) -> Result<RegistryClient<Channel>> {
    Ok(RegistryClient::connect(plane.endpoint()).await?)
}

/// Registers and returns the stored record.
async fn registered(c: &mut RegistryClient<Channel>, instance: Instance) -> Result<Instance> {
    c.register(RegisterRequest {
        instance: Some(instance),
        ..RegisterRequest::default()
    })
    .await?
    .into_inner()
    .instance
    .context("no instance in RegisterResponse")
}

async fn instance_ids(
    c: &mut RegistryClient<Channel>,
    namespace: &str,
    service: &str,
) -> Result<Vec<String>> {
    let resp = c
        .get_service(GetServiceRequest {
            namespace: namespace.into(),
            service: service.into(),
            ..GetServiceRequest::default()
        })
        .await?
        .into_inner();
    Ok(resp
        .service
        .map(|s| s.instances.into_iter().map(|i| i.instance_id).collect())
        .unwrap_or_default())
}

/// Waits up to `deadline` until `default/service` has no instances.
async fn until_empty(
    c: &RegistryClient<Channel>,
    service: &str,
    deadline: Duration,
    what: &str,
) -> Result<()> {
    wait_until(deadline, what, || {
        let mut c = c.clone();
        async move {
            instance_ids(&mut c, "default", service)
                .await
                .is_ok_and(|ids| ids.is_empty())
        }
    })
    .await
}

async fn listed(c: &mut RegistryClient<Channel>, namespace: &str, service: &str) -> Result<bool> {
    let resp = c
        .list_services(ListServicesRequest {
            namespace: namespace.into(),
            ..ListServicesRequest::default()
        })
        .await?
        .into_inner();
    Ok(resp
        .services
        .iter()
        .any(|s| s.name == service && !s.instances.is_empty()))
}

/// A watch stream with a local view of (service/instance -> revision).
struct Watcher {
    stream: tonic::Streaming<WatchResponse>,
    /// Every change event seen, in order: (type, instance id, revision).
    events: Vec<(i32, String, u64)>,
    view: BTreeMap<String, u64>,
    revision: u64,
    /// Complete snapshots received.
    snapshots: usize,
    in_snapshot: bool,
}

impl Watcher {
    async fn open(
        c: &mut RegistryClient<Channel>,
        namespace: &str,
        service: &str,
        start_revision: u64,
    ) -> Result<Self> {
        let stream = c
            .watch(WatchRequest {
                namespace: namespace.into(),
                service: service.into(),
                start_revision,
            })
            .await?
            .into_inner();
        Ok(Self {
            stream,
            events: Vec::new(),
            view: BTreeMap::new(),
            revision: start_revision,
            snapshots: 0,
            in_snapshot: false,
        })
    }

    /// Applies the next message (bounded wait).
    async fn step(&mut self, deadline: Duration) -> Result<()> {
        let message = tokio::time::timeout(deadline, self.stream.next())
            .await
            .context("watch message timed out")?
            .context("watch stream ended")??;
        let kind = Kind::try_from(message.kind)?;
        if kind == Kind::Snapshot {
            // A snapshot may span messages: the first replaces the view.
            if !self.in_snapshot {
                self.view.clear();
            }
            self.in_snapshot = !message.snapshot_complete;
            if message.snapshot_complete {
                self.snapshots += 1;
            }
        }
        for e in &message.events {
            let id = e
                .instance
                .as_ref()
                .map(|i| i.instance_id.clone())
                .unwrap_or_default();
            if kind == Kind::Changes {
                self.events.push((e.r#type, id.clone(), e.revision));
            }
            if e.r#type == EventType::Delete as i32 {
                self.view.remove(&id);
            } else {
                self.view.insert(id, e.revision);
            }
        }
        if message.revision > 0 {
            self.revision = message.revision;
        }
        Ok(())
    }

    async fn until(
        &mut self,
        deadline: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while !done(self) {
            let left = deadline
                .checked_sub(start.elapsed())
                .with_context(|| format!("timed out waiting for {what}"))?;
            self.step(left)
                .await
                .with_context(|| format!("waiting for {what}"))?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn ephemeral_instance_without_heartbeats_is_gone_within_ttl_plus_one_second() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("ttl").await?;
    let mut c = client(&plane).await?;
    let mut watcher = Watcher::open(&mut c, "default", "ttl-svc", 0).await?;
    watcher
        .until(Duration::from_secs(5), "initial snapshot", |w| {
            w.snapshots == 1
        })
        .await?;

    let registered = c
        .register(RegisterRequest {
            instance: Some(ephemeral("default", "ttl-svc", "i-1", 3)),
            ..RegisterRequest::default()
        })
        .await?
        .into_inner();
    let start = Instant::now();
    assert_eq!(registered.ttl_seconds, 3);
    let deadline = Duration::from_secs(4);

    watcher
        .until(deadline, "the PUT", |w| w.view.contains_key("i-1"))
        .await?;
    assert_eq!(
        instance_ids(&mut c, "default", "ttl-svc").await?,
        vec!["i-1".to_string()]
    );

    watcher
        .until(
            deadline.saturating_sub(start.elapsed()),
            "the DELETE",
            |w| !w.view.contains_key("i-1"),
        )
        .await?;
    let gone_on_watch = start.elapsed();
    wait_until(
        deadline.saturating_sub(start.elapsed()),
        "Get and List to drop it",
        || {
            let mut c = c.clone();
            async move {
                instance_ids(&mut c, "default", "ttl-svc")
                    .await
                    .is_ok_and(|ids| ids.is_empty())
                    && listed(&mut c, "default", "ttl-svc").await.is_ok_and(|l| !l)
            }
        },
    )
    .await?;
    let gone = start.elapsed();
    assert!(gone <= deadline, "gone after {gone:?}");
    // It did not vanish early either: leases expire at their TTL, not before.
    assert!(
        gone_on_watch >= Duration::from_secs(2),
        "expired too early: {gone_on_watch:?}"
    );

    let heartbeat = c
        .heartbeat(HeartbeatRequest {
            instance: Some(InstanceRef {
                namespace: "default".into(),
                service: "ttl-svc".into(),
                instance_id: "i-1".into(),
            }),
        })
        .await
        .expect_err("heartbeat on an expired registration");
    assert_eq!(heartbeat.code(), Code::NotFound, "{heartbeat}");
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_an_ephemeral_instance_for_as_long_as_they_come() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("hb").await?;
    let mut c = client(&plane).await?;
    c.register(RegisterRequest {
        instance: Some(ephemeral("default", "hb-svc", "i-1", 3)),
        ..RegisterRequest::default()
    })
    .await?;
    let r = InstanceRef {
        namespace: "default".into(),
        service: "hb-svc".into(),
        instance_id: "i-1".into(),
    };
    // Three TTLs of heartbeats every TTL/3: present at every check.
    let start = Instant::now();
    let mut period = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < Duration::from_secs(9) {
        period.tick().await;
        let ttl = c
            .heartbeat(HeartbeatRequest {
                instance: Some(r.clone()),
            })
            .await?
            .into_inner()
            .ttl_seconds;
        assert!(ttl >= 2, "ttl {ttl}");
        assert_eq!(
            instance_ids(&mut c, "default", "hb-svc").await?,
            vec!["i-1".to_string()]
        );
    }
    // Heartbeats stop: gone within TTL + 1 s.
    let stopped = Instant::now();
    until_empty(
        &c,
        "hb-svc",
        Duration::from_secs(4),
        "expiry after heartbeats stop",
    )
    .await?;
    assert!(stopped.elapsed() >= Duration::from_secs(2));
    Ok(())
}

/// Registers instance `i-{n:04}` of service `svc-{n % 10}` in namespace
/// "order" on `port`; returns its revision.
async fn register_order(c: &mut RegistryClient<Channel>, n: u32, port: u32) -> Result<u64> {
    let service = format!("svc-{}", n % 10);
    let stored = registered(c, instance("order", &service, &format!("i-{n:04}"), port)).await?;
    Ok(stored.revision)
}

#[tokio::test]
async fn a_thousand_registrations_reach_three_watchers_in_the_same_order_and_resume_is_exact(
) -> Result<()> {
    let (_etcd, [a, b]) = start_replicas("order").await?;
    let mut ca = client(&a).await?;
    let mut cb = client(&b).await?;

    // Three concurrent watchers, two on replica A and one on replica B.
    let mut watchers = vec![
        Watcher::open(&mut ca, "order", "", 0).await?,
        Watcher::open(&mut ca, "order", "", 0).await?,
        Watcher::open(&mut cb, "order", "", 0).await?,
    ];
    for w in &mut watchers {
        w.until(Duration::from_secs(5), "initial snapshot", |w| {
            w.snapshots == 1
        })
        .await?;
    }

    // 1,000 registrations from 16 concurrent writers across both replicas.
    let mut writers = Vec::new();
    for t in 0..16u32 {
        let mut c = if t % 2 == 0 { ca.clone() } else { cb.clone() };
        writers.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for n in 0..1000u32 {
                if n % 16 != t {
                    continue;
                }
                revisions.push(register_order(&mut c, n, 1000 + n).await?);
            }
            anyhow::Ok(revisions)
        }));
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await??);
    }
    written.sort_unstable();
    assert_eq!(written.len(), 1000);

    let watchers_seen = futures::future::join_all(watchers.iter_mut().map(|w| {
        w.until(Duration::from_secs(20), "1,000 PUTs", |w| {
            w.events.len() >= 1000
        })
    }))
    .await;
    for r in watchers_seen {
        r?;
    }
    let reference: Vec<(i32, String, u64)> = watchers[0].events.clone();
    let revisions: Vec<u64> = reference.iter().map(|e| e.2).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions not strictly increasing"
    );
    assert_eq!(
        revisions, written,
        "watch revisions differ from the writes' revisions (gap or extra)"
    );
    for w in &watchers[1..] {
        assert_eq!(w.events, reference, "watchers disagree on order");
    }

    // Resume: a watcher at revision R (taken from replica A) reconnects to
    // replica B after 100 deregistrations and 50 re-registrations happened.
    let r = watchers[2].revision;
    assert_eq!(r, *written.last().unwrap_or(&0));
    drop(watchers.pop());
    let mut expected = Vec::new();
    for n in 0..100u32 {
        let resp = ca
            .deregister(DeregisterRequest {
                instance: Some(InstanceRef {
                    namespace: "order".into(),
                    service: format!("svc-{}", n % 10),
                    instance_id: format!("i-{n:04}"),
                }),
            })
            .await?
            .into_inner();
        assert!(resp.existed);
        expected.push((EventType::Delete as i32, format!("i-{n:04}"), resp.revision));
    }
    for n in 0..50u32 {
        let revision = register_order(&mut ca, n, 2000 + n).await?;
        expected.push((EventType::Put as i32, format!("i-{n:04}"), revision));
    }
    let mut resumed = Watcher::open(&mut cb, "order", "", r).await?;
    resumed
        .until(Duration::from_secs(10), "the 150 changes", |w| {
            w.events.len() >= 150
        })
        .await?;
    assert_eq!(
        resumed.snapshots, 0,
        "resume within history must not resync"
    );
    assert_eq!(resumed.events, expected);
    // And nothing more arrives: the resumed stream is exact.
    ca.register(RegisterRequest {
        instance: Some(instance("order", "marker", "m", 9)),
        ..RegisterRequest::default()
    })
    .await?;
    resumed
        .until(Duration::from_secs(5), "the marker", |w| {
            w.events.len() > 150
        })
        .await?;
    assert_eq!(resumed.events.len(), 151);
    assert_eq!(resumed.events[150].1, "m");
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_the_field() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("bad").await?;
    let mut c = client(&plane).await?;
    let edited = |edit: fn(&mut Instance)| {
        let mut i = instance("default", "svc", "i", 1);
        edit(&mut i);
        i
    };
    let cases = [
        (edited(|i| i.port = 0), "instance.port"),
        (
            edited(|i| i.service = "Bad_Name".into()),
            "instance.service",
        ),
        (edited(|i| i.host = String::new()), "instance.host"),
        (
            edited(|i| {
                i.ephemeral = true;
                i.ttl_seconds = 1;
            }),
            "instance.ttl_seconds",
        ),
        (edited(|i| i.weight = 20_000), "instance.weight"),
        (
            edited(|i| i.instance_id = "a/b".into()),
            "instance.instance_id",
        ),
    ];
    for (bad, field) in cases {
        let status = c
            .register(RegisterRequest {
                instance: Some(bad),
                ..RegisterRequest::default()
            })
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let status = c
        .register(RegisterRequest {
            instance: None,
            ..RegisterRequest::default()
        })
        .await
        .expect_err("none");
    assert_eq!(status.code(), Code::InvalidArgument);

    // A request over the 64 KiB limit is refused, not buffered.
    let huge = Instance {
        metadata: (0..200)
            .map(|n| (format!("k{n}"), "v".repeat(500)))
            .collect(),
        ..instance("default", "svc", "i", 1)
    };
    let status = c
        .register(RegisterRequest {
            instance: Some(huge),
            ..RegisterRequest::default()
        })
        .await
        .expect_err("huge");
    assert_ne!(status.code(), Code::Ok);

    let status = c
        .list_services(ListServicesRequest {
            page_token: "garbage!".into(),
            ..ListServicesRequest::default()
        })
        .await
        .expect_err("token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_token"));
    let status = c
        .watch(WatchRequest {
            namespace: "NOPE".into(),
            ..WatchRequest::default()
        })
        .await
        .expect_err("watch namespace");
    assert_eq!(status.code(), Code::InvalidArgument);

    // The replica is still fine.
    c.register(RegisterRequest {
        instance: Some(instance("default", "svc", "i", 1)),
        ..RegisterRequest::default()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn reregistering_is_idempotent_and_list_paginates_and_filters() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("idem").await?;
    let mut c = client(&plane).await?;
    let first = registered(&mut c, ephemeral("shop", "cart", "c-1", 10)).await?;
    let again = registered(&mut c, ephemeral("shop", "cart", "c-1", 10)).await?;
    assert_eq!(
        first.revision, again.revision,
        "identical re-registration must not write"
    );
    assert_eq!(first.lease_id, again.lease_id);
    let changed = registered(
        &mut c,
        Instance {
            version: "2".into(),
            ..ephemeral("shop", "cart", "c-1", 10)
        },
    )
    .await?;
    assert!(changed.revision > first.revision);
    assert_eq!(changed.registered_at_unix_ms, first.registered_at_unix_ms);

    // Server-assigned ids.
    let assigned = registered(&mut c, instance("shop", "cart", "", 81)).await?;
    assert_eq!(assigned.instance_id.len(), 16);

    // 25 services, pages of 10, metadata filter.
    let mut last_revision = 0;
    for n in 0..25 {
        let mut i = instance("shop", &format!("s{n:02}"), "x", 80);
        i.metadata.insert(
            "tier".into(),
            if n % 5 == 0 { "gold" } else { "std" }.into(),
        );
        last_revision = registered(&mut c, i).await?.revision;
    }
    // Read-your-writes.
    let got = c
        .get_service(GetServiceRequest {
            namespace: "shop".into(),
            service: "s24".into(),
            min_revision: last_revision,
            healthy_only: false,
        })
        .await?
        .into_inner();
    assert!(got.revision >= last_revision);
    assert_eq!(got.service.context("service")?.instances.len(), 1);

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_services(ListServicesRequest {
                namespace: "shop".into(),
                name_prefix: "s".into(),
                page_size: 10,
                page_token: token.clone(),
                ..ListServicesRequest::default()
            })
            .await?
            .into_inner();
        pages += 1;
        names.extend(page.services.iter().map(|s| s.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        if pages > 5 {
            bail!("pagination does not end");
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        (0..25).map(|n| format!("s{n:02}")).collect::<Vec<_>>()
    );
    let gold = c
        .list_services(ListServicesRequest {
            namespace: "shop".into(),
            metadata: [("tier".to_string(), "gold".to_string())].into(),
            ..ListServicesRequest::default()
        })
        .await?
        .into_inner();
    let gold: HashSet<String> = gold.services.into_iter().map(|s| s.name).collect();
    assert_eq!(
        gold,
        ["s00", "s05", "s10", "s15", "s20"].map(String::from).into()
    );
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_are_served_and_sigterm_drains() -> Result<()> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let (_etcd, [mut plane]) = start_replicas("health").await?;
    let channel = Channel::from_shared(plane.endpoint())?.connect().await?;

    let mut health = HealthClient::new(channel.clone());
    wait_until(Duration::from_secs(5), "SERVING", || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "weir.registry.v1.Registry".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        }
    })
    .await?;
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.next().await.context("no reflection answer")??;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        bail!("unexpected reflection answer");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("weir.registry.v1.Registry"), "{names:?}");
    assert!(names.contains("grpc.health.v1.Health"), "{names:?}");

    // /healthz and /readyz over plain HTTP.
    let ready = http_get(plane.http_addr(), "/readyz").await?;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("\"store\":\"etcd\""), "{ready}");
    assert!(http_get(plane.http_addr(), "/healthz")
        .await?
        .starts_with("HTTP/1.1 200"));

    // SIGTERM ends the process cleanly (once our open reflection stream is
    // gone, without waiting for the drain timeout).
    drop((responses, reflection, health));
    let status = plane.terminate()?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test]
async fn dev_mode_serves_the_registry_on_the_embedded_store() -> Result<()> {
    init_tracing();
    let plane = ControlPlaneProcess::start_args(&["--dev".to_string()])?;
    let mut c = client(&plane).await?;
    let mut watcher = Watcher::open(&mut c, "", "", 0).await?;
    watcher
        .until(Duration::from_secs(5), "snapshot", |w| w.snapshots == 1)
        .await?;
    c.register(RegisterRequest {
        instance: Some(ephemeral("default", "dev-svc", "d-1", 2)),
        ..RegisterRequest::default()
    })
    .await?;
    watcher
        .until(Duration::from_secs(5), "PUT", |w| {
            w.view.contains_key("d-1")
        })
        .await?;
    watcher
        .until(Duration::from_secs(4), "lease expiry", |w| {
            !w.view.contains_key("d-1")
        })
        .await?;
    let ready = http_get(plane.http_addr(), "/readyz").await?;
    assert!(ready.contains("\"store\":\"embedded\""), "{ready}");
    Ok(())
}

#[tokio::test]
async fn keep_alive_stream_renews_many_registrations_and_reports_lost_ones() -> Result<()> {
    use weir_proto::registry::v1::KeepAliveRequest;
    let (_etcd, [plane]) = start_replicas("ka").await?;
    let mut c = client(&plane).await?;
    let refs: Vec<InstanceRef> = (0..3)
        .map(|n| InstanceRef {
            namespace: "default".into(),
            service: "ka-svc".into(),
            instance_id: format!("k-{n}"),
        })
        .collect();
    for r in &refs[..2] {
        c.register(RegisterRequest {
            instance: Some(ephemeral("default", "ka-svc", &r.instance_id, 3)),
            ..RegisterRequest::default()
        })
        .await?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Six rounds at TTL/3 keep both alive past two TTLs; k-2 never existed.
    let mut period = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..6 {
        period.tick().await;
        tx.send(KeepAliveRequest {
            instances: refs.clone(),
        })
        .await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), responses.next())
            .await?
            .context("stream ended")??;
        let alive: Vec<bool> = reply.results.iter().map(|r| r.alive).collect();
        assert_eq!(alive, vec![true, true, false]);
        assert_eq!(
            reply.results[2].code,
            Code::NotFound as i32,
            "gone: register again"
        );
        assert_eq!(reply.results[0].code, 0);
        assert!(
            reply.results[2].error.contains("gone"),
            "{}",
            reply.results[2].error
        );
    }
    assert_eq!(instance_ids(&mut c, "default", "ka-svc").await?.len(), 2);

    // A malformed ref in the batch is reported on its own, naming it.
    tx.send(KeepAliveRequest {
        instances: vec![InstanceRef {
            namespace: "default".into(),
            service: "BAD".into(),
            instance_id: "x".into(),
        }],
    })
    .await?;
    let reply = responses.next().await.context("stream ended")??;
    assert!(!reply.results[0].alive);
    assert_eq!(reply.results[0].code, Code::InvalidArgument as i32);
    assert!(
        reply.results[0].error.contains("instances[0].service"),
        "{}",
        reply.results[0].error
    );
    drop(tx);
    // Stream closed by us: the renewals stop and both expire.
    until_empty(
        &c,
        "ka-svc",
        Duration::from_secs(5),
        "expiry after the stream closed",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn resume_on_a_replica_started_after_the_revision_reads_the_gap_from_etcd() -> Result<()> {
    init_tracing();
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix("gap");
    let a = ControlPlaneProcess::start(&etcd, &prefix)?;
    let mut ca = client(&a).await?;
    let mut watcher = Watcher::open(&mut ca, "gap", "", 0).await?;
    watcher
        .until(Duration::from_secs(5), "snapshot", |w| w.snapshots == 1)
        .await?;
    registered(&mut ca, instance("gap", "svc", "before", 1)).await?;
    watcher
        .until(Duration::from_secs(5), "first PUT", |w| {
            w.view.contains_key("before")
        })
        .await?;
    let r = watcher.revision;
    drop(watcher);

    // Changes while the watcher is away, some before replica B exists.
    let mut expected = Vec::new();
    for n in 0..5u32 {
        let i = registered(&mut ca, instance("gap", "svc", &format!("g-{n}"), 10 + n)).await?;
        expected.push((EventType::Put as i32, i.instance_id, i.revision));
    }
    let gone = ca
        .deregister(DeregisterRequest {
            instance: Some(InstanceRef {
                namespace: "gap".into(),
                service: "svc".into(),
                instance_id: "before".into(),
            }),
        })
        .await?
        .into_inner();
    expected.push((EventType::Delete as i32, "before".into(), gone.revision));
    let b = ControlPlaneProcess::start(&etcd, &prefix)?;
    let mut cb = client(&b).await?;
    let i = registered(&mut ca, instance("gap", "svc", "after-b", 99)).await?;
    expected.push((EventType::Put as i32, i.instance_id, i.revision));

    let mut resumed = Watcher::open(&mut cb, "gap", "", r).await?;
    resumed
        .until(Duration::from_secs(10), "the 7 changes", |w| {
            w.events.len() >= expected.len()
        })
        .await?;
    assert_eq!(
        resumed.snapshots, 0,
        "the gap must come from etcd, not a resync"
    );
    assert_eq!(resumed.events, expected);
    Ok(())
}
