//! A typed client for Weir's registry.
//!
//! [`Client`] talks to one or more control-plane replicas. Every call goes to
//! the replica that answered last; when it is unreachable the call moves on
//! to the next one, so a client given every replica's address rides through
//! the loss of any of them. Calls that change state are safe to repeat:
//! [`Client::register`] fills an empty instance id with a generated one, so a
//! retried registration never creates a second instance.
//!
//! On top of the calls:
//! - [`Registration`] keeps an ephemeral instance's lease alive in the
//!   background, registers it again when the lease was lost, and reports its
//!   state through a [`tokio::sync::watch`] channel;
//! - [`WatchView`] keeps a live copy of a namespace or service, resuming from
//!   the last revision it saw when its stream breaks;
//! - [`AgentSession`] is the agent's side of its session (policies pushed,
//!   acknowledged as applied, [`AckOutcome::Partly`] or rejected; status
//!   reports; replies to the control plane's requests), and
//!   [`Client::list_agents`] / [`Client::ask_agent`] the operator's;
//! - the node calls ([`Client::register_for_node`],
//!   [`Client::report_health`], [`NodeStatusSink`]) are what a node's agent
//!   does for the instances its session holds, and their health;
//! - [`TopicPublisher`] publishes events to topics through a node's agent,
//!   the events of many tasks sharing one stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_client::Error> {
//! use weir_client::{Client, Instance};
//! let client = Client::connect(["http://127.0.0.1:7070"]).await?;
//! let registration = client
//!     .register_and_keep_alive(Instance {
//!         service: "orders".into(),
//!         host: "10.0.0.7".into(),
//!         port: 8080,
//!         ephemeral: true,
//!         ttl_seconds: 6,
//!         ..Instance::default()
//!     })
//!     .await?;
//! // ... serve ...
//! registration.deregister().await?;
//! # Ok(()) }
//! ```

mod agent_calls;
mod node_calls;
mod policy_calls;
mod publisher;
mod registration;
mod renewer;
mod session;
mod telemetry_calls;
mod watch;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tonic::{
    transport::{Channel, Endpoint},
    Code, Status,
};
use tonic_types::StatusExt as _;
use weir_proto::registry::v1::registry_client::RegistryClient;

pub use node_calls::NodeStatusSink;
pub use publisher::{CloudEvent, PublishError, PublishRefusal, PublishResponse, TopicPublisher};
pub use registration::{retry_delay, Registration, RegistrationState};
pub use session::{AckOutcome, AgentSession, SessionEvent};
pub use telemetry_calls::{ReportStream, REPORT_WINDOW};
pub use watch::{RegistryMirror, WatchUpdate, WatchView};
pub use weir_proto::registry::v1::{
    health_check, watch_response::Kind as WatchKind, DeregisterRequest, DeregisterResponse, Event,
    EventType, GetHealthRequest, GetHealthResponse, GetServiceConfigRequest,
    GetServiceConfigResponse, GetServiceRequest, GetServiceResponse, GrpcCheck, HealthCheck,
    HealthDetail, HealthStatus, HealthTransition, HttpCheck, Instance, InstanceHealth, InstanceRef,
    ListServicesRequest, ListServicesResponse, Protocol, RegisterRequest, RegisterResponse,
    ReportHealthRequest, ReportHealthResponse, Service, ServiceConfig, ServiceProtection,
    ServiceSummary, SetServiceConfigRequest, SetServiceConfigResponse, TcpCheck, TtlCheck,
    WatchRequest, WatchResponse,
};
pub use weir_proto::{
    agent::v1 as agent, cloudevents::v1 as cloudevents, policy::v1 as policy,
    telemetry::v1 as telemetry,
};

/// The control plane's default gRPC address.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7070";

/// Largest response the client accepts (a big ListServices page).
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Client errors. [`Error::is_transient`] tells which are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no control-plane endpoint given")]
    NoEndpoints,
    #[error("invalid endpoint {endpoint:?}: {source}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The request was rejected. `violations` names each offending field
    /// and its rule when the control plane sent them (as
    /// `google.rpc.BadRequest` details); `message` is its summary.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        message: String,
        violations: Vec<FieldViolation>,
    },
    #[error("not found: {0}")]
    NotFound(String),
    /// No replica could serve the call (unreachable, not ready, or its store
    /// is down). The message is the last replica's answer.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
    #[error("{code:?}: {message}")]
    Rpc { code: Code, message: String },
    /// The server answered with something this client does not understand.
    #[error("unexpected answer from the control plane: {0}")]
    Protocol(String),
    /// An agent answered a request with its own error.
    #[error("the agent could not answer: {0}")]
    Agent(String),
}

