//! End-to-end tests of how a replica fails: structured INVALID_ARGUMENT
//! details, undecodable requests, and readiness while its etcd is stopped.
//! Real `weir-control-plane` processes on loopback.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use prost::bytes::{Buf, BufMut};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
    Code, Status,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_types::StatusExt;
use weir_proto::registry::v1::{registry_client::RegistryClient, Instance, RegisterRequest};
use weir_tests::{
    fixtures::instance, http_get, init_tracing, start_replicas, unique_prefix, wait_until,
    workspace_binary, ControlPlaneProcess, Etcd, EtcdOptions,
};

#[tokio::test]
async fn an_invalid_registration_carries_bad_request_details_naming_the_field() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("badreq").await?;
    let mut c = RegistryClient::connect(plane.endpoint()).await?;
    let status = c
        .register(RegisterRequest {
            instance: Some(Instance {
                weight: 20_000,
                ..instance("default", "svc", "i-1", 8080)
            }),
            ..RegisterRequest::default()
        })
        .await
        .expect_err("weight over the limit");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    // The message stays readable...
    assert!(
        status.message().starts_with("instance.weight: "),
        "{}",
        status.message()
    );
    // ...and the field travels as google.rpc.BadRequest.
    let bad = status
        .get_details_bad_request()
        .context("no google.rpc.BadRequest in the status details")?;
    let fields: Vec<&str> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["instance.weight"]);
    assert!(
        bad.field_violations[0].description.contains("20000"),
        "{:?}",
        bad.field_violations
    );

    // weirctl names the field it read from those details (its unit tests
    // show it reads the details, not the message text).
    let out = tokio::process::Command::new(workspace_binary("weirctl")?)
        .args(["--endpoint", &plane.endpoint(), "register", "svc"])
        .args(["--host", "127.0.0.1", "--port", "8080", "--weight", "20000"])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "weirctl accepted weight 20000");
    assert!(
        stderr.contains("invalid argument: instance.weight: must be 0-10000"),
        "{stderr}"
    );
    Ok(())
}

/// A codec that sends and receives bytes as they are.
#[derive(Clone, Debug, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = Vec::with_capacity(buf.remaining());
        while buf.has_remaining() {
            let chunk = buf.chunk();
            out.extend_from_slice(chunk);
            let n = chunk.len();
            buf.advance(n);
        }
        Ok(Some(out))
    }
}

#[tokio::test]
async fn random_bytes_as_a_request_get_invalid_argument() -> Result<()> {
    let (_etcd, [plane]) = start_replicas("garbage").await?;
    let channel = Channel::from_shared(plane.endpoint())?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel.clone());

    // Each starts with a tag no protobuf message accepts (field 0, or wire
    // type 7) or a length past the end, so no luck can make it decode.
    let mut payloads: Vec<Vec<u8>> = vec![
        vec![0x00],
        vec![0x0f, 0xff, 0xff, 0xff],
        vec![0x0a, 0x7f, 0x01],
    ];
    for _ in 0..5 {
        let mut p = vec![0x07];
        p.extend((0..64).map(|_| rand::random::<u8>()));
        payloads.push(p);
    }
    let methods = [
        "/weir.registry.v1.Registry/Register",
        "/weir.registry.v1.Registry/GetService",
        "/weir.policy.v1.PolicyService/Put",
    ];
    for method in methods {
        for payload in &payloads {
            grpc.ready().await?;
            let status = grpc
                .unary(
                    tonic::Request::new(payload.clone()),
                    PathAndQuery::from_static(method),
                    Raw,
                )
                .await
                .expect_err("garbage must not succeed");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{method} {payload:02x?}: {status:?}"
            );
            assert!(
                status.message().contains("not a valid protobuf message"),
                "{method}: {}",
                status.message()
            );
        }
    }

    // A streaming call: the undecodable message ends the stream with the
    // same code.
    grpc.ready().await?;
    let response = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter([payloads[1].clone()])),
            PathAndQuery::from_static("/weir.registry.v1.Registry/KeepAlive"),
            Raw,
        )
        .await;
    let status = match response {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(Duration::from_secs(10), stream.message()).await? {
                Err(status) => status,
                Ok(other) => bail!("KeepAlive answered garbage with {other:?}"),
            }
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The replica still serves well-formed calls.
    let mut c = RegistryClient::new(channel);
    c.register(RegisterRequest {
        instance: Some(instance("default", "svc", "still-fine", 8080)),
        ..RegisterRequest::default()
    })
    .await?;
    Ok(())
}

async fn overall_health(channel: Channel) -> Option<i32> {
    let mut health = HealthClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(reply.into_inner().status)
}

