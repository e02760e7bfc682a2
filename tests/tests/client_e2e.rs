//! End-to-end tests of `weir-client` and `weirctl` against real etcd and
//! real `weir-control-plane` processes.

use std::{collections::HashSet, process::Stdio, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    time::Instant,
};
use weir_client::{
    Client, GetServiceRequest, Instance, InstanceRef, RegistrationState, WatchUpdate, WatchView,
};
use weir_tests::{
    fixtures::{ephemeral, instance},
    start_one, start_replicas, wait_until, weirctl, weirctl_ok, workspace_binary,
};

fn persistent(service: &str, id: &str) -> Instance {
    instance("default", service, id, 8080)
}

async fn instances(client: &Client, service: &str) -> Result<Vec<Instance>> {
    Ok(client
        .get_service(GetServiceRequest {
            namespace: "default".into(),
            service: service.into(),
            ..GetServiceRequest::default()
        })
        .await?
        .service
        .map(|s| s.instances)
        .unwrap_or_default())
}

/// Feeds `view` until `deadline`, failing on any removal of `id`.
async fn never_removed(
    view: &mut weir_client::WatchView,
    id: &str,
    deadline: Instant,
) -> Result<()> {
    loop {
        match tokio::time::timeout_at(deadline, view.next()).await {
            Err(_) => return Ok(()),
            Ok(update) => {
                if let WatchUpdate::Changes { events, .. } = update? {
                    for e in events {
                        let gone = e.r#type == weir_client::EventType::Delete as i32;
                        let this = e.instance.as_ref().is_some_and(|i| i.instance_id == id);
                        ensure!(
                            !(gone && this),
                            "{id} was removed at revision {}",
                            e.revision
                        );
                    }
                }
                ensure!(
                    view.get("default", "failover", id).is_some(),
                    "{id} missing from the view at revision {}",
                    view.revision()
                );
            }
        }
    }
}

#[tokio::test]
async fn heartbeats_continue_through_another_replica_after_kill_9() -> Result<()> {
    let (_etcd, [mut a, b]) = start_replicas("failover").await?;
    // The client knows both replicas and uses the first (A) until it fails.
    let client = Client::connect([a.endpoint(), b.endpoint()]).await?;
    let registration = client
        .register_and_keep_alive(ephemeral("default", "failover", "f-1", 3))
        .await?;
    let lease = match registration.state() {
        RegistrationState::Alive { instance, ttl, .. } => {
            ensure!(ttl == Duration::from_secs(3), "ttl {ttl:?}");
            instance.lease_id
        }
        other => bail!("not alive after registering: {other:?}"),
    };
    ensure!(lease != 0, "an ephemeral instance has a lease");

    // A watcher on B only.
    let observer = Client::connect([b.endpoint()]).await?;
    let mut view = observer.watch_view("default", "failover");
    match tokio::time::timeout(Duration::from_secs(10), view.next()).await?? {
        WatchUpdate::Snapshot { .. } => {}
        other => bail!("expected a snapshot first, got {other:?}"),
    }
    // B may not have applied the registration (made through A) yet.
    while view.get("default", "failover", "f-1").is_none() {
        tokio::time::timeout(Duration::from_secs(10), view.next()).await??;
    }

    a.kill()?;
    let killed = Instant::now();
    // Three TTLs after the kill the instance is still there and was never
    // removed, even for a moment.
    never_removed(&mut view, "f-1", killed + Duration::from_secs(9)).await?;

    match registration.state() {
        RegistrationState::Alive {
            renewed_at,
            reregistrations,
            ..
        } => {
            ensure!(
                renewed_at > killed + Duration::from_secs(6),
                "renewals stopped"
            );
            ensure!(reregistrations == 0, "the lease was lost and made again");
        }
        other => bail!("registration not alive: {other:?}"),
    }
    let now = instances(&observer, "failover").await?;
    ensure!(
        now.len() == 1 && now[0].lease_id == lease,
        "still the same registration on the same lease: {now:?}"
    );
    ensure!(registration.deregister().await?, "was registered");
    ensure!(instances(&observer, "failover").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_lost_registration_is_made_again_under_the_same_id() -> Result<()> {
    let (_etcd, _plane, client) = start_one("relost").await?;
    let registration = client
        .register_and_keep_alive(Instance {
            instance_id: String::new(),
            ..ephemeral("default", "relost", "", 3)
        })
        .await?;
    let id = registration.instance().instance_id.clone();
    ensure!(id.starts_with("relost-"), "generated id {id}");
    let mut states = registration.subscribe();

    // An operator removes it behind the handle's back.
    let r = InstanceRef {
        namespace: "default".into(),
        service: "relost".into(),
        instance_id: id.clone(),
    };
    ensure!(client.deregister(&r).await?.existed);
    tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| {
            matches!(
                s,
                RegistrationState::Alive {
                    reregistrations: 1,
                    ..
                }
            )
        }),
    )
    .await
    .context("not registered again in time")??;
    let now = instances(&client, "relost").await?;
    ensure!(
        now.iter()
            .map(|i| i.instance_id.as_str())
            .collect::<Vec<_>>()
            == [id.as_str()],
        "back under the same id: {now:?}"
    );
    drop(registration);
    Ok(())
}

