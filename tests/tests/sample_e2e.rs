//! `weir-sample` end to end: a real control plane on etcd, a real
//! `weir-agent`, and `weir-sample` processes that register themselves and
//! exchange CloudEvents through the agent (what `scripts/quickstart.sh`
//! shows, on one node).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use weir_tests::{agent::AgentProcess, instances, sample::SampleProcess, start_one};

/// How long the agent may take to see a registration.
const SETTLE: Duration = Duration::from_secs(10);
/// How long an emitter may take to send its events and exit.
const EMIT: Duration = Duration::from_secs(30);

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The `received` count of an orders instance, checked to come all from
/// `source` with the emitter's event type.
async fn received_from(orders: &SampleProcess, source: &str) -> Result<u64> {
    let stats = orders.stats().await?;
    ensure!(
        stats["instance"] == orders.instance(),
        "{} answers as {}",
        orders.instance(),
        stats["instance"]
    );
    let received = stats["received"].as_u64().context("no received count")?;
    ensure!(
        stats["by_source"][source].as_u64().unwrap_or(0) == received
            && stats["by_type"]["sample.checkout.tick"]
                .as_u64()
                .unwrap_or(0)
                == received,
        "{}: every event from {source}, of type sample.checkout.tick: {stats}",
        orders.instance()
    );
    Ok(received)
}

#[tokio::test]
async fn samples_register_and_exchange_events_through_an_agent() -> Result<()> {
    let (_etcd, plane, client) = start_one("sample").await?;
    let registry = plane.endpoint();
    let agent = AgentProcess::start(
        std::slice::from_ref(&registry),
        "node-a",
        &flags(&["--zone=a"]),
    )?;
    // A TTL far above the test's deadlines: an instance that leaves was
    // deregistered, not expired.
    let orders_flags = flags(&["--zone=a", "--ttl=60"]);
    let mut orders = [
        SampleProcess::start(&registry, "orders", "orders-a1", &orders_flags)?,
        SampleProcess::start(&registry, "orders", "orders-a2", &orders_flags)?,
    ];
    let registered = instances(&client, "orders").await?;
    ensure!(registered.len() == 2, "registered: {registered:?}");
    for o in &orders {
        let i = registered
            .iter()
            .find(|i| i.instance_id == o.instance())
            .with_context(|| format!("{} is not registered", o.instance()))?;
        ensure!(
            i.ephemeral
                && i.ttl_seconds == 60
                && i.zone == "a"
                && i.port == u32::from(o.addr().port()),
            "{} registered as {i:?}",
            o.instance()
        );
    }
    agent
        .wait_for_endpoints("default", "orders", 2, SETTLE)
        .await?;

    // 200 events through the agent: round robin, none failed (the
    // emitter exits non-zero when any did).
    let agent_url = format!("--agent=http://{}", agent.ingress_addr());
    let emit = |count: &str| {
        let mut f = flags(&[
            "--zone=a",
            "--emit-to=orders",
            "--rate=200",
            "--report-every=1",
        ]);
        f.push(agent_url.clone());
        f.push(format!("--count={count}"));
        f
    };
    let mut emitter = SampleProcess::start(&registry, "checkout", "checkout-a1", &emit("200"))?;
    let status = emitter.wait_exit(EMIT).await?;
    ensure!(status.success(), "the emitter reported failures: {status}");
    let source = "/checkout/checkout-a1";
    let counts = [
        received_from(&orders[0], source).await?,
        received_from(&orders[1], source).await?,
    ];
    ensure!(
        counts.iter().all(|c| (90..=110).contains(c)) && counts.iter().sum::<u64>() == 200,
        "200 events spread over two instances as {counts:?}"
    );
    ensure!(
        instances(&client, "checkout").await?.is_empty(),
        "the emitter deregistered itself before exiting"
    );

    // SIGTERM: the instance deregisters at once, and the traffic moves.
    let status = orders[1].terminate()?;
    ensure!(status.success(), "orders-a2 exited with {status}");
    let left = instances(&client, "orders").await?;
    ensure!(
        left.len() == 1 && left[0].instance_id == "orders-a1",
        "after SIGTERM orders-a2 is gone at once (TTL 60 s): {left:?}"
    );
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    let mut emitter = SampleProcess::start(&registry, "checkout", "checkout-a1", &emit("20"))?;
    let status = emitter.wait_exit(EMIT).await?;
    ensure!(
        status.success(),
        "the second emitter reported failures: {status}"
    );
    let now = received_from(&orders[0], source).await?;
    ensure!(
        now == counts[0] + 20,
        "orders-a1 took all 20 later events: {} then {now}",
        counts[0]
    );

    // Events the agent refuses are failures: the emitter says so.
    let mut lost = SampleProcess::start(
        &registry,
        "checkout",
        "checkout-a2",
        &[
            "--emit-to=nowhere".to_owned(),
            agent_url.clone(),
            "--count=5".to_owned(),
            "--rate=100".to_owned(),
        ],
    )?;
    let status = lost.wait_exit(EMIT).await?;
    ensure!(
        !status.success(),
        "events to an unknown service count as failed"
    );
    Ok(())
}
