//! The request/reply side of the API: one queue subscription on `<prefix>.api.>`, one task per
//! request (bounded), a handling span per request in the caller's trace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::auth::{Auth, Origin};
use super::micro::Micro;
use super::{ApiError, ERROR_CODE_HEADER, ERROR_REASON_HEADER, Mode, Router, parse_request};
use crate::config::ApiConfig;
use crate::domain::ErrorKind;
use crate::metrics::Metrics;
use crate::subject::Subjects;
use crate::telemetry;

/// What every request handler shares.
pub struct ApiContext {
    pub client: Client,
    pub auth: super::auth::Auth,
    pub subjects: Subjects,
    pub router: Router,
    pub micro: Arc<Micro>,
    pub metrics: Metrics,
    pub config: ApiConfig,
    pub ownership: crate::cluster::Ownership,
}

/// The running request/reply server.
pub struct ApiServer {
    task: JoinHandle<()>,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
    client: Client,
    subscription_closed: tokio::sync::oneshot::Sender<()>,
}

impl ApiServer {
    pub async fn start(context: Arc<ApiContext>) -> Result<Self, async_nats::SubscribeError> {
        let mut requests = context
            .client
            .queue_subscribe(
                context.subjects.all_api(),
                context.config.queue_group.clone(),
            )
            .await?;
        let max_in_flight = u32::try_from(context.config.max_in_flight.max(1)).unwrap_or(u32::MAX);
        let in_flight = Arc::new(Semaphore::new(max_in_flight as usize));
        let (subscription_closed, mut closing) = tokio::sync::oneshot::channel();
        let limit = in_flight.clone();
        let client = context.client.clone();
        let task = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = requests.next() => match message {
                        Some(message) => message,
                        None => break,
                    },
                    _ = &mut closing => {
                        let _ = requests.unsubscribe().await;
                        break;
                    }
                };
                let Some(reply) = message.reply.clone() else {
                    tracing::debug!(subject = %message.subject, "ignoring an API message without a reply subject; use the cmd subjects to fire and forget");
                    continue;
                };
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let context = context.clone();
                        tokio::spawn(async move {
                            handle(&context, message, Via::Caller).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let error = ApiError::unavailable(
                            "too many requests in flight; retry with the same command_id",
                        );
                        respond(&context.client, reply.as_str(), Err(error)).await;
                    }
                }
            }
        });
        Ok(Self {
            task,
            in_flight,
            max_in_flight,
            client,
            subscription_closed,
        })
    }

    /// Stops taking requests, lets those in flight finish (for at most `grace`), and flushes.
    pub async fn stop(self, grace: Duration) {
        let _ = self.subscription_closed.send(());
        let _ = self.task.await;
        let _ = tokio::time::timeout(grace, self.in_flight.acquire_many(self.max_in_flight)).await;
        let _ = self.client.flush().await;
    }
}

/// How a request reached this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// From the caller, through the queue group: it may belong to another replica's shard.
    Caller,
    /// Forwarded by another replica, which found this one owning the entity's shard.
    Replica,
}

/// What became of a request.
enum Handled {
    Reply(Bytes),
    /// Sent on to the replica owning its entity, which answers the caller directly.
    Forwarded,
}

/// Handles one request end to end; never fails: every outcome is a reply (here, or from the
/// replica it was forwarded to).
pub async fn handle(context: &ApiContext, message: Message, via: Via) {
    let started = Instant::now();
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let route = match via {
        Via::Caller => context
            .subjects
            .parse_route(message.subject.as_str(), "api"),
        Via::Replica => context
            .subjects
            .parse_replica(message.subject.as_str(), context.ownership.replica())
            .and_then(|(channel, rest)| (channel == "api").then_some(rest))
            .and_then(|rest| rest.split_once('.')),
    };
    let (kind, verb) = route.unwrap_or(("", ""));
    let span = tracing::debug_span!(
        "api",
        otel.name = %format!("{}", context.subjects.api(kind, verb)),
        otel.kind = "server",
        messaging.system = "nats",
        kind,
        verb,
        command_id = tracing::field::Empty,
        code = tracing::field::Empty,
        forwarded_to = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, message.headers.as_ref());
    let result = dispatch(context, kind, verb, &message, via)
        .instrument(span.clone())
        .await;
    let result = match result {
        Ok(Handled::Forwarded) => return,
        Ok(Handled::Reply(body)) => Ok(body),
        Err(err) => Err(err),
    };
    let code = match &result {
        Ok(_) => "ok",
        Err(err) => err.code.as_str(),
    };
    span.record("code", code);
    if let Err(err) = &result {
        // The caller gets every refusal; only our own failures are worth an operator's eye.
        span.in_scope(|| match err.code {
            ErrorKind::Unavailable | ErrorKind::Internal => {
                tracing::warn!(kind, verb, code, message = %err.message, "request failed")
            }
            _ => tracing::debug!(kind, verb, code, message = %err.message, "request refused"),
        });
    }
    context
        .micro
        .record(kind, verb, started.elapsed(), result.as_ref().err());
    context
        .router
        .metrics(kind, verb)
        .record(code, started.elapsed());
    respond(&context.client, reply.as_str(), result).await;
}

