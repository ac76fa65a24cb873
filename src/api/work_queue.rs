//! Fire-and-forget commands. A publisher sends a command to `<prefix>.cmd.<kind>.<verb>`; the
//! `<P>_COMMANDS` work-queue stream keeps it until a control plane has processed it, so a command
//! survives a control plane that is down. Each outcome is published (core NATS, not stored) on
//! `<prefix>.result.<command id>` for publishers that want to know.
//!
//! A command is either applied once or kept: it is acknowledged only once its outcome is
//! definite (applied, or refused for good). While it meets a transient failure (`unavailable`,
//! or a `conflict` with reason `contended`) it is retried where it stands, its acknowledgement
//! deadline pushed back, so it is never dropped and never overtaken. Commands for one entity
//! are applied in the order the stream holds them: one control plane at a time pulls the queue
//! (a JetStream consumer in a pinned priority group; another takes over when it stops pulling),
//! and it runs one command per entity at a time, the others waiting in that entity's lane.
//!
//! The command id is, in order: `command_id` in the body, the `Switchyard-Command-Id` header,
//! the publisher's `Nats-Msg-Id`, or one derived from the command's stream sequence.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use super::server::{ApiContext, accepts_fire_and_forget, encode_reply};
use super::{ApiError, ApiRequest, parse_request};
use crate::config::StoreConfig;
use crate::domain::{CommandId, ErrorKind};
use crate::metrics::OutcomeLabels;
use crate::runtime::{CONTENDED, derived_command_id};
use crate::telemetry;

/// The durable consumer every control plane instance pulls from.
pub const CONSUMER: &str = "switchyard";
/// The priority group whose pinned client alone receives commands.
pub const GROUP: &str = "switchyard";
/// Entities whose commands run at once per instance.
const CONCURRENCY: usize = 256;
/// How long a pull request waits on the server, at most; well below the pin's timeout
/// (`api.command_failover`), so the pinned instance keeps its pin while the queue is quiet.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

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
    stop: watch::Sender<bool>,
}

