//! `weir.registry.v1.Registry` as the agent serves it to its node.

use std::{
    pin::Pin,
    sync::{Arc, RwLock},
};

use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};
use weir_client::RegistryMirror;
use weir_proto::registry::v1::{
    keep_alive_response, registry_server::Registry, DeregisterRequest, DeregisterResponse,
    GetHealthRequest, GetHealthResponse, GetServiceConfigRequest, GetServiceConfigResponse,
    GetServiceRequest, GetServiceResponse, HeartbeatRequest, HeartbeatResponse, InstanceRef,
    KeepAliveRequest, KeepAliveResponse, ListServicesRequest, ListServicesResponse,
    RegisterRequest, RegisterResponse, ReportHealthRequest, ReportHealthResponse, Service,
    ServiceProtection, SetServiceConfigRequest, SetServiceConfigResponse, WatchRequest,
    WatchResponse,
};

use weir_core::InstanceKey;

use super::{Local, LocalError};

/// Most instances in one KeepAlive message, as the control plane.
const MAX_KEEPALIVE_BATCH: usize = 1024;

/// The local Registry service.
#[derive(Debug, Clone)]
pub struct LocalRegistry {
    local: Arc<Local>,
    view: Arc<RwLock<RegistryMirror>>,
}

fn invalid(field: &str, rule: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {rule}"),
        ErrorDetails::with_bad_request_violation(field, rule),
    )
}

/// The control plane's answer, passed on to the local caller.
fn relayed(e: weir_client::Error) -> Status {
    match e {
        weir_client::Error::InvalidArgument {
            message,
            violations,
        } => {
            let mut details = ErrorDetails::new();
            for v in violations {
                details.add_bad_request_violation(v.field, v.description);
            }
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        other => Status::new(
            other.code().unwrap_or(Code::Unavailable),
            format!("control plane: {other}"),
        ),
    }
}

impl From<LocalError> for Status {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Invalid { field, rule } => invalid(&field, &rule),
            no_session @ LocalError::NoSession => Status::unavailable(no_session.to_string()),
            LocalError::ControlPlane(e) => relayed(e),
        }
    }
}

fn not_here(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is answered by the control plane, not by the node's agent: ask it directly"
    ))
}

/// A valid instance reference, as a key (the namespace defaulted).
fn reference(r: Option<&InstanceRef>) -> Result<InstanceKey, Status> {
    weir_core::validate::instance_ref("instance", r).map_err(|e| invalid(&e.field, &e.rule))
}

impl LocalRegistry {
    pub fn new(local: Arc<Local>, view: Arc<RwLock<RegistryMirror>>) -> Self {
        Self { local, view }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for LocalRegistry {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        if !req.agent_node.is_empty() {
            return Err(invalid(
                "agent_node",
                "is set by the agent: leave it empty when registering with your node's agent",
            ));
        }
        let instance = weir_core::validate::registration(req.instance.as_ref())
            .map_err(|e| invalid(&e.field, &e.rule))?;
        Ok(Response::new(self.local.register(instance).await?))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let r = reference(request.into_inner().instance.as_ref())?;
        let existed = self.local.deregister(&r).await?;
        Ok(Response::new(DeregisterResponse {
            existed,
            revision: 0,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = reference(request.into_inner().instance.as_ref())?;
        match self.local.beat(&r) {
            Some(ttl) => Ok(Response::new(HeartbeatResponse {
                ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            })),
            None => Err(Status::not_found(format!(
                "{r} is not registered with this agent: register it again"
            ))),
        }
    }

    type KeepAliveStream = BoxStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let local = self.local.clone();
        let answers = request.into_inner().map(move |message| {
            let message = message?;
            if message.instances.len() > MAX_KEEPALIVE_BATCH {
                return Err(invalid(
                    "instances",
                    &format!("at most {MAX_KEEPALIVE_BATCH} per message"),
                ));
            }
            let results = message
                .instances
                .into_iter()
                .map(|r| {
                    let checked = reference(Some(&r));
                    let (alive, ttl, code, error) = match checked {
                        Err(s) => (false, 0, Code::InvalidArgument, s.message().to_owned()),
                        Ok(r) => match local.beat(&r) {
                            Some(ttl) => (true, ttl.as_secs(), Code::Ok, String::new()),
                            None => (
                                false,
                                0,
                                Code::NotFound,
                                "not registered with this agent: register it again".to_owned(),
                            ),
                        },
                    };
                    keep_alive_response::Result {
                        instance: Some(r),
                        alive,
                        ttl_seconds: u32::try_from(ttl).unwrap_or(u32::MAX),
                        error,
                        code: code as i32,
                    }
                })
                .collect();
            Ok(KeepAliveResponse { results })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_service(
        &self,
        request: Request<GetServiceRequest>,
    ) -> Result<Response<GetServiceResponse>, Status> {
        let req = request.into_inner();
        let (namespace, service) = weir_core::validate::service_name(&req.namespace, &req.service)
            .map_err(|e| invalid(&e.field, &e.rule))?;
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let protected = view.in_protection(&namespace, &service);
        let only_healthy = req.healthy_only && !protected;
        let instances = view
            .service(&namespace, &service)
            .filter(|i| !only_healthy || weir_core::health::takes_traffic(i))
            .cloned()
            .collect();
        Ok(Response::new(GetServiceResponse {
            service: Some(Service {
                namespace: namespace.clone(),
                name: service.clone(),
                instances,
                protection: Some(ServiceProtection {
                    namespace,
                    service,
                    active: protected,
                    ..ServiceProtection::default()
                }),
            }),
            revision: view.revision(),
        }))
    }

    async fn get_health(
        &self,
        _: Request<GetHealthRequest>,
    ) -> Result<Response<GetHealthResponse>, Status> {
        Err(not_here("GetHealth"))
    }

    async fn set_service_config(
        &self,
        _: Request<SetServiceConfigRequest>,
    ) -> Result<Response<SetServiceConfigResponse>, Status> {
        Err(not_here("SetServiceConfig"))
    }

    async fn get_service_config(
        &self,
        _: Request<GetServiceConfigRequest>,
    ) -> Result<Response<GetServiceConfigResponse>, Status> {
        Err(not_here("GetServiceConfig"))
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Err(not_here("ListServices"))
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(not_here("Watch"))
    }

    async fn report_health(
        &self,
        _: Request<ReportHealthRequest>,
    ) -> Result<Response<ReportHealthResponse>, Status> {
        Err(Status::unimplemented(
            "ReportHealth is how agents report to the control plane; the agent runs its node's checks itself",
        ))
    }
}
