//! Telemetry (`weir.telemetry.v1`): an agent's report stream, and the
//! queries any replica answers for the whole cluster (traces, traffic
//! statistics, topology).

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use weir_proto::telemetry::v1::{
    telemetry_client::TelemetryClient, Batch, GetStatsRequest, GetStatsResponse,
    GetTopologyRequest, GetTopologyResponse, GetTraceRequest, GetTraceResponse, ListTracesRequest,
    ListTracesResponse, ReportAck,
};

use crate::{Client, Error, MAX_RESPONSE_BYTES};

/// Batches an agent may have sent and not yet seen acknowledged.
pub const REPORT_WINDOW: usize = 16;

fn telemetry_client(ch: Channel) -> TelemetryClient<Channel> {
    TelemetryClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// An open report stream: send batches, read their acknowledgements.
#[derive(Debug)]
pub struct ReportStream {
    pub batches: mpsc::Sender<Batch>,
    pub acks: tonic::Streaming<ReportAck>,
}

impl Client {
    /// Opens a report stream on the first replica that takes it.
    pub async fn open_report(&self) -> Result<ReportStream, Error> {
        let mut last = Error::NoEndpoints;
        for index in self.order() {
            let (tx, rx) = mpsc::channel(REPORT_WINDOW);
            let mut client = telemetry_client(self.channel(index));
            let opened =
                tokio::time::timeout(self.unary(), client.report(ReceiverStream::new(rx))).await;
            match opened {
                Ok(Ok(acks)) => {
                    self.prefer(index);
                    return Ok(ReportStream {
                        batches: tx,
                        acks: acks.into_inner(),
                    });
                }
                Ok(Err(status)) => {
                    let e = Error::from(status);
                    if !e.is_transient() {
                        return Err(e);
                    }
                    last = e;
                }
                Err(_) => {
                    last = Error::from(tonic::Status::deadline_exceeded(
                        "opening the report stream took too long",
                    ))
                }
            }
        }
        Err(last)
    }

    /// Recent traces, newest first.
    pub async fn list_traces(
        &self,
        request: ListTracesRequest,
    ) -> Result<ListTracesResponse, Error> {
        self.call_with(
            "ListTraces",
            Some(self.unary()),
            telemetry_client,
            |mut c| {
                let request = request.clone();
                async move { c.list_traces(request).await }
            },
        )
        .await
    }

    /// Every span of one trace (id: 32 hex digits).
    pub async fn get_trace(&self, trace_id: &str) -> Result<GetTraceResponse, Error> {
        let request = GetTraceRequest {
            trace_id: trace_id.to_owned(),
        };
        self.call_with("GetTrace", Some(self.unary()), telemetry_client, |mut c| {
            let request = request.clone();
            async move { c.get_trace(request).await }
        })
        .await
    }

    /// Traffic per service and edge over a window.
    pub async fn get_stats(&self, request: GetStatsRequest) -> Result<GetStatsResponse, Error> {
        self.call_with("GetStats", Some(self.unary()), telemetry_client, |mut c| {
            let request = request.clone();
            async move { c.get_stats(request).await }
        })
        .await
    }

    /// Services and topics as a graph.
    pub async fn get_topology(
        &self,
        request: GetTopologyRequest,
    ) -> Result<GetTopologyResponse, Error> {
        self.call_with(
            "GetTopology",
            Some(self.unary()),
            telemetry_client,
            |mut c| async move { c.get_topology(request).await },
        )
        .await
    }
}