impl Error {
    /// The gRPC code behind the error, if it came from a call.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::InvalidArgument { .. } => Some(Code::InvalidArgument),
            Error::NotFound(_) => Some(Code::NotFound),
            Error::Unavailable(_) => Some(Code::Unavailable),
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.code(), Some(c) if is_transient(c))
    }

    /// The offending fields of a rejected request; empty for other errors
    /// and when the control plane sent no field details.
    pub fn field_violations(&self) -> &[FieldViolation] {
        match self {
            Error::InvalidArgument { violations, .. } => violations,
            _ => &[],
        }
    }
}

/// One offending field of a rejected request: a `google.rpc.BadRequest`
/// field violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path, e.g. `instance.port` or
    /// `policy.rules[0].retry.attempts`.
    pub field: String,
    /// Why the value is refused (the rule it breaks).
    pub description: String,
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::InvalidArgument => {
                // Details that do not decode are ignored: the message still
                // says what was wrong.
                let violations = s
                    .get_details_bad_request()
                    .map(|bad| {
                        bad.field_violations
                            .into_iter()
                            .map(|v| FieldViolation {
                                field: v.field,
                                description: v.description,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Error::InvalidArgument {
                    message,
                    violations,
                }
            }
            Code::NotFound => Error::NotFound(message),
            Code::Unavailable => Error::Unavailable(message),
            code => Error::Rpc { code, message },
        }
    }
}

/// Codes after which the same call may succeed on another replica or later.
fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// Timeouts of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Bound on opening a connection to one replica.
    pub connect_timeout: Duration,
    /// Bound on a unary call to one replica (not on streams).
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
struct Target {
    uri: String,
    channel: Channel,
}

#[derive(Debug)]
pub(crate) struct Inner {
    targets: Vec<Target>,
    /// Index of the replica that answered last.
    current: AtomicUsize,
    config: ClientConfig,
    /// The shared KeepAlive stream's task, started on first use.
    renewer: std::sync::OnceLock<tokio::sync::mpsc::Sender<renewer::Renewal>>,
}

impl Inner {
    fn channel(&self, index: usize) -> Channel {
        self.targets[index].channel.clone()
    }

    fn order(&self) -> impl Iterator<Item = usize> {
        let n = self.targets.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| (start + k) % n)
    }

    fn prefer(&self, index: usize) {
        self.current.store(index, Ordering::Relaxed);
    }
}

