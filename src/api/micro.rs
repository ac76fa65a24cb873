//! The NATS micro service protocol (ADR-32): `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`, for all
//! services, for `switchyard`, and for this instance's id.
//!
//! Written here rather than with async-nats's `service` module because its responder sends an
//! empty body with every error; Switchyard's errors carry a typed body as well as the micro
//! error headers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiError;
use super::routes::{Mode, RouteSpec};
use crate::subject::Subjects;

pub const SERVICE_NAME: &str = "switchyard";
pub const SERVICE_DESCRIPTION: &str = "Switchyard control plane: commands and queries on entities";

#[derive(Debug, Default)]
struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_nanos: AtomicU64,
    last_error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Endpoint {
    name: String,
    subject: String,
    metadata: HashMap<String, String>,
    stats: EndpointStats,
}

/// This instance's identity and per-endpoint statistics.
#[derive(Debug)]
pub struct Micro {
    id: String,
    version: String,
    started: OffsetDateTime,
    queue_group: String,
    endpoints: BTreeMap<(String, String), Endpoint>,
    ownership: crate::cluster::Ownership,
}

impl Micro {
    pub fn new(
        specs: &[RouteSpec],
        subjects: &Subjects,
        queue_group: &str,
        started: OffsetDateTime,
        ownership: crate::cluster::Ownership,
    ) -> Self {
        let endpoints = specs
            .iter()
            .map(|spec| {
                let mode = match spec.mode {
                    Mode::Command => "command",
                    Mode::Query => "query",
                };
                let metadata = HashMap::from([
                    ("mode".to_owned(), mode.to_owned()),
                    ("summary".to_owned(), spec.summary.to_owned()),
                    (
                        "request_schema".to_owned(),
                        format!("schemas/api/{}.{}.request.json", spec.kind, spec.verb),
                    ),
                    (
                        "reply_schema".to_owned(),
                        format!("schemas/api/{}.{}.reply.json", spec.kind, spec.verb),
                    ),
                ]);
                let endpoint = Endpoint {
                    name: format!("{}-{}", spec.kind, spec.verb),
                    subject: subjects.api(spec.kind, spec.verb),
                    metadata,
                    stats: EndpointStats::default(),
                };
                ((spec.kind.to_owned(), spec.verb.to_owned()), endpoint)
            })
            .collect();
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started,
            queue_group: queue_group.to_owned(),
            endpoints,
            ownership,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Counts one handled request on its endpoint (unknown routes are not endpoints).
    pub fn record(&self, kind: &str, verb: &str, elapsed: Duration, error: Option<&ApiError>) {
        let Some(endpoint) = self.endpoints.get(&(kind.to_owned(), verb.to_owned())) else {
            return;
        };
        let stats = &endpoint.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.processing_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Some(error) = error {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = stats.last_error.lock() {
                *last = Some(format!("{}:{}", error.code.status(), error.message));
            }
        }
    }

    /// Which replica this is and the shards it owns now (micro metadata values are strings).
    fn metadata(&self) -> Value {
        let owned: Vec<String> = self
            .ownership
            .owned()
            .iter()
            .map(ToString::to_string)
            .collect();
        json!({
            "replica": self.ownership.replica(),
            "shards": self.ownership.shards().to_string(),
            "owned_shards": owned.join(","),
        })
    }

    fn ping(&self) -> Value {
        json!({
            "type": "io.nats.micro.v1.ping_response",
            "name": SERVICE_NAME,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata(),
        })
    }

    fn info(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .values()
            .map(|e| {
                json!({
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": self.queue_group,
                    "metadata": e.metadata,
                })
            })
            .collect();
        json!({
            "type": "io.nats.micro.v1.info_response",
            "name": SERVICE_NAME,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata(),
            "description": SERVICE_DESCRIPTION,
            "endpoints": endpoints,
        })
    }

    fn stats(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .values()
            .map(|e| {
                let requests = e.stats.requests.load(Ordering::Relaxed);
                let nanos = e.stats.processing_nanos.load(Ordering::Relaxed);
                let last_error = e
                    .stats
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|l| l.clone())
                    .unwrap_or_default();
                json!({
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": self.queue_group,
                    "num_requests": requests,
                    "num_errors": e.stats.errors.load(Ordering::Relaxed),
                    "last_error": last_error,
                    "processing_time": nanos,
                    "average_processing_time": nanos.checked_div(requests).unwrap_or(0),
                })
            })
            .collect();
        json!({
            "type": "io.nats.micro.v1.stats_response",
            "name": SERVICE_NAME,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata(),
            "started": self.started.format(&Rfc3339).unwrap_or_default(),
            "endpoints": endpoints,
        })
    }

    /// Answers `$SRV.*` discovery requests until the connection closes.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        client: Client,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
        let mut subscriptions = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{SERVICE_NAME}"),
                format!("$SRV.{verb}.{SERVICE_NAME}.{}", self.id),
            ] {
                subscriptions.push(client.subscribe(subject).await?);
            }
        }
        let mut requests = futures::stream::select_all(subscriptions);
        Ok(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let Some(reply) = request.reply else { continue };
                let verb = request.subject.split('.').nth(1).unwrap_or_default();
                let body = match verb {
                    "PING" => self.ping(),
                    "INFO" => self.info(),
                    _ => self.stats(),
                };
                if let Err(err) = client.publish(reply, body.to_string().into()).await {
                    tracing::warn!(
                        error = &err as &dyn std::error::Error,
                        "cannot answer a $SRV request"
                    );
                }
            }
        }))
    }
}
