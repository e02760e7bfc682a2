//! End-to-end tests of health checking: real etcd, real control-plane
//! processes, real HTTP/TCP/gRPC servers as the checked instances.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};
use weir_tests::{follow, reason_in, status_in};

use anyhow::{ensure, Context, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use weir_client::{
    health_check, Client, GetHealthRequest, GetServiceRequest, GrpcCheck, HealthStatus,
    InstanceHealth, TcpCheck, WatchView,
};
use weir_tests::{
    fixtures::{checked, http_check, HttpInstance},
    init_tracing, start_one, unique_prefix, wait_until, workspace_binary, ControlPlaneProcess,
    Etcd,
};

/// Feeds `view` until `default/service/id` has `status`; fails after 10 s.
/// Returns when it was seen.
async fn until_status(
    view: &mut WatchView,
    service: &str,
    id: &str,
    status: HealthStatus,
    what: &str,
) -> Result<Instant> {
    follow(view, Duration::from_secs(10), what, |v| {
        status_in(v, service, id) == Some(status)
    })
    .await
}

/// The health record of the first instance of `default/service`.
async fn first_health(client: &Client, service: &str) -> Result<InstanceHealth> {
    client
        .get_health(GetHealthRequest {
            namespace: "default".into(),
            service: service.into(),
            ..GetHealthRequest::default()
        })
        .await?
        .instances
        .into_iter()
        .next()
        .context("instance")
}

/// Feeds `view` until `default/service/id` is CRITICAL, then checks that
/// the reason given mentions `cause`.
async fn critical_because(
    view: &mut WatchView,
    service: &str,
    id: &str,
    cause: &str,
    what: &str,
) -> Result<()> {
    until_status(view, service, id, HealthStatus::Critical, what).await?;
    let reason = reason_in(view, service, id);
    ensure!(reason.contains(cause), "{what}: reason {reason:?}");
    Ok(())
}

/// Registers instances `{tag}-0` to `{tag}-{n-1}` of `service`, each
/// checked every `interval_ms` on its own path `/{tag}-k` of `server`.
async fn register_each(
    client: &Client,
    server: &HttpInstance,
    service: &str,
    tag: &str,
    n: usize,
    interval_ms: u32,
) -> Result<()> {
    for k in 0..n {
        let id = format!("{tag}-{k}");
        let check = http_check(&format!("/{id}"));
        client
            .register(checked(service, &id, server.port(), check, interval_ms))
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn http_500_is_critical_on_the_watch_within_bound_and_recovers_only_after_successes(
) -> Result<()> {
    let (_etcd, _plane, client) = start_one("http500").await?;
    let server = HttpInstance::start().await?;
    let mut i = checked("web", "w-1", server.port(), http_check("/healthz"), 1000);
    if let Some(c) = i.health_check.as_mut() {
        c.failures_before_critical = 2;
        c.successes_before_passing = 3;
    }
    client.register(i).await?;
    let mut view = client.watch_view("default", "web");
    until_status(&mut view, "web", "w-1", HealthStatus::Passing, "PASSING").await?;

    server.set_status("/healthz", 500);
    let failed = Instant::now();
    let seen = until_status(&mut view, "web", "w-1", HealthStatus::Critical, "CRITICAL").await?;
    let took = seen - failed;
    // interval x failures_before_critical + 1 s.
    ensure!(took <= Duration::from_secs(3), "CRITICAL after {took:?}");
    let record = view.get("default", "web", "w-1").context("instance")?;
    let detail = record.health.as_ref().context("health detail")?;
    ensure!(
        detail.reason.contains("HTTP 500"),
        "reason {:?}",
        detail.reason
    );
    ensure!(
        detail.consecutive == 2 && !detail.checked_by.is_empty(),
        "{detail:?}"
    );

    server.set_status("/healthz", 200);
    let recovered = Instant::now();
    until_status(
        &mut view,
        "web",
        "w-1",
        HealthStatus::Passing,
        "PASSING again",
    )
    .await?;
    let good = server
        .hits_since("/healthz", recovered)
        .iter()
        .filter(|h| h.status == 200)
        .count();
    ensure!(
        good >= 3,
        "PASSING after only {good} good checks (successes_before_passing = 3)"
    );

    // The history has every transition, oldest first (it is appended just
    // after the status is written).
    let expected = [
        (HealthStatus::Unknown as i32, HealthStatus::Passing as i32),
        (HealthStatus::Passing as i32, HealthStatus::Critical as i32),
        (HealthStatus::Critical as i32, HealthStatus::Passing as i32),
    ];
    let transitions = || {
        let client = client.clone();
        async move {
            let moves: Vec<(i32, i32)> = first_health(&client, "web")
                .await?
                .transitions
                .iter()
                .map(|t| (t.from, t.to))
                .collect();
            anyhow::Ok(moves)
        }
    };
    wait_until(
        Duration::from_secs(5),
        "three transitions in the history",
        || {
            let t = transitions();
            async move { t.await.is_ok_and(|m| m.len() >= 3) }
        },
    )
    .await?;
    let moves = transitions().await?;
    ensure!(moves == expected, "{moves:?}");

    // weirctl shows it.
    let out = tokio::process::Command::new(workspace_binary("weirctl")?)
        .args(["--endpoint", client.endpoints()[0], "health", "web"])
        .output()
        .await?;
    ensure!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.contains("w-1") && text.contains("passing -> critical") && text.contains("HTTP 500"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_flapping_instance_is_held_out_not_bounced() -> Result<()> {
    let (_etcd, _plane, client) = start_one("flap").await?;
    let server = HttpInstance::start().await?;
    server.flap("/flap");
    client
        .register(checked(
            "flappy",
            "f-1",
            server.port(),
            http_check("/flap"),
            200,
        ))
        .await?;
    let start = Instant::now();
    wait_until(Duration::from_secs(20), "30 checks", || {
        let n = server.hits_since("/flap", start).len();
        async move { n >= 30 }
    })
    .await?;
    let i = first_health(&client, "flappy").await?;
    // UNKNOWN -> PASSING on the first good check, -> CRITICAL once two of
    // three failed; then it can never pass twice in a row: held out.
    ensure!(
        i.transitions.len() == 2,
        "{} transitions: {:?}",
        i.transitions.len(),
        i.transitions
    );
    ensure!(i.status == HealthStatus::Critical as i32);
    Ok(())
}

#[tokio::test]
async fn tcp_and_grpc_checks_work_against_real_servers() -> Result<()> {
    let (_etcd, _plane, client) = start_one("tcpgrpc").await?;

    // TCP: a listener that accepts; then it goes away.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let tcp_port = listener.local_addr()?.port();
    let acceptor = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    client
        .register(checked(
            "tcp-svc",
            "t-1",
            tcp_port,
            health_check::Kind::Tcp(TcpCheck {}),
            200,
        ))
        .await?;

    // gRPC: a tonic server speaking grpc.health.v1.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders.v1.Orders", tonic_health::ServingStatus::Serving)
        .await;
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_port = grpc_listener.local_addr()?.port();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(TcpListenerStream::new(grpc_listener)),
    );
    client
        .register(checked(
            "grpc-svc",
            "g-1",
            grpc_port,
            health_check::Kind::Grpc(GrpcCheck {
                service: "orders.v1.Orders".into(),
            }),
            200,
        ))
        .await?;

    let mut tcp_view = client.watch_view("default", "tcp-svc");
    let mut grpc_view = client.watch_view("default", "grpc-svc");
    until_status(
        &mut tcp_view,
        "tcp-svc",
        "t-1",
        HealthStatus::Passing,
        "TCP PASSING",
    )
    .await?;
    until_status(
        &mut grpc_view,
        "grpc-svc",
        "g-1",
        HealthStatus::Passing,
        "gRPC PASSING",
    )
    .await?;

    acceptor.abort();
    let _ = acceptor.await;
    critical_because(&mut tcp_view, "tcp-svc", "t-1", "connect", "TCP CRITICAL").await?;

    reporter
        .set_service_status("orders.v1.Orders", tonic_health::ServingStatus::NotServing)
        .await;
    critical_because(
        &mut grpc_view,
        "grpc-svc",
        "g-1",
        "NOT_SERVING",
        "gRPC CRITICAL",
    )
    .await?;
    grpc_server.abort();
    Ok(())
}

#[tokio::test]
async fn protection_is_announced_on_the_watch_when_too_few_are_healthy() -> Result<()> {
    let (_etcd, _plane, client) = start_one("protect").await?;
    let server = HttpInstance::start().await?;
    register_each(&client, &server, "shop", "s", 10, 200).await?;
    let mut view = client.watch_view("default", "shop");
    let count =
        |v: &WatchView, s: HealthStatus| v.instances().filter(|i| i.status == s as i32).count();
    follow(&mut view, Duration::from_secs(10), "10 PASSING", |v| {
        count(v, HealthStatus::Passing) == 10
    })
    .await?;
    ensure!(!view.in_protection("default", "shop"));

    // 5 of 10 failing is exactly the 50% threshold: not yet protection.
    for k in 0..5 {
        server.set_status(&format!("/s-{k}"), 500);
    }
    follow(&mut view, Duration::from_secs(10), "5 CRITICAL", |v| {
        count(v, HealthStatus::Critical) == 5
    })
    .await?;
    ensure!(
        !view.in_protection("default", "shop"),
        "5 of 10 healthy is not below 50%"
    );

    server.set_status("/s-5", 500);
    follow(&mut view, Duration::from_secs(10), "protection", |v| {
        v.in_protection("default", "shop")
    })
    .await?;
    ensure!(count(&view, HealthStatus::Critical) == 6);
    // In protection, healthy_only returns every instance.
    let svc = client
        .get_service(GetServiceRequest {
            namespace: "default".into(),
            service: "shop".into(),
            healthy_only: true,
            ..GetServiceRequest::default()
        })
        .await?
        .service
        .context("service")?;
    ensure!(
        svc.instances.len() == 10,
        "{} instances",
        svc.instances.len()
    );
    let p = svc.protection.context("protection")?;
    ensure!(
        p.active && p.healthy == 4 && p.total == 10 && p.threshold_percent == 50,
        "{p:?}"
    );

    for k in 0..6 {
        server.set_status(&format!("/s-{k}"), 200);
    }
    follow(
        &mut view,
        Duration::from_secs(10),
        "protection released",
        |v| !v.in_protection("default", "shop"),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_persistent_instance_critical_past_its_bound_is_deregistered() -> Result<()> {
    let (_etcd, _plane, client) = start_one("dereg").await?;
    let server = HttpInstance::start().await?;
    server.set_status("/down", 500);
    let mut i = checked("gone", "g-1", server.port(), http_check("/down"), 500);
    if let Some(c) = i.health_check.as_mut() {
        c.deregister_critical_after_seconds = 10;
    }
    client.register(i).await?;
    let mut view = client.watch_view("default", "gone");
    let critical =
        until_status(&mut view, "gone", "g-1", HealthStatus::Critical, "CRITICAL").await?;
    let removed = follow(&mut view, Duration::from_secs(20), "deregistration", |v| {
        v.revision() > 0 && v.get("default", "gone", "g-1").is_none()
    })
    .await?;
    let after = removed - critical;
    ensure!(
        after >= Duration::from_secs(9) && after <= Duration::from_secs(12),
        "removed {after:?} after going CRITICAL"
    );
    Ok(())
}

#[tokio::test]
async fn three_replicas_share_the_checks_and_take_over_a_dead_ones_within_its_lease_ttl(
) -> Result<()> {
    init_tracing();
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix("share");
    let start = |id: &str| {
        ControlPlaneProcess::start_args(&[
            format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
            format!("--etcd-prefix={prefix}"),
            format!("--replica-id={id}"),
            "--replica-ttl-seconds=3".into(),
        ])
    };
    let a = start("cp-a")?;
    let mut b = start("cp-b")?;
    let c = start("cp-c")?;
    let client = Client::connect([a.endpoint(), c.endpoint()]).await?;
    let server = HttpInstance::start().await?;
    let n = 30;
    register_each(&client, &server, "fleet", "f", n, 300).await?;
    let mut view = client.watch_view("default", "fleet");
    follow(&mut view, Duration::from_secs(15), "all PASSING", |v| {
        v.instances()
            .filter(|i| i.status == HealthStatus::Passing as i32)
            .count()
            == n
    })
    .await?;

    // Steady state: every instance is checked by exactly one replica.
    let checkers = |since: Instant| -> BTreeMap<String, BTreeSet<String>> {
        let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for h in server.hits().into_iter().filter(|h| h.at >= since) {
            by_path.entry(h.path).or_default().insert(h.checker);
        }
        by_path
    };
    // Over the last 2 s (about six checks each), every instance was checked,
    // each by one replica only, none of them `gone`. Start-up overlap may
    // take a moment to pass: wait for it, bounded.
    let window = Duration::from_secs(2);
    let settled = |gone: &'static str| {
        let by_path = checkers(
            Instant::now()
                .checked_sub(window)
                .unwrap_or_else(Instant::now),
        );
        let ok = by_path.len() == n
            && by_path
                .values()
                .all(|who| who.len() == 1 && !who.contains(gone));
        async move { ok }
    };
    wait_until(
        Duration::from_secs(10),
        "every instance checked by exactly one replica",
        || settled(""),
    )
    .await?;
    let steady = checkers(
        Instant::now()
            .checked_sub(window)
            .unwrap_or_else(Instant::now),
    );
    let owners: BTreeSet<String> = steady.values().flatten().cloned().collect();
    ensure!(
        owners == ["cp-a", "cp-b", "cp-c"].map(String::from).into(),
        "owners {owners:?}"
    );
    let orphaned: Vec<String> = steady
        .iter()
        .filter(|(_, who)| who.contains("cp-b"))
        .map(|(path, _)| path.clone())
        .collect();

    b.kill()?;
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "cp-b's instances checked by others",
        || {
            let done = orphaned.iter().all(|path| {
                server
                    .hits_since(path, killed)
                    .iter()
                    .any(|h| h.checker != "cp-b")
            });
            async move { done }
        },
    )
    .await?;
    let took = killed.elapsed();
    ensure!(
        took <= Duration::from_secs(3),
        "taken over after {took:?} (lease TTL 3 s)"
    );

    // And steady again: one checker each, among the survivors.
    wait_until(
        Duration::from_secs(10),
        "every instance checked by exactly one surviving replica",
        || settled("cp-b"),
    )
    .await?;
    Ok(())
}