impl WorkQueue {
    pub async fn start(
        context: Arc<ApiContext>,
        js: &jetstream::Context,
        store: &StoreConfig,
    ) -> Result<Self, WorkQueueError> {
        let name = store.commands_stream();
        let stream_error = |e: async_nats::Error| WorkQueueError::Stream {
            stream: name.clone(),
            source: e,
        };
        js.create_or_update_stream(stream::Config {
            name: name.clone(),
            description: Some("Switchyard fire-and-forget commands, until processed".to_owned()),
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
        .map_err(|e| stream_error(e.into()))?;
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| stream_error(e.into()))?;
        let consumer = pinned_consumer(&stream, &context, &name).await?;
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(run(context, stream, consumer, stopping));
        Ok(Self { task, stop })
    }

    /// Stops pulling, gives back what waits in the lanes, and waits for the commands in
    /// flight, for at most `grace`.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}

/// The durable consumer, in a pinned priority group. A consumer of an older release (without
/// the group) is replaced: on a work queue, its messages stay in the stream for the new one.
async fn pinned_consumer(
    stream: &jetstream::stream::Stream,
    context: &ApiContext,
    name: &str,
) -> Result<consumer::PullConsumer, WorkQueueError> {
    let config = consumer::pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        description: Some("Switchyard control planes (one pinned at a time)".to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: context.config.command_ack_wait,
        max_deliver: -1,
        max_ack_pending: 4 * CONCURRENCY as i64,
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_owned()],
        priority_timeout: context.config.command_failover.max(Duration::from_secs(1)),
        ..Default::default()
    };
    let consumer_error = |e: async_nats::Error| WorkQueueError::Consumer {
        stream: name.to_owned(),
        source: e,
    };
    match stream
        .get_consumer::<consumer::pull::Config>(CONSUMER)
        .await
    {
        Ok(existing)
            if existing.cached_info().config.priority_policy
                != consumer::PriorityPolicy::PinnedClient =>
        {
            tracing::info!(
                consumer = CONSUMER,
                "replacing the command consumer of an older release with a pinned one"
            );
            // Another instance starting alongside may have replaced it already.
            if let Err(err) = stream.delete_consumer(CONSUMER).await {
                tracing::debug!(
                    error = &err as &dyn std::error::Error,
                    "the old command consumer is gone already"
                );
            }
        }
        _ => {}
    }
    stream
        .create_consumer(config)
        .await
        .map_err(|e| consumer_error(e.into()))
}

/// Pulls commands and runs them: one lane per entity, one command of a lane at a time, in
/// stream order.
async fn run(
    context: Arc<ApiContext>,
    stream: jetstream::stream::Stream,
    mut consumer: consumer::PullConsumer,
    mut stopping: watch::Receiver<bool>,
) {
    let mut lanes = Lanes::default();
    let mut running: JoinSet<()> = JoinSet::new();
    // Messages waiting behind their lane's head are kept from being redelivered meanwhile.
    let mut progress = tokio::time::interval(
        (context.config.command_ack_wait / 3).max(Duration::from_millis(100)),
    );
    let mut gate_check = tokio::time::interval(Duration::from_millis(100));
    let expires = PULL_EXPIRES
        .min(context.config.command_failover / 3)
        .max(Duration::from_millis(300));
    'pull: loop {
        let mut messages = match consumer
            .stream()
            .group(GROUP)
            .expires(expires)
            .heartbeat(expires / 3)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "cannot pull commands; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopping.changed() => break,
                }
            }
        };
        // A new pull starts closed: commands delivered to an earlier holder of the pin (one
        // that crashed) come back only when their acknowledgement deadline passes, after
        // newer ones. Nothing runs until every command the consumer has out is one this
        // instance holds; the lanes then run them in stream order.
        lanes.gated = true;
        loop {
            tokio::select! {
                _ = stopping.changed() => break 'pull,
                Some(done) = running.join_next_with_id() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(err) => err.id(),
                    };
                    if let Some(key) = lanes.finished(id) {
                        start(&mut lanes, &mut running, &context, &stopping, &key);
                    }
                    // A slot is free: a lane held back by the limit may start.
                    if running.len() < CONCURRENCY && lanes.queued.len() > running.len() {
                        for key in lanes.keys() {
                            start(&mut lanes, &mut running, &context, &stopping, &key);
                        }
                    }
                }
                message = messages.next(), if lanes.held() < MAX_HELD => match message {
                    Some(Ok(message)) => {
                        let pulled = Pulled::new(&context, message);
                        let key = pulled.lane.clone();
                        lanes.admit(&key, pulled);
                        start(&mut lanes, &mut running, &context, &stopping, &key);
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = &err as &dyn std::error::Error, "command pull failed");
                    }
                    None => continue 'pull,
                },
                _ = gate_check.tick(), if lanes.gated => {
                    match consumer.info().await {
                        Ok(info) if info.num_ack_pending <= lanes.held() => {
                            lanes.gated = false;
                            for key in lanes.keys() {
                                start(&mut lanes, &mut running, &context, &stopping, &key);
                            }
                        }
                        Ok(_) => {}
                        Err(err) => tracing::debug!(error = &err as &dyn std::error::Error, "cannot read the command consumer"),
                    }
                }
                _ = progress.tick() => {
                    for message in lanes.waiting() {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }
    // Give back what waits, in stream order, and the pin: another instance takes over now
    // rather than after the pin times out. What is in flight finishes (or is redelivered).
    let mut waiting: Vec<&Pulled> = lanes.queued.values().flatten().collect();
    waiting.sort_by_key(|pulled| pulled.seq);
    for pulled in waiting {
        let _ = pulled.message.ack_with(AckKind::Nak(None)).await;
    }
    while running.join_next().await.is_some() {}
    if let Err(err) = stream.unpin_consumer(CONSUMER, GROUP).await {
        tracing::debug!(
            error = &err as &dyn std::error::Error,
            "cannot hand the command queue's pin over"
        );
    }
}

