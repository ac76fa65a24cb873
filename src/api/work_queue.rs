//! Fire-and-forget commands. A publisher sends a command to `<prefix>.cmd.<kind>.<verb>`; the
//! `<P>_COMMANDS` work-queue stream keeps it until a control plane has processed it, so a command
//! survives a control plane that is down. Processing is at least once; the command id makes a
//! repeat harmless. Each outcome is published (core NATS, not stored) on
//! `<prefix>.result.<command id>` for publishers that want to know.
//!
//! The command id is, in order: `command_id` in the body, the `Switchyard-Command-Id` header,
//! the publisher's `Nats-Msg-Id`, or one derived from the command's stream sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::server::{ApiContext, accepts_fire_and_forget, encode_reply};
use super::{ApiError, parse_request};
use crate::config::StoreConfig;
use crate::domain::{CommandId, ErrorKind};
use crate::metrics::OutcomeLabels;
use crate::runtime::derived_command_id;
use crate::telemetry;

/// The durable consumer every control plane instance pulls from.
pub const CONSUMER: &str = "switchyard";
/// Commands processed at once per instance.
const CONCURRENCY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum WorkQueueError {
    #[error("cannot set up the command stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot set up consumer {CONSUMER} on {stream}")]
    Consumer {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
}

pub struct WorkQueue {
    task: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl WorkQueue {
    pub async fn start(
        context: Arc<ApiContext>,
        js: &jetstream::Context,
        store: &StoreConfig,
    ) -> Result<Self, WorkQueueError> {
        let name = store.commands_stream();
        let stream = js
            .create_or_update_stream(stream::Config {
                name: name.clone(),
                description: Some(
                    "Switchyard fire-and-forget commands, until processed".to_owned(),
                ),
                subjects: vec![context.subjects.all_commands()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_age: store.command_retention,
                max_message_size: i32::try_from(context.config.max_payload).unwrap_or(i32::MAX),
                duplicate_window: store.duplicate_window,
                num_replicas: store.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| WorkQueueError::Stream {
                stream: name.clone(),
                source: e.into(),
            })?;
        let _ = stream;
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| WorkQueueError::Stream {
                stream: name.clone(),
                source: e.into(),
            })?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    description: Some("Switchyard control planes".to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: context.config.command_ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 4 * CONCURRENCY as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| WorkQueueError::Consumer {
                stream: name.clone(),
                source: e.into(),
            })?;
        let (stop, mut stopping) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(CONCURRENCY));
            'pull: loop {
                let mut messages = match consumer.messages().await {
                    Ok(messages) => messages,
                    Err(err) => {
                        tracing::warn!(
                            error = &err as &dyn std::error::Error,
                            "cannot pull commands; retrying"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = &mut stopping => break,
                        }
                    }
                };
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        _ = &mut stopping => break 'pull,
                    };
                    match message {
                        Some(Ok(message)) => {
                            let Ok(permit) = limit.clone().acquire_owned().await else {
                                break 'pull;
                            };
                            let context = context.clone();
                            tokio::spawn(async move {
                                process(&context, message).await;
                                drop(permit);
                            });
                        }
                        Some(Err(err)) => {
                            tracing::warn!(
                                error = &err as &dyn std::error::Error,
                                "command pull failed"
                            );
                        }
                        None => continue 'pull,
                    }
                }
            }
            // Let the commands in flight finish (they are redelivered if this is cut short).
            let _ = limit.acquire_many(CONCURRENCY as u32).await;
        });
        Ok(Self { task, stop })
    }

    /// Stops pulling and waits for the commands in flight, for at most `grace`.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}

async fn process(context: &ApiContext, message: jetstream::Message) {
    let started = Instant::now();
    let seq = message
        .info()
        .map(|info| info.stream_sequence)
        .unwrap_or_default();
    let (kind, verb) = context
        .subjects
        .parse_route(message.subject.as_str(), "cmd")
        .map_or(("", ""), |(k, v)| (k, v));
    let span = tracing::debug_span!(
        "cmd",
        otel.name = %message.subject,
        otel.kind = "consumer",
        messaging.system = "nats",
        kind,
        verb,
        command_id = tracing::field::Empty,
        code = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, message.headers.as_ref());
    let mut command_id = None;
    let result = async {
        let route = context.router.route(kind, verb)?;
        let (mode, handler) = (route.mode, route.handler.clone());
        if !accepts_fire_and_forget(mode) {
            return Err(ApiError::invalid(format!(
                "{kind}.{verb} is a query; send it as a request to {}",
                context.subjects.api(kind, verb)
            )));
        }
        let request = parse_request(
            kind,
            verb,
            &message.payload,
            message.headers.as_ref(),
            context.config.max_payload,
            || command_id_of(&message, seq),
        )?;
        tracing::Span::current().record("command_id", request.meta.command_id.as_str());
        command_id = Some(request.meta.command_id.clone());
        handler.handle(request).await
    }
    .instrument(span.clone())
    .await;
    let code = result.as_ref().err().map_or("ok", |e| e.code.as_str());
    span.record("code", code);
    context
        .micro
        .record(kind, verb, started.elapsed(), result.as_ref().err());
    context
        .router
        .metrics(kind, verb)
        .record(code, started.elapsed());
    let retry = matches!(&result, Err(e) if e.code == ErrorKind::Unavailable);
    if let Err(err) = &result {
        span.in_scope(|| match err.code {
            ErrorKind::Unavailable | ErrorKind::Internal => {
                tracing::warn!(seq, kind, verb, code, message = %err.message, "fire-and-forget command failed")
            }
            _ => tracing::info!(seq, kind, verb, code, message = %err.message, "fire-and-forget command refused"),
        });
    }
    publish_result(
        context,
        command_id.as_ref().map(CommandId::as_str),
        seq,
        result,
    )
    .await;
    let (ack, outcome) = if retry {
        (
            AckKind::Nak(Some(context.config.command_retry_delay)),
            "retry",
        )
    } else if code == ErrorKind::Internal.as_str() {
        // A bug or corrupt data: redelivering would fail the same way forever.
        (AckKind::Term, "terminated")
    } else {
        (AckKind::Ack, code)
    };
    context
        .metrics
        .work_queue
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_owned(),
        })
        .inc();
    if let Err(err) = message.ack_with(ack).await {
        tracing::warn!(
            seq,
            error = &*err,
            "cannot acknowledge a command; it will be redelivered"
        );
    }
}

/// Without an id from the publisher, the command's place in its stream names it: a redelivery
/// of the same message gets the same id.
fn command_id_of(message: &jetstream::Message, seq: u64) -> CommandId {
    let from_msg_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .and_then(|v| CommandId::new(v.as_str()).ok());
    from_msg_id.unwrap_or_else(|| derived_command_id(&format!("{}\n{seq}", message.subject)))
}

async fn publish_result(
    context: &ApiContext,
    command_id: Option<&str>,
    seq: u64,
    result: Result<Bytes, ApiError>,
) {
    let subject = match command_id {
        Some(id) => context.subjects.result(id),
        None => context.subjects.result(&format!("seq-{seq}")),
    };
    let (headers, body) = encode_reply(result);
    if let Err(err) = context
        .client
        .publish_with_headers(subject, headers, body)
        .await
    {
        tracing::debug!(
            error = &err as &dyn std::error::Error,
            "cannot publish a command result"
        );
    }
}