/// What a watch view delivered: snapshots, and the revision of every change.
#[derive(Default)]
struct Tally {
    snapshots: usize,
    seen: Vec<u64>,
}

impl Tally {
    /// Feeds the next update of `view`, failing if none comes within `each`.
    async fn step(&mut self, view: &mut WatchView, each: Duration) -> Result<()> {
        match tokio::time::timeout(each, view.next()).await?? {
            WatchUpdate::Snapshot { .. } => self.snapshots += 1,
            WatchUpdate::Changes { events, .. } => {
                self.seen.extend(events.iter().map(|e| e.revision));
            }
            WatchUpdate::Progress { .. } => {}
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_watch_view_resumes_on_another_replica_without_gaps_or_repeats() -> Result<()> {
    let (_etcd, [mut a, b]) = start_replicas("viewfail").await?;
    let writer = Client::connect([b.endpoint()]).await?;
    let watcher = Client::connect([a.endpoint(), b.endpoint()]).await?;
    let mut view = watcher.watch_view("default", "vf");
    let mut tally = Tally::default();
    tally.step(&mut view, Duration::from_secs(10)).await?;
    for k in 0..50 {
        writer.register(persistent("vf", &format!("v-{k}"))).await?;
    }
    while view.instances().count() < 50 {
        tally.step(&mut view, Duration::from_secs(10)).await?;
    }
    a.kill()?;
    for k in 50..100 {
        writer.register(persistent("vf", &format!("v-{k}"))).await?;
    }
    while view.instances().count() < 100 {
        tally.step(&mut view, Duration::from_secs(20)).await?;
    }
    let Tally { snapshots, seen } = tally;
    ensure!(
        snapshots == 1,
        "resumed, not resynced: {snapshots} snapshots"
    );
    ensure!(
        seen.len() == 100,
        "every registration seen once: {}",
        seen.len()
    );
    ensure!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "revisions strictly increase"
    );
    let ids: HashSet<_> = view.instances().map(|i| i.instance_id.clone()).collect();
    ensure!(ids.len() == 100);
    Ok(())
}

/// `weirctl register orders` at 127.0.0.1:`port` under `id`, then `extra`.
fn register_orders<'a>(port: &'a str, id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "register",
        "orders",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--id",
        id,
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn weirctl_registers_lists_gets_watches_and_deregisters() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("ctl").await?;
    let ep = plane.endpoint();

    let out = weirctl_ok(
        &ep,
        &register_orders(
            "9001",
            "o-1",
            &["--meta", "env=prod", "--version", "1.2.0", "-o", "json"],
        ),
    )
    .await?;
    let stored: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        stored["instance_id"] == "o-1" && stored["ephemeral"] == false,
        "{stored}"
    );
    ensure!(stored["metadata"]["env"] == "prod" && stored["version"] == "1.2.0");

    let list: serde_json::Value =
        serde_json::from_str(&weirctl_ok(&ep, &["list", "-o", "json"]).await?)?;
    let services = list["services"].as_array().context("services array")?;
    ensure!(
        services
            .iter()
            .any(|s| s["service"] == "orders" && s["instance_count"] == 1),
        "{list}"
    );
    let table = weirctl_ok(&ep, &["get", "orders"]).await?;
    let lines: Vec<_> = table.lines().collect();
    ensure!(lines.len() == 2, "header and one row: {table}");
    ensure!(lines[0].starts_with("ID") && lines[0].contains("ADDRESS"));
    ensure!(
        lines[1].starts_with("o-1")
            && lines[1].contains("127.0.0.1:9001")
            && lines[1].contains("env=prod"),
        "{table}"
    );