/// A connection to the control plane's registry. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the replicas at `endpoints` (`http://host:port`; a bare
    /// `host:port` is taken as http) with default timeouts. Connections are
    /// opened on first use, so this fails only on a malformed address.
    pub async fn connect<I, S>(endpoints: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_config(endpoints, ClientConfig::default())
    }

    /// Like [`Client::connect`], with explicit timeouts.
    pub fn with_config<I, S>(endpoints: I, config: ClientConfig) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut targets = Vec::new();
        for e in endpoints {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            let uri = if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            };
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|source| Error::InvalidEndpoint {
                    endpoint: e.to_string(),
                    source,
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            targets.push(Target {
                uri,
                channel: endpoint.connect_lazy(),
            });
        }
        if targets.is_empty() {
            return Err(Error::NoEndpoints);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                targets,
                current: AtomicUsize::new(0),
                config,
                renewer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The replica addresses, in the order given.
    pub fn endpoints(&self) -> Vec<&str> {
        self.inner.targets.iter().map(|t| t.uri.as_str()).collect()
    }

    pub(crate) fn channel(&self, index: usize) -> Channel {
        self.inner.channel(index)
    }

    /// The bound on one attempt of a unary call.
    pub(crate) fn unary(&self) -> Duration {
        self.inner.config.request_timeout
    }

    /// Replica indexes to try, the preferred one first.
    pub(crate) fn order(&self) -> impl Iterator<Item = usize> {
        self.inner.order()
    }

    /// Makes `index` the replica tried first.
    pub(crate) fn prefer(&self, index: usize) {
        self.inner.prefer(index);
    }

    /// Runs `call` with a client built by `make` on each replica in turn,
    /// the preferred one first, while the answer is transient; the replica
    /// that answers becomes the preferred one. Each attempt is bounded by
    /// `bound` (unary calls: [`Client::unary`]; streams: None).
    pub(crate) async fn call_with<C, T, F, Fut>(
        &self,
        what: &'static str,
        bound: Option<Duration>,
        make: impl Fn(Channel) -> C,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_retrying(what, bound, is_transient, make, call)
            .await
    }

    /// [`Client::call_with`], moving on to the next replica only on the
    /// codes `retry` accepts (a call that must not be repeated after its
    /// deadline passed, say).
    pub(crate) async fn call_retrying<C, T, F, Fut>(
        &self,
        what: &'static str,
        bound: Option<Duration>,
        retry: fn(Code) -> bool,
        make: impl Fn(Channel) -> C,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for (k, index) in self.order().enumerate() {
            let attempt = call(make(self.channel(index)));
            let result = match bound {
                Some(limit) => match tokio::time::timeout(limit, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "{what} took longer than {limit:?}"
                    ))),
                },
                None => attempt.await,
            };
            match result {
                Ok(response) => {
                    if k > 0 {
                        self.prefer(index);
                        tracing::info!(endpoint = %self.inner.targets[index].uri, "switched control-plane replica");
                    }
                    return Ok(response.into_inner());
                }
                Err(status) if retry(status.code()) => {
                    tracing::debug!(
                        call = what,
                        endpoint = %self.inner.targets[index].uri,
                        code = ?status.code(),
                        message = status.message(),
                        "replica could not serve the call"
                    );
                    last = Some(status);
                }
                Err(status) => return Err(status.into()),
            }
        }
        Err(last.map(Error::from).unwrap_or(Error::NoEndpoints))
    }

    /// Runs a registry call on the current replica, moving on to the next
    /// ones while the answer is transient; each attempt bounded by `bound`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        bound: Option<Duration>,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(RegistryClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(
            what,
            bound,
            |ch| RegistryClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES),
            call,
        )
        .await
    }

    /// Registers (or re-registers, idempotently) an instance. An empty
    /// `instance_id` is replaced by a generated one first, so the call can be
    /// retried safely; read the id back from the returned record.
    pub async fn register(&self, instance: Instance) -> Result<RegisterResponse, Error> {
        self.register_as(instance, String::new()).await
    }

    /// [`Client::register`], on behalf of `agent_node`'s session when it is
    /// not empty.
    pub(crate) async fn register_as(
        &self,
        mut instance: Instance,
        agent_node: String,
    ) -> Result<RegisterResponse, Error> {
        if instance.instance_id.is_empty() {
            instance.instance_id = generated_id(&instance.service);
        }
        let request = RegisterRequest {
            instance: Some(instance),
            agent_node,
        };
        self.call("Register", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.register(request).await }
        })
        .await
    }

    /// Registers an instance and keeps it registered until the returned
    /// handle is deregistered or dropped. See [`Registration`].
    pub async fn register_and_keep_alive(&self, instance: Instance) -> Result<Registration, Error> {
        Registration::start(self.clone(), instance).await
    }

    /// Removes an instance. `Ok(false)` if it was not registered.
    pub async fn deregister(&self, instance: &InstanceRef) -> Result<DeregisterResponse, Error> {
        let request = DeregisterRequest {
            instance: Some(instance.clone()),
        };
        self.call("Deregister", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.deregister(request).await }
        })
        .await
    }

    /// Renews an ephemeral instance's lease; returns the remaining TTL.
    /// [`Error::NotFound`] means the registration is gone: register again.
    pub async fn heartbeat(&self, instance: &InstanceRef) -> Result<Duration, Error> {
        self.heartbeat_within(instance, self.unary()).await
    }

    /// Renews through the client's shared `KeepAlive` stream: renewals due
    /// together go in one message, and none pays for a new HTTP/2 stream.
    /// Each replica gets at most `bound`. [`Error::NotFound`] means the
    /// registration is gone. Must be called within a tokio runtime.
    pub async fn renew(&self, instance: &InstanceRef, bound: Duration) -> Result<Duration, Error> {
        let renewer = self
            .inner
            .renewer
            .get_or_init(|| renewer::spawn(Arc::downgrade(&self.inner)));
        let (reply, answer) = tokio::sync::oneshot::channel();
        renewer
            .send(renewer::Renewal {
                instance: instance.clone(),
                bound: bound.min(self.unary()),
                reply,
            })
            .await
            .map_err(|_| Error::Unavailable("the keep-alive task stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the keep-alive task stopped".into()))?
    }

    /// [`Client::heartbeat`] with each replica given at most `bound`, so a
    /// replica that hangs cannot use up a short lease before the next one
    /// is tried.
    pub async fn heartbeat_within(
        &self,
        instance: &InstanceRef,
        bound: Duration,
    ) -> Result<Duration, Error> {
        let request = weir_proto::registry::v1::HeartbeatRequest {
            instance: Some(instance.clone()),
        };
        let r = self
            .call("Heartbeat", Some(bound.min(self.unary())), |mut c| {
                let request = request.clone();
                async move { c.heartbeat(request).await }
            })
            .await?;
        Ok(Duration::from_secs(u64::from(r.ttl_seconds)))
    }

    /// One service with its instances.
    pub async fn get_service(
        &self,
        request: GetServiceRequest,
    ) -> Result<GetServiceResponse, Error> {
        self.call("GetService", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.get_service(request).await }
        })
        .await
    }

    /// Health of a service's instances with their recent transitions.
    pub async fn get_health(&self, request: GetHealthRequest) -> Result<GetHealthResponse, Error> {
        self.call("GetHealth", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.get_health(request).await }
        })
        .await
    }

    /// Stores a service's settings (an all-unset config removes them).
    pub async fn set_service_config(
        &self,
        request: SetServiceConfigRequest,
    ) -> Result<SetServiceConfigResponse, Error> {
        self.call("SetServiceConfig", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.set_service_config(request).await }
        })
        .await
    }

    /// A service's settings and the protection threshold in force.
    pub async fn get_service_config(
        &self,
        request: GetServiceConfigRequest,
    ) -> Result<GetServiceConfigResponse, Error> {
        self.call("GetServiceConfig", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.get_service_config(request).await }
        })
        .await
    }

    /// One page of services.
    pub async fn list_services(
        &self,
        request: ListServicesRequest,
    ) -> Result<ListServicesResponse, Error> {
        self.call("ListServices", Some(self.unary()), |mut c| {
            let request = request.clone();
            async move { c.list_services(request).await }
        })
        .await
    }

    /// Every page of services matching `request` (its `page_token` is the
    /// starting point). The pages may come from different revisions.
    pub async fn list_all_services(
        &self,
        request: ListServicesRequest,
    ) -> Result<ListServicesResponse, Error> {
        let mut all = ListServicesResponse::default();
        let first = request.page_token.clone();
        each_page(
            "ListServices",
            first,
            |page_token| {
                let request = ListServicesRequest {
                    page_token,
                    ..request.clone()
                };
                async move {
                    let page = self.list_services(request).await?;
                    let next = page.next_page_token.clone();
                    Ok((page, next))
                }
            },
            |page| {
                all.services.extend(page.services);
                all.summaries.extend(page.summaries);
                all.revision = all.revision.max(page.revision);
            },
        )
        .await?;
        Ok(all)
    }

    /// Opens a raw watch stream. Prefer [`WatchView`], which applies the
    /// messages and resumes after failures.
    pub async fn watch(
        &self,
        request: WatchRequest,
    ) -> Result<tonic::Streaming<WatchResponse>, Error> {
        self.call("Watch", None, |mut c| {
            let request = request.clone();
            async move { c.watch(request).await }
        })
        .await
    }

    /// A live view of `namespace` (and `service`, when not empty).
    pub fn watch_view(&self, namespace: &str, service: &str) -> WatchView {
        WatchView::new(self.clone(), namespace, service)
    }
}