async fn dispatch(
    context: &ApiContext,
    kind: &str,
    verb: &str,
    message: &Message,
    via: Via,
) -> Result<Handled, ApiError> {
    if kind.is_empty() {
        return Err(ApiError::not_found(format!(
            "{} is not an API subject; use {}",
            message.subject,
            context.subjects.api("<kind>", "<verb>")
        )));
    }
    let route = context.router.route(kind, verb)?;
    let (mode, handler) = (route.mode, route.handler.clone());
    let mut request = parse_request(
        kind,
        verb,
        &message.payload,
        message.headers.as_ref(),
        context.config.max_payload,
        super::IdSource::Fresh,
        crate::runtime::new_command_id,
    )?;
    tracing::Span::current().record("command_id", request.meta.command_id.as_str());
    if via == Via::Caller
        && let Some(entity) = route.entity.and_then(|entity_of| entity_of(&request))
    {
        match forward(context, kind, verb, &entity, message).await {
            Forward::Sent => return Ok(Handled::Forwarded),
            Forward::HandleHere => {}
            Forward::Unconfirmed(replica) if mode == Mode::Query => {
                tracing::debug!(%replica, "the owner did not confirm a forwarded read; reading here");
            }
            Forward::Unconfirmed(replica) => {
                return Err(ApiError::unavailable(format!(
                    "replica {replica}, which owns {kind} {entity:?}, did not confirm it took the request; retry with the same command id"
                ))
                .with_reason(crate::cluster::SHARD_MOVED));
            }
        }
    }
    let caller = context.auth.identify(
        Origin::Request(message.headers.as_ref()),
        &request.meta.principal,
    )?;
    request.meta.principal = caller.principal.clone();
    let check = context
        .auth
        .authorize(&caller, kind, verb, mode, &request)?;
    let reply = handler.handle(request).await?;
    Auth::after(&check, &reply)?;
    Ok(Handled::Reply(reply))
}

/// The header a forwarded request carries its caller's reply subject in: the owner answers
/// there, and acknowledges receipt to the forwarder on the request's own reply subject.
pub const FORWARDED_FOR: &str = "Switchyard-Forwarded-For";

/// How long a forwarder waits for the owner to acknowledge a forwarded request.
const FORWARD_ACK: Duration = Duration::from_secs(2);

/// What became of an attempt to forward.
enum Forward {
    /// The owner took it and answers the caller.
    Sent,
    /// Nobody else owns it, or the owner is gone (no responders): handle it here.
    HandleHere,
    /// The owner did not acknowledge in time: it may or may not have taken it.
    Unconfirmed(String),
}

/// Sends the request, as it came (headers, body, the caller's reply subject in
/// [`FORWARDED_FOR`]), to the replica owning its entity's shard, if that is another one. The
/// owner acknowledges receipt at once, then authenticates and answers the caller itself; this
/// replica adds only a hop. A replica that died without its lease having lapsed yet has no
/// subscription left, so the forward meets "no responders" and the request is handled here
/// (a command then waits for the shard's next owner) instead of being lost.
async fn forward(
    context: &ApiContext,
    kind: &str,
    verb: &str,
    entity: &str,
    message: &Message,
) -> Forward {
    let ownership = &context.ownership;
    let shard = ownership.shard_of(kind, entity);
    let crate::cluster::Route::Remote { replica } = ownership.route(shard) else {
        // Ours, or nobody's: handled here (a command waits for an owner and goes to it, a read
        // goes to the log).
        return Forward::HandleHere;
    };
    let Some(reply) = message.reply.clone() else {
        return Forward::HandleHere;
    };
    tracing::Span::current().record("forwarded_to", replica.as_str());
    let mut headers = message.headers.clone().unwrap_or_default();
    telemetry::inject(&tracing::Span::current(), &mut headers);
    headers.insert(FORWARDED_FOR, reply.as_str());
    let sent = tokio::time::timeout(
        FORWARD_ACK,
        context.client.request_with_headers(
            context.subjects.replica_api(&replica, kind, verb),
            headers,
            message.payload.clone(),
        ),
    )
    .await;
    match sent {
        Ok(Ok(_)) => {
            context
                .metrics
                .forwarded
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: "api".to_owned(),
                })
                .inc();
            Forward::Sent
        }
        Ok(Err(err)) if err.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            ownership.suspect(&replica);
            Forward::HandleHere
        }
        Ok(Err(err)) => {
            tracing::debug!(error = %err, %replica, "cannot forward");
            Forward::Unconfirmed(replica)
        }
        Err(_) => Forward::Unconfirmed(replica),
    }
}

/// Sends a reply: the JSON result, or the typed error in the body and in the micro headers.
pub async fn respond(client: &Client, reply: &str, result: Result<Bytes, ApiError>) {
    let (headers, body) = encode_reply(result);
    if let Err(err) = client
        .publish_with_headers(reply.to_owned(), headers, body)
        .await
    {
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "cannot send a reply"
        );
    }
}

pub fn encode_reply(result: Result<Bytes, ApiError>) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let body = match result {
        Ok(value) => value,
        Err(error) => {
            // Header values are one line.
            let one_line = error.message.replace(['\r', '\n'], " ");
            headers.insert(async_nats::service::NATS_SERVICE_ERROR, one_line.as_str());
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR_CODE,
                error.code.status().to_string().as_str(),
            );
            headers.insert(ERROR_CODE_HEADER, error.code.as_str());
            if let Some(reason) = error.reason {
                headers.insert(ERROR_REASON_HEADER, reason);
            }
            Bytes::from(serde_json::to_vec(&error.body()).unwrap_or_default())
        }
    };
    (headers, body)
}

/// Whether a route may be sent fire-and-forget.
pub fn accepts_fire_and_forget(mode: Mode) -> bool {
    mode == Mode::Command
}