/// Commands held at once (running and waiting): the consumer's own bound on what is out.
const MAX_HELD: usize = 4 * CONCURRENCY;

/// Starts the next command of lane `key`, if the lane is free and the gate open.
fn start(
    lanes: &mut Lanes,
    running: &mut JoinSet<()>,
    context: &Arc<ApiContext>,
    stopping: &watch::Receiver<bool>,
    key: &str,
) {
    if running.len() >= CONCURRENCY {
        return;
    }
    if let Some(pulled) = lanes.next(key) {
        let id = running
            .spawn(process_until_definite(
                context.clone(),
                pulled,
                stopping.clone(),
            ))
            .id();
        lanes.started(id, key.to_owned());
    }
}

/// A command as pulled, read once however often it is tried: its route and request (or why it
/// cannot run), who sent it, and its lane.
struct Pulled {
    message: jetstream::Message,
    seq: u64,
    kind: String,
    verb: String,
    /// Known as soon as the request parses.
    command_id: Option<CommandId>,
    /// The request, authorized, with its caller's principal; or the definite refusal.
    request: Result<ApiRequest, ApiError>,
    /// Its entity (`<kind>\n<id>`), or its own when it names none (it is refused anyway).
    lane: String,
}

impl Pulled {
    fn new(context: &ApiContext, message: jetstream::Message) -> Self {
        let seq = stream_sequence(&message);
        let (account, kind, verb) = context
            .subjects
            .parse_command(message.subject.as_str())
            .unwrap_or((None, "", ""));
        let (kind, verb) = (kind.to_owned(), verb.to_owned());
        let mut command_id = None;
        let mut entity = None;
        let request = (|| {
            let route = context.router.route(&kind, &verb)?;
            if !accepts_fire_and_forget(route.mode) {
                return Err(ApiError::invalid(format!(
                    "{kind}.{verb} is a query; send it as a request to {}",
                    context.subjects.api(&kind, &verb)
                )));
            }
            let mut request = parse_request(
                &kind,
                &verb,
                &message.payload,
                message.headers.as_ref(),
                context.config.max_payload,
                super::IdSource::Derived,
                || command_id_of(&message, seq),
            )?;
            command_id = Some(request.meta.command_id.clone());
            entity = route.entity.and_then(|entity_of| entity_of(&request));
            let caller = context.auth.identify(
                super::auth::Origin::FireAndForget {
                    account,
                    headers: message.headers.as_ref(),
                },
                &request.meta.principal,
            )?;
            request.meta.principal = caller.principal.clone();
            context
                .auth
                .authorize(&caller, &kind, &verb, route.mode, &request)?;
            Ok(request)
        })();
        let lane = match entity {
            Some(entity) => format!("{kind}\n{entity}"),
            None => format!("\n{seq}"),
        };
        Self {
            message,
            seq,
            kind,
            verb,
            command_id,
            request,
            lane,
        }
    }
}

fn stream_sequence(message: &jetstream::Message) -> u64 {
    message
        .info()
        .map(|info| info.stream_sequence)
        .unwrap_or_default()
}

/// The lanes: what each entity has waiting, in stream order, and which have one running.
#[derive(Default)]
struct Lanes {
    /// While set, nothing starts (see `run`).
    gated: bool,
    queued: HashMap<String, VecDeque<Pulled>>,
    running: HashMap<tokio::task::Id, String>,
    busy: HashSet<String>,
}

impl Lanes {
    /// Queues `message` in its lane, by stream sequence: a redelivery of an older command goes
    /// before the newer ones that overtook it.
    fn admit(&mut self, key: &str, pulled: Pulled) {
        let queue = self.queued.entry(key.to_owned()).or_default();
        let at = queue.partition_point(|queued| queued.seq < pulled.seq);
        if queue.get(at).is_some_and(|queued| queued.seq == pulled.seq) {
            // The same command delivered again while it waits: keep the newer delivery.
            queue[at] = pulled;
        } else {
            queue.insert(at, pulled);
        }
    }