    // watch: a snapshot, then the next change, then it exits by itself.
    let mut watch = Command::new(workspace_binary("weirctl")?)
        .args([
            "--endpoint",
            &ep,
            "watch",
            "orders",
            "--count",
            "2",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await??
        .context("no snapshot line")?;
    let snapshot: serde_json::Value = serde_json::from_str(&first)?;
    ensure!(
        snapshot["kind"] == "snapshot" && snapshot["instances"][0]["instance_id"] == "o-1",
        "{snapshot}"
    );
    weirctl_ok(&ep, &register_orders("9002", "o-2", &[])).await?;
    let second = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await??
        .context("no change line")?;
    let change: serde_json::Value = serde_json::from_str(&second)?;
    ensure!(
        change["event"]["type"] == "PUT" && change["event"]["instance"]["instance_id"] == "o-2",
        "{change}"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), watch.wait()).await??;
    ensure!(status.success(), "watch --count 2 exits 0");

    // register --keep-alive outlives its TTL, and deregisters on SIGTERM.
    let mut keeper = Command::new(workspace_binary("weirctl")?)
        .args(["--endpoint", &ep])
        .args(register_orders(
            "9003",
            "o-3",
            &["--ttl", "2", "--keep-alive"],
        ))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let client = Client::connect([ep.clone()]).await?;
    let has = |id: &'static str| {
        let client = client.clone();
        async move {
            instances(&client, "orders")
                .await
                .is_ok_and(|v| v.iter().any(|i| i.instance_id == id))
        }
    };
    wait_until(Duration::from_secs(10), "o-3 registered", || has("o-3")).await?;
    let registered_at = Instant::now();
    // Present at every look over three TTLs.
    while registered_at.elapsed() < Duration::from_secs(6) {
        ensure!(has("o-3").await, "o-3 expired while weirctl kept it alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pid = keeper.id().context("keeper pid")?;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), keeper.wait()).await??;
    ensure!(status.success(), "register --keep-alive exits 0 on SIGTERM");
    ensure!(
        !has("o-3").await,
        "deregistered on exit, not left to expire"
    );

    // deregister, twice.
    weirctl_ok(&ep, &["deregister", "orders", "o-1"]).await?;
    let again = weirctl(&ep, &["deregister", "orders", "o-1"]).await?;
    ensure!(!again.status.success());
    ensure!(String::from_utf8_lossy(&again.stderr).contains("not registered"));

    // Bad input: the server's rule is shown, the exit code is non-zero.
    let bad = weirctl(
        &ep,
        &["register", "Bad_Name", "--host", "127.0.0.1", "--port", "1"],
    )
    .await?;
    ensure!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        err.contains("invalid argument") && err.contains("service"),
        "{err}"
    );

    // An unreachable control plane is a clear error, not a hang.
    let down = weirctl("http://127.0.0.1:1", &["list"]).await?;
    ensure!(!down.status.success());
    ensure!(String::from_utf8_lossy(&down.stderr).contains("unavailable"));
    Ok(())
}

#[tokio::test]
async fn many_registrations_of_one_client_share_its_keep_alive_stream_and_stay() -> Result<()> {
    let (_etcd, _plane, client) = start_one("many").await?;
    let mut registrations = Vec::new();
    for k in 0..200 {
        registrations.push(
            client
                .register_and_keep_alive(ephemeral("default", "many", &format!("m-{k}"), 2))
                .await?,
        );
    }
    let start = Instant::now();
    // Three TTLs: every one renewed all along, none lost and made again.
    while start.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            instances(&client, "many").await?.len() == 200,
            "an instance expired while its registration was kept alive"
        );
    }
    for r in &registrations {
        match r.state() {
            RegistrationState::Alive {
                reregistrations: 0,
                renewed_at,
                ..
            } => ensure!(
                renewed_at > start + Duration::from_secs(4),
                "renewals stopped"
            ),
            other => bail!("{:?}: {other:?}", r.instance()),
        }
    }
    Ok(())
}
