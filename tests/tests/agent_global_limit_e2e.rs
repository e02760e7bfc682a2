//! A GLOBAL rate limit end to end: a real control plane on etcd and four
//! real `weir-agent`s sending 50, 100, 200 and 400 events/s to one service
//! limited to 300/s across them. The control plane allocates max-min fair
//! shares from the demand the agents report; each agent enforces its own.
//! The shares never sum past the limit, the total accepted is within 5%
//! of the limit, the 50/s agent is never limited, and once one agent is
//! killed the others take its share within 5 s.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use weir_client::policy::{
    rate_limit::{OnExcess, Scope},
    RateLimit, TrafficPolicy,
};
use weir_tests::{
    agent::AgentProcess,
    agents::policy_status_until,
    fixtures::{instance, HttpInstance},
    load::Load,
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);
const LIMIT: f64 = 300.0;
const RATES: [u64; 4] = [50, 100, 200, 400];

/// The agent's share of the limit now (`None`: none allocated yet).
async fn share(agent: &AgentProcess) -> Result<Option<f64>> {
    let state = agent.state().await?;
    Ok(state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == "orders"))
        .and_then(|r| r["limits"][0]["share"].as_object().cloned())
        .filter(|s| s["source"] == "allocated")
        .and_then(|s| s["requests_per_second"].as_f64()))
}

async fn shares(agents: &[AgentProcess]) -> Result<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for a in agents {
        out.push(share(a).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_share_a_global_limit_max_min_fair() -> Result<()> {
    let (_etcd, plane, client) = start_one("global-limit").await?;
    let orders = HttpInstance::start().await?;
    client
        .register(instance(
            "default",
            "orders",
            "o0",
            u32::from(orders.port()),
        ))
        .await?;
    let mut agents = Vec::new();
    for n in 0..4 {
        agents.push(AgentProcess::start(
            &[plane.endpoint()],
            &format!("node-{n}"),
            &[],
        )?);
    }
    for a in &agents {
        a.wait_for_endpoints("default", "orders", 1, SETTLE).await?;
    }
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: "orders".into(),
                rate_limit: Some(RateLimit {
                    requests_per_second: LIMIT,
                    // Half a second of the limit: each agent's share of
                    // the burst (in proportion to its rate) then absorbs
                    // half a second of a stalled sender's catch-up, on a
                    // machine this test shares with four agents.
                    burst: 150,
                    scope: Scope::Global as i32,
                    on_excess: OnExcess::Reject as i32,
                    ..RateLimit::default()
                }),
                ..TrafficPolicy::default()
            },
            None,
        )
        .await?;
    policy_status_until(
        &client,
        "orders",
        "four agents applying the limit in full",
        |s| s.applied == 4,
    )
    .await?;

    let loads: Vec<Load> = agents
        .iter()
        .zip(RATES)
        .map(|(a, rate)| Load::start(a.ingress_addr(), "orders", "/in", "/tests/global", rate))
        .collect();
    let counts = |loads: &[Load]| -> Vec<(usize, usize)> {
        loads.iter().map(|l| (l.count(200), l.count(429))).collect()
    };
    // Converged: every agent has an allocated share, and the 400/s one no
    // more than an even split of what the 50/s one leaves.
    poll_until(
        SETTLE,
        "allocated shares on every agent",
        || shares(&agents),
        |s| s.iter().all(Option::is_some) && s[3].is_some_and(|x| x < 90.0),
    )
    .await?;

    // 10 s of traffic: count what was accepted, and look at the shares
    // every half second.
    let before = counts(&loads);
    let start = Instant::now();
    let mut max_sum: f64 = 0.0;
    while start.elapsed() < Duration::from_secs(10) {
        let s = shares(&agents).await?;
        let sum: f64 = s.iter().flatten().sum();
        max_sum = max_sum.max(sum);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let span = start.elapsed().as_secs_f64();
    let after = counts(&loads);
    let accepted: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).collect();
    let limited: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).collect();
    let rate = accepted.iter().sum::<usize>() as f64 / span;
    eprintln!(
        "accepted {accepted:?} limited {limited:?} over {span:.2} s: {rate:.1}/s; most shares summed to {max_sum:.2}"
    );
    ensure!(max_sum <= LIMIT + 1e-6, "the shares summed to {max_sum}");
    ensure!(
        (rate - LIMIT).abs() <= 0.05 * LIMIT,
        "{rate:.1}/s accepted against {LIMIT}/s"
    );
    ensure!(
        loads[0].count(429) == 0,
        "the 50/s agent was limited {} times",
        loads[0].count(429)
    );
    ensure!(
        loads
            .iter()
            .all(|l| l.answers().iter().all(|a| matches!(a.status, 200 | 429))),
        "answers other than 200 and 429"
    );

    // The 400/s agent goes: within 5 s the others hold the whole limit.
    let killed = Instant::now();
    agents[3].kill()?;
    let rest = &agents[..3];
    poll_until(
        Duration::from_secs(5),
        "the others taking the killed agent's share",
        || shares(rest),
        |s| s.iter().flatten().sum::<f64>() > LIMIT - 1.0,
    )
    .await?;
    eprintln!("shares moved {:?} after the kill", killed.elapsed());
    Ok(())
}