/// Follows page tokens from `token` to the last page (an empty next
/// token), handing each page to `take`. `fetch` returns a page and its next
/// token; a server that hands the same token back is a protocol error, not
/// a loop.
pub(crate) async fn each_page<P, F, Fut>(
    what: &str,
    mut token: String,
    mut fetch: F,
    mut take: impl FnMut(P),
) -> Result<(), Error>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(P, String), Error>>,
{
    loop {
        let (page, next) = fetch(token.clone()).await?;
        take(page);
        if next.is_empty() {
            return Ok(());
        }
        if next == token {
            return Err(Error::Protocol(format!(
                "{what} returned the same page token twice ({next:?})"
            )));
        }
        token = next;
    }
}

/// An instance id for a registration that did not name one: the service
/// name and 12 random hex digits.
fn generated_id(service: &str) -> String {
    let n: u64 = rand::random();
    let prefix: String = service.chars().take(100).collect();
    if prefix.is_empty() {
        format!("{:012x}", n & 0xffff_ffff_ffff)
    } else {
        format!("{prefix}-{:012x}", n & 0xffff_ffff_ffff)
    }
}

/// The reference to an instance record.
pub fn instance_ref(i: &Instance) -> InstanceRef {
    InstanceRef {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        instance_id: i.instance_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_are_normalised_and_checked() {
        let c = Client::connect(["127.0.0.1:7070", " http://[::1]:7071 ", ""])
            .await
            .expect("valid endpoints");
        assert_eq!(
            c.endpoints(),
            vec!["http://127.0.0.1:7070", "http://[::1]:7071"]
        );
        assert!(matches!(
            Client::connect(Vec::<String>::new()).await,
            Err(Error::NoEndpoints)
        ));
        assert!(matches!(
            Client::connect(["http://bad host:1"]).await,
            Err(Error::InvalidEndpoint { .. })
        ));
    }

    #[test]
    fn statuses_map_to_typed_errors() {
        let e: Error = Status::invalid_argument("port: must be 1-65535").into();
        assert!(matches!(&e, Error::InvalidArgument { message, .. } if message.contains("port")));
        assert!(e.field_violations().is_empty(), "no details sent");
        assert!(!e.is_transient());
        let e: Error = Status::unavailable("down").into();
        assert!(e.is_transient());
        let e: Error = Status::not_found("gone").into();
        assert_eq!(e.code(), Some(Code::NotFound));
        assert!(!e.is_transient());
    }

    #[test]
    fn invalid_arguments_carry_their_field_violations() {
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "instance.port: must be 1-65535 (got 0)",
            tonic_types::ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new("instance.port", "must be 1-65535 (got 0)"),
                tonic_types::FieldViolation::new("instance.host", "must not be empty"),
            ]),
        );
        let e = Error::from(status);
        assert_eq!(
            e.field_violations(),
            [
                FieldViolation {
                    field: "instance.port".into(),
                    description: "must be 1-65535 (got 0)".into(),
                },
                FieldViolation {
                    field: "instance.host".into(),
                    description: "must not be empty".into(),
                },
            ]
        );
        assert_eq!(
            e.to_string(),
            "invalid argument: instance.port: must be 1-65535 (got 0)"
        );
        assert!(Error::from(Status::not_found("gone"))
            .field_violations()
            .is_empty());
    }

    #[tokio::test]
    async fn pages_are_followed_to_the_last_and_a_repeated_token_stops() {
        // Tokens "" -> "b" -> "c" -> end.
        let mut seen = Vec::new();
        each_page(
            "List",
            String::new(),
            |token| async move {
                let next = match token.as_str() {
                    "" => "b",
                    "b" => "c",
                    _ => "",
                };
                Ok((token, next.to_owned()))
            },
            |page| seen.push(page),
        )
        .await
        .expect("three pages");
        assert_eq!(seen, ["", "b", "c"]);

        let stuck = each_page(
            "List",
            String::new(),
            |_| async { Ok(((), "x".to_owned())) },
            |()| {},
        )
        .await;
        assert!(
            matches!(&stuck, Err(Error::Protocol(m)) if m.contains("List returned the same page token twice")),
            "{stuck:?}"
        );
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generated_id("orders");
        let b = generated_id("orders");
        assert_ne!(a, b);
        assert!(a.starts_with("orders-") && a.len() == "orders-".len() + 12);
        assert_eq!(generated_id("").len(), 12);
    }
}