    /// The lane's next command to run, if the lane is free and the gate open.
    fn next(&mut self, key: &str) -> Option<Pulled> {
        if self.gated || self.busy.contains(key) {
            return None;
        }
        let queue = self.queued.get_mut(key)?;
        let pulled = queue.pop_front()?;
        if queue.is_empty() {
            self.queued.remove(key);
        }
        self.busy.insert(key.to_owned());
        Some(pulled)
    }

    fn started(&mut self, task: tokio::task::Id, key: String) {
        self.running.insert(task, key);
    }

    /// A lane's command is done; returns the lane, free again.
    fn finished(&mut self, task: tokio::task::Id) -> Option<String> {
        let key = self.running.remove(&task)?;
        self.busy.remove(&key);
        Some(key)
    }

    fn keys(&self) -> Vec<String> {
        self.queued.keys().cloned().collect()
    }

    /// Commands received and not yet finished.
    fn held(&self) -> usize {
        self.running.len() + self.queued.values().map(VecDeque::len).sum::<usize>()
    }

    fn waiting(&self) -> impl Iterator<Item = &jetstream::Message> {
        self.queued.values().flatten().map(|pulled| &pulled.message)
    }
}

/// Whether an outcome may change if the command is tried again.
/// `internal` counts: it says the command may or may not have been applied, so it is kept
/// and tried again (a retry is recognised if it was), never dropped.
fn transient(error: &ApiError) -> bool {
    matches!(error.code, ErrorKind::Unavailable | ErrorKind::Internal)
        || (error.code == ErrorKind::Conflict && error.reason == Some(CONTENDED))
}

/// The longest wait between two tries of one command.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Runs a command until its outcome is definite, retrying where it stands while the failure
/// is transient, then acknowledges it. Asked to stop, it leaves the command unacknowledged
/// for redelivery.
async fn process_until_definite(
    context: Arc<ApiContext>,
    pulled: Pulled,
    stopping: watch::Receiver<bool>,
) {
    let mut delay = context.config.command_retry_delay;
    loop {
        let retry = process(&context, &pulled).await;
        if !retry {
            return;
        }
        context
            .metrics
            .work_queue
            .get_or_create(&OutcomeLabels {
                outcome: "retry".to_owned(),
            })
            .inc();
        // Still ours: push the redelivery deadline back while it waits.
        let _ = pulled.message.ack_with(AckKind::Progress).await;
        if *stopping.borrow() {
            return;
        }
        let mut stopping = stopping.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping.changed() => return,
        }
        // Each failure in a row waits longer, up to a bound.
        delay = (delay * 2).min(MAX_RETRY_DELAY.max(context.config.command_retry_delay));
    }
}

/// Runs one command once and publishes its outcome; acknowledges it unless the outcome is
/// transient. Returns whether it should be tried again.
async fn process(context: &ApiContext, pulled: &Pulled) -> bool {
    let started = Instant::now();
    let Pulled {
        message,
        seq,
        kind,
        verb,
        command_id,
        ..
    } = pulled;
    let (seq, kind, verb) = (*seq, kind.as_str(), verb.as_str());
    let span = tracing::debug_span!(
        "cmd",
        otel.name = %message.subject,
        otel.kind = "consumer",
        messaging.system = "nats",
        kind,
        verb,
        command_id = command_id.as_ref().map(CommandId::as_str),
        code = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, message.headers.as_ref());
    let result = async {
        let request = pulled.request.clone()?;
        let handler = context.router.route(kind, verb)?.handler.clone();
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
    let retry = matches!(&result, Err(e) if transient(e));
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
    if retry {
        return true;
    }
    context
        .metrics
        .work_queue
        .get_or_create(&OutcomeLabels {
            outcome: code.to_owned(),
        })
        .inc();
    if let Err(err) = message.ack_with(AckKind::Ack).await {
        tracing::warn!(
            seq,
            error = &*err,
            "cannot acknowledge a command; it will be redelivered"
        );
    }
    false
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
