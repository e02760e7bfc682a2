//! A registry far larger than one etcd answer: 100,000 instances written
//! straight to etcd load into a real `weir-control-plane`, which becomes
//! ready and serves them. The hub reads the store in pages at one revision;
//! one range of it all would exceed the etcd client's 4 MiB answer limit.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use etcd_client::{DeleteOptions, Txn, TxnOp};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use weir_control_plane::keys::Keys;
use weir_core::InstanceKey;
use weir_proto::registry::v1::{
    registry_client::RegistryClient, GetServiceRequest, HealthStatus, Instance,
    ListServicesRequest, WatchRequest,
};
use weir_tests::{http_status, init_tracing, unique_prefix, ControlPlaneProcess, Etcd};

const SERVICES: usize = 1_000;
const PER_SERVICE: usize = 100;
const NAMESPACE: &str = "big";
/// etcd's default cap on operations in one transaction.
const TXN_OPS: usize = 128;
/// Transactions in flight while writing.
const WRITERS: usize = 16;
/// For /readyz after the process started: a load takes about a second on a
/// laptop; CI runners with 2 shared cores are slower.
const READY_DEADLINE: Duration = Duration::from_secs(60);

fn service(n: usize) -> String {
    format!("svc-{n:04}")
}

/// One stored record, as the registry writes it (about 150 bytes).
fn record(service: &str, id: &str, port: u32) -> Vec<u8> {
    Instance {
        namespace: NAMESPACE.into(),
        service: service.into(),
        instance_id: id.into(),
        host: "10.1.2.3".into(),
        port,
        metadata: [
            ("zone".to_string(), "zone-a".to_string()),
            ("version".to_string(), "1.2.3".to_string()),
        ]
        .into(),
        status: HealthStatus::Passing as i32,
        registered_at_unix_ms: 1_700_000_000_000,
        ..Instance::default()
    }
    .encode_to_vec()
}

/// Writes every instance under `prefix` in transactions of 128 puts.
async fn write_instances(client: &etcd_client::Client, keys: &Keys) -> Result<()> {
    let puts: Vec<TxnOp> = (0..SERVICES)
        .flat_map(|s| (0..PER_SERVICE).map(move |i| (service(s), format!("i-{i:03}"))))
        .map(|(svc, id)| {
            let key = keys.instance(&InstanceKey {
                namespace: NAMESPACE.into(),
                service: svc.clone(),
                instance_id: id.clone(),
            });
            TxnOp::put(key, record(&svc, &id, 8080), None)
        })
        .collect();
    let txns: Vec<Txn> = puts
        .chunks(TXN_OPS)
        .map(|ops| Txn::new().and_then(ops.to_vec()))
        .collect();
    futures::stream::iter(txns)
        .map(|txn| {
            let mut kv = client.kv_client();
            async move { kv.txn(txn).await.context("writing a batch of instances") }
        })
        .buffer_unordered(WRITERS)
        .try_for_each(|_| async { Ok(()) })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_of_100k_instances_loads_and_serves() -> Result<()> {
    init_tracing();
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let prefix = unique_prefix("large");
    let result = load_and_serve(&etcd, &client, &prefix).await;
    // The shared etcd keeps nothing of this test, whatever happened.
    client
        .kv_client()
        .delete(
            format!("{prefix}/"),
            Some(DeleteOptions::new().with_prefix()),
        )
        .await
        .context("deleting the test prefix")?;
    result
}

async fn load_and_serve(etcd: &Etcd, client: &etcd_client::Client, prefix: &str) -> Result<()> {
    let keys = Keys::new(prefix);
    let started = Instant::now();
    write_instances(client, &keys).await?;
    let total = SERVICES * PER_SERVICE;
    tracing::info!(instances = total, took = ?started.elapsed(), "written to etcd");

    // Ready within the deadline: the whole registry is in the cache.
    let started = Instant::now();
    let plane = ControlPlaneProcess::start(etcd, prefix)?;
    loop {
        if http_status(plane.http_addr(), "/readyz").await.ok() == Some(200) {
            break;
        }
        ensure!(
            started.elapsed() < READY_DEADLINE,
            "not ready within {READY_DEADLINE:?} with {total} instances"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(took = ?started.elapsed(), "replica ready");

    let mut c = RegistryClient::connect(plane.endpoint()).await?;
    let got = c
        .get_service(GetServiceRequest {
            namespace: NAMESPACE.into(),
            service: service(421),
            ..GetServiceRequest::default()
        })
        .await?
        .into_inner()
        .service
        .context("no service in GetServiceResponse")?;
    ensure!(
        got.instances.len() == PER_SERVICE,
        "GetService {}: {} instances, expected {PER_SERVICE}",
        service(421),
        got.instances.len()
    );
    ensure!(got
        .instances
        .iter()
        .all(|i| i.port == 8080 && i.metadata["zone"] == "zone-a"));

    // Every service, page by page, with its count.
    let mut token = String::new();
    let (mut services, mut instances, mut pages) = (0, 0, 0);
    loop {
        let page = c
            .list_services(ListServicesRequest {
                namespace: NAMESPACE.into(),
                page_size: 300,
                page_token: token,
                summary_only: true,
                ..ListServicesRequest::default()
            })
            .await?
            .into_inner();
        pages += 1;
        for (n, s) in page.summaries.iter().enumerate() {
            ensure!(
                s.name == service(services + n),
                "page {pages}: {} out of order",
                s.name
            );
        }
        services += page.summaries.len();
        instances += page
            .summaries
            .iter()
            .map(|s| s.instance_count as usize)
            .sum::<usize>();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ensure!(
        (services, instances, pages) == (SERVICES, total, 4),
        "ListServices: {services} services, {instances} instances in {pages} pages"
    );

    // A watch of the whole namespace gets all of it as one snapshot, in
    // messages each under the client's 4 MiB limit.
    let mut watch = c
        .watch(WatchRequest {
            namespace: NAMESPACE.into(),
            ..WatchRequest::default()
        })
        .await?
        .into_inner();
    let mut seen = 0;
    let mut messages = 0;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .context("snapshot message in time")??
            .context("watch ended")?;
        messages += 1;
        seen += m.events.len();
        if m.snapshot_complete {
            break;
        }
    }
    ensure!(
        seen == total && messages > 1,
        "watch snapshot: {seen} instances in {messages} messages"
    );
    Ok(())
}