/// Waits up to `deadline` for `/readyz` on `http` to answer `status`.
async fn readyz_becomes(
    http: SocketAddr,
    status: u16,
    deadline: Duration,
    what: &str,
) -> Result<()> {
    let line = format!("HTTP/1.1 {status}");
    wait_until(deadline, what, || async {
        http_get(http, "/readyz")
            .await
            .is_ok_and(|r| r.starts_with(&line))
    })
    .await
}

/// Waits up to 5 s (grpc.health polls every 100 ms) for the overall
/// grpc.health status on `channel` to be `status`.
async fn health_becomes(channel: &Channel, status: ServingStatus, what: &str) -> Result<()> {
    wait_until(Duration::from_secs(5), what, || {
        let channel = channel.clone();
        async move { overall_health(channel).await == Some(status as i32) }
    })
    .await
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// Resumes a SIGSTOPped etcd even when the test fails half-way.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

#[tokio::test]
async fn readyz_fails_while_etcd_is_stopped_and_recovers_after() -> Result<()> {
    init_tracing();
    let etcd = Etcd::start_with(EtcdOptions {
        private: true,
        ..EtcdOptions::default()
    })
    .await?;
    let pid = etcd.pid().context("a private etcd has a pid")?;
    let plane = ControlPlaneProcess::start(&etcd, &unique_prefix("readyz"))?;
    let http = plane.http_addr();
    let channel = Channel::from_shared(plane.endpoint())?.connect().await?;

    readyz_becomes(http, 200, Duration::from_secs(10), "/readyz 200").await?;
    let verbose = http_get(http, "/readyz?verbose").await?;
    assert!(verbose.starts_with("HTTP/1.1 200"), "{verbose}");
    assert!(verbose.contains("[+]store ok\n"), "{verbose}");
    assert!(verbose.contains("[+]cache ok\n"), "{verbose}");
    assert!(verbose.contains("readyz check passed"), "{verbose}");
    // grpc.health follows the same checks (within its 100 ms poll).
    health_becomes(&channel, ServingStatus::Serving, "grpc.health SERVING").await?;

    // etcd hangs: the process is there, its sockets accept, nothing answers.
    signal(pid, "STOP")?;
    let resume = Resume(pid);
    readyz_becomes(http, 503, Duration::from_secs(10), "/readyz 503").await?;
    let plain = http_get(http, "/readyz").await?;
    assert!(plain.contains("\"ready\":false"), "{plain}");
    assert!(plain.contains("\"store\":\"etcd\""), "{plain}");
    let verbose = http_get(http, "/readyz?verbose").await?;
    assert!(verbose.starts_with("HTTP/1.1 503"), "{verbose}");
    assert!(verbose.contains("[-]store failed: "), "{verbose}");
    assert!(verbose.contains("[+]cache ok\n"), "{verbose}");
    assert!(verbose.contains("readyz check failed"), "{verbose}");
    // /healthz is liveness only.
    assert!(http_get(http, "/healthz")
        .await?
        .starts_with("HTTP/1.1 200"));
    health_becomes(
        &channel,
        ServingStatus::NotServing,
        "grpc.health NOT_SERVING",
    )
    .await?;

    // A write is answered within the store call bound, with the replica's
    // words rather than the etcd client's.
    let mut c = RegistryClient::new(channel.clone());
    let started = Instant::now();
    let status = c
        .register(RegisterRequest {
            instance: Some(instance("default", "svc", "during-outage", 8080)),
            ..RegisterRequest::default()
        })
        .await
        .expect_err("no write succeeds while etcd is stopped");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        status.message().starts_with("the registry store "),
        "{}",
        status.message()
    );
    for internal in ["etcd", "transport", "grpc", "tcp", "127.0.0.1"] {
        assert!(
            !status.message().to_lowercase().contains(internal),
            "{internal} in {}",
            status.message()
        );
    }

    // etcd resumes: the replica is ready again and writes succeed.
    drop(resume);
    readyz_becomes(http, 200, Duration::from_secs(30), "/readyz 200 again").await?;
    let verbose = http_get(http, "/readyz?verbose").await?;
    assert!(verbose.contains("readyz check passed"), "{verbose}");
    health_becomes(&channel, ServingStatus::Serving, "grpc.health SERVING").await?;
    wait_until(Duration::from_secs(20), "a write after recovery", || {
        let mut c = c.clone();
        async move {
            c.register(RegisterRequest {
                instance: Some(instance("default", "svc", "after-outage", 8080)),
                ..RegisterRequest::default()
            })
            .await
            .is_ok()
        }
    })
    .await?;
    Ok(())
}
