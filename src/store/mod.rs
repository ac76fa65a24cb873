//! The event store on JetStream.
//!
//! **Architecture invariant:** this is the only module that publishes to JetStream.
//!
//! One stream (`<P>_EVENTS`) holds every event; each entity has its own subject, which is its
//! consistency boundary. One command is one message holding all its events, appended with
//! `Nats-Expected-Last-Subject-Sequence` (optimistic concurrency) and a `Nats-Msg-Id` derived
//! from the command id (idempotent retries). Snapshots live in a KV bucket (`<P>_SNAPSHOTS`).

pub mod entity;
pub mod index;
pub mod provenance;
pub mod snapshot;

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use time::OffsetDateTime;
use tracing::Span;

use crate::codec::{self, CodecError, Encoding, header};
use crate::config::StoreConfig;
use crate::domain::{CommandId, DomainEvent, ErrorKind, EventType, Principal, Timestamp};
use crate::subject::{SubjectError, Subjects};
use crate::telemetry;

pub use entity::Entity;
pub use snapshot::SnapshotStore;

/// How many messages one Direct Get batch request asks for.
const READ_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{subject} has moved past sequence {expected}")]
    Conflict { subject: String, expected: u64 },
    #[error("the commit for {subject} exceeds the server's maximum message size")]
    TooLarge { subject: String },
    #[error(
        "JetStream did not acknowledge the commit for {subject} in time; it may or may not be stored"
    )]
    Unacknowledged { subject: String },
    #[error("publishing to {subject} failed")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("reading {subject} from {stream} failed: {reason}")]
    Read {
        stream: String,
        subject: String,
        reason: String,
    },
    #[error("message {seq} on {subject} does not decode")]
    Decode {
        seq: u64,
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error("message {seq} on {subject} was written by a newer Switchyard")]
    Newer {
        seq: u64,
        subject: String,
        #[source]
        event: provenance::NewerEvent,
    },
    #[error("message {seq} on {subject} says entity version {found}, expected {expected}")]
    VersionGap {
        seq: u64,
        subject: String,
        expected: u64,
        found: u64,
    },
    #[error("cannot encode the commit for {subject}")]
    Encode {
        subject: String,
        #[source]
        source: CodecError,
    },
    #[error("cannot set up {what} {name}")]
    Setup {
        what: &'static str,
        name: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("invalid subject configuration")]
    Subject(#[from] SubjectError),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Conflict { .. } => ErrorKind::Conflict,
            StoreError::TooLarge { .. } => ErrorKind::Invalid,
            StoreError::Unacknowledged { .. }
            | StoreError::Newer { .. }
            | StoreError::Publish { .. }
            | StoreError::Read { .. }
            | StoreError::Setup { .. } => ErrorKind::Unavailable,
            StoreError::Decode { .. }
            | StoreError::VersionGap { .. }
            | StoreError::Encode { .. }
            | StoreError::Subject(_) => ErrorKind::Internal,
        }
    }
}

/// The reason on `unavailable` when an entity's history holds an event of a newer Switchyard.
pub const NEWER_EVENT_VERSION: &str = "newer_event_version";

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What the stream must hold before a commit: the sequence of the subject's last message, or
/// nothing at all (`0`, "must be first").
pub type ExpectedSequence = u64;

/// One command's events, ready to append.
#[derive(Debug)]
pub struct Commit<'a, E> {
    pub kind: &'static str,
    pub entity: &'a str,
    pub expected: ExpectedSequence,
    /// The entity's version after these events.
    pub entity_version: u64,
    pub command_id: &'a CommandId,
    pub principal: &'a Principal,
    /// What the command said (`CommandMeta::digest`), recorded so a reused id is told apart
    /// from a retry.
    pub digest: Option<&'a str>,
    /// The command id was generated for it (`CommandMeta::fresh`).
    pub generated_id: bool,
    pub recorded_at: Timestamp,
    pub events: &'a [E],
    /// The shard lease it is written under; `None` for writers outside the runtime (benches).
    pub fence: Option<crate::cluster::Fence<'a>>,
}

/// One store record, ready to append.
#[derive(Debug)]
pub struct RecordCommit<'a> {
    pub kind: &'static str,
    pub entity: &'a str,
    pub expected: ExpectedSequence,
    /// The entity's version, unchanged by a record.
    pub entity_version: u64,
    pub command_id: &'a CommandId,
    pub principal: &'a Principal,
    pub recorded_at: Timestamp,
    pub record: &'a provenance::Record,
    pub fence: Option<crate::cluster::Fence<'a>>,
}

/// The acknowledgement of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The server had this `Nats-Msg-Id` already: the command was stored by an earlier attempt,
    /// at `seq`, and nothing new was written.
    pub duplicate: bool,
}

/// Where [`EventStore::follow`] starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At this stream sequence (0 or 1: the beginning).
    Sequence(u64),
    /// At the first message stored at or after this time.
    Time(Timestamp),
}

/// One message read back from the event stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it.
    pub stored_at: Timestamp,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl StoredMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    pub fn encoding(&self) -> Result<Encoding, CodecError> {
        Encoding::from_content_type(self.header(header::CONTENT_TYPE))
    }

    pub fn command_id(&self) -> Option<&str> {
        self.header(header::COMMAND_ID)
    }

    pub fn principal(&self) -> Option<&str> {
        self.header(header::PRINCIPAL)
    }

    pub fn entity_version(&self) -> Option<u64> {
        self.header(header::ENTITY_VERSION)?.parse().ok()
    }

    pub fn recorded_at(&self) -> Option<Timestamp> {
        Timestamp::parse_rfc3339(self.header(header::RECORDED_AT)?).ok()
    }

    /// The events in this message, decoded and upcast.
    pub fn decode<E: DomainEvent>(&self) -> Result<Vec<E>> {
        self.encoding()
            .and_then(|encoding| codec::decode_events(&self.payload, encoding))
            .map_err(|source| self.decode_error(source))
    }

    pub fn decode_error(&self, source: CodecError) -> StoreError {
        StoreError::Decode {
            seq: self.seq,
            subject: self.subject.clone(),
            source,
        }
    }
}

/// A handle on the event store; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventStore {
    // Cloned once per command: one reference count, not a dozen strings.
    inner: std::sync::Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    stream: String,
    config: StoreConfig,
    snapshots: SnapshotStore,
    index: index::CommandIndex,
    timeout: Duration,
}

impl EventStore {
    /// Connects to the event stream and its buckets, creating or updating them to match
    /// `config`.
    pub async fn open(client: Client, config: &StoreConfig, timeout: Duration) -> Result<Self> {
        Self::connect(client, config, timeout, true).await
    }

    /// Connects to an event store that exists, creating and changing nothing: for readers
    /// (`switchyard audit`) whose NATS permissions allow only reading.
    pub async fn attach(client: Client, config: &StoreConfig, timeout: Duration) -> Result<Self> {
        Self::connect(client, config, timeout, false).await
    }

    async fn connect(
        client: Client,
        config: &StoreConfig,
        timeout: Duration,
        set_up: bool,
    ) -> Result<Self> {
        let subjects = Subjects::new(&config.subject_prefix)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let stream = config.events_stream();
        let found = if set_up {
            js.create_or_update_stream(events_stream_config(config, &subjects))
                .await
                .map(|_| ())
                .map_err(async_nats::Error::from)
        } else {
            js.get_stream(&stream)
                .await
                .map(|_| ())
                .map_err(async_nats::Error::from)
        };
        found.map_err(|source| StoreError::Setup {
            what: "stream",
            name: stream.clone(),
            source,
        })?;
        let (snapshots, index) = if set_up {
            (
                SnapshotStore::open(&js, config).await?,
                index::CommandIndex::open(&js, config).await?,
            )
        } else {
            (
                SnapshotStore::attach(&js, config).await?,
                index::CommandIndex::attach(&js, config).await?,
            )
        };
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                client,
                js,
                subjects,
                stream,
                config: config.clone(),
                snapshots,
                index,
                timeout,
            }),
        })
    }

    pub fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    pub fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn snapshots(&self) -> &SnapshotStore {
        &self.inner.snapshots
    }

    /// Where each entity's commands of the idempotency window were stored.
    pub fn command_index(&self) -> &index::CommandIndex {
        &self.inner.index
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// Appends one command's events as one message, if the entity's subject is still at
    /// `commit.expected`.
    pub async fn append<E: DomainEvent>(&self, commit: Commit<'_, E>) -> Result<Appended> {
        let subject = self.inner.subjects.event(commit.kind, commit.entity);
        let payload =
            codec::encode_events(commit.events, self.inner.config.encoding).map_err(|source| {
                StoreError::Encode {
                    subject: subject.clone(),
                    source,
                }
            })?;
        let headers = commit_headers(&commit, self.inner.config.encoding);
        self.publish(
            subject,
            payload,
            headers,
            commit.command_id,
            commit.expected,
            commit.kind,
        )
        .await
    }

    /// Appends one of the store's own records (an acknowledgement) to an entity's subject,
    /// with the same optimistic concurrency and idempotency as a commit. It holds no events:
    /// the entity version stays where it is.
    pub async fn append_record(&self, commit: RecordCommit<'_>) -> Result<Appended> {
        let subject = self.inner.subjects.event(commit.kind, commit.entity);
        let (payload, content_type) = provenance::encode_record(commit.record);
        let mut headers = HeaderMap::new();
        headers.insert(provenance::RECORD, commit.record.name());
        headers.insert(
            header::ENTITY_VERSION,
            commit.entity_version.to_string().as_str(),
        );
        headers.insert(header::COMMAND_ID, commit.command_id.as_str());
        headers.insert(header::PRINCIPAL, commit.principal.as_str());
        headers.insert(header::RECORDED_AT, commit.recorded_at.to_string().as_str());
        headers.insert(header::CONTENT_TYPE, content_type);
        fence_headers(commit.fence, &mut headers);
        telemetry::inject(&Span::current(), &mut headers);
        self.publish(
            subject,
            payload,
            headers,
            commit.command_id,
            commit.expected,
            commit.kind,
        )
        .await
    }

    /// The one JetStream publish in Switchyard (see clippy.toml): `payload` on `subject` if
    /// the subject is still at `expected`, deduplicated by the command's message id.
    async fn publish(
        &self,
        subject: String,
        payload: Bytes,
        headers: HeaderMap,
        command_id: &CommandId,
        expected: ExpectedSequence,
        kind: &str,
    ) -> Result<Appended> {
        let message = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(message_id(command_id, &subject))
            .expected_last_subject_sequence(expected);
        let publish_error = |source: jetstream::context::PublishError| {
            use jetstream::context::PublishErrorKind as Kind;
            match source.kind() {
                Kind::WrongLastSequence => StoreError::Conflict {
                    subject: subject.clone(),
                    expected,
                },
                Kind::MaxPayloadExceeded => StoreError::TooLarge {
                    subject: subject.clone(),
                },
                Kind::TimedOut => StoreError::Unacknowledged {
                    subject: subject.clone(),
                },
                _ => StoreError::Publish {
                    subject: subject.clone(),
                    source,
                },
            }
        };
        #[allow(clippy::disallowed_methods)]
        let ack = self
            .inner
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(publish_error)?;
        let ack = ack.await.map_err(publish_error)?;
        if crate::failpoint::armed("append.lose_ack", kind) {
            return Err(StoreError::Unacknowledged { subject });
        }
        Ok(Appended {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// The messages on one subject from `from` up to `until` (inclusive), in order.
    ///
    /// Uses batched Direct Get (server 2.11+): no consumer is created per read.
    pub async fn read_subject(
        &self,
        subject: &str,
        from: u64,
        until: Option<u64>,
    ) -> Result<Vec<StoredMessage>> {
        let mut out = Vec::new();
        let mut next = from.max(1);
        loop {
            let (batch, more) = self.direct_batch(subject, next).await?;
            let Some(last) = batch.last().map(|m| m.seq) else {
                break;
            };
            for message in batch {
                if until.is_some_and(|u| message.seq > u) {
                    return Ok(out);
                }
                out.push(message);
            }
            if !more || until.is_some_and(|u| last >= u) {
                break;
            }
            next = last + 1;
        }
        Ok(out)
    }

    /// One Direct Get batch: up to [`READ_BATCH`] messages on `subject` from `seq`, and whether
    /// more remain.
    async fn direct_batch(&self, subject: &str, seq: u64) -> Result<(Vec<StoredMessage>, bool)> {
        let read_error = |reason: String| StoreError::Read {
            stream: self.inner.stream.clone(),
            subject: subject.to_owned(),
            reason,
        };
        let inbox = self.inner.client.new_inbox();
        let mut replies = self
            .inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let request =
            serde_json::json!({ "seq": seq, "next_by_subj": subject, "batch": READ_BATCH });
        self.inner
            .client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.inner.stream),
                inbox,
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let mut out = Vec::new();
        loop {
            let reply = tokio::time::timeout(self.inner.timeout, replies.next())
                .await
                .map_err(|_| read_error("timed out".to_owned()))?
                .ok_or_else(|| read_error("subscription closed".to_owned()))?;
            match reply.status.map(|s| s.as_u16()) {
                None | Some(200) => {
                    let message = direct_message(reply).map_err(read_error)?;
                    out.push(message);
                }
                // End of batch: the server says how many matching messages remain.
                Some(204) => {
                    let pending = reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Num-Pending"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    return Ok((out, pending > 0));
                }
                Some(404) => return Ok((out, false)),
                Some(status) => {
                    return Err(read_error(format!(
                        "status {status}: {}",
                        reply.description.unwrap_or_default()
                    )));
                }
            }
        }
    }

    /// One message by sequence, from the stream leader (read-after-write).
    pub async fn message(&self, seq: u64) -> Result<StoredMessage> {
        let stream = self
            .inner
            .js
            .get_stream_no_info(&self.inner.stream)
            .await
            .map_err(|e| StoreError::Read {
                stream: self.inner.stream.clone(),
                subject: format!("#{seq}"),
                reason: e.to_string(),
            })?;
        let raw = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| StoreError::Read {
                stream: self.inner.stream.clone(),
                subject: format!("#{seq}"),
                reason: e.to_string(),
            })?;
        Ok(StoredMessage {
            seq: raw.sequence,
            subject: raw.subject.to_string(),
            stored_at: Timestamp::from_offset_date_time(raw.time),
            headers: raw.headers,
            payload: raw.payload,
        })
    }

    /// The messages on `subject` from `from` up to `until`, from the stream leader, one request
    /// each: for the few a lagging follower's Direct Get did not have yet.
    pub async fn read_subject_from_leader(
        &self,
        subject: &str,
        from: u64,
        until: u64,
    ) -> Result<Vec<StoredMessage>> {
        let read_error = |reason: String| StoreError::Read {
            stream: self.inner.stream.clone(),
            subject: subject.to_owned(),
            reason,
        };
        let stream = self
            .inner
            .js
            .get_stream_no_info(&self.inner.stream)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let mut out = Vec::new();
        let mut next = from;
        while next <= until {
            let raw = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject)
                .send()
                .await
                .map_err(|e| read_error(e.to_string()))?;
            if raw.sequence > until {
                break;
            }
            next = raw.sequence + 1;
            out.push(StoredMessage {
                seq: raw.sequence,
                subject: raw.subject.to_string(),
                stored_at: Timestamp::from_offset_date_time(raw.time),
                headers: raw.headers,
                payload: raw.payload,
            });
        }
        Ok(out)
    }

    /// The sequence of the last message in the stream (0 when empty).
    pub async fn last_sequence(&self) -> Result<u64> {
        let stream = self
            .inner
            .js
            .get_stream(&self.inner.stream)
            .await
            .map_err(|e| self.info_error(e.to_string()))?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// The sequence of the last message on `filter`, wildcards allowed (0 when there is none):
    /// where a read model of those subjects must be to have seen everything written so far.
    pub async fn last_sequence_of(&self, filter: &str) -> Result<u64> {
        let read_error = |reason: String| StoreError::Read {
            stream: self.inner.stream.clone(),
            subject: filter.to_owned(),
            reason,
        };
        let stream = self
            .inner
            .js
            .get_stream_no_info(&self.inner.stream)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(message) => Ok(message.sequence),
            Err(err)
                if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(0)
            }
            Err(err) => Err(read_error(err.to_string())),
        }
    }

    fn info_error(&self, reason: String) -> StoreError {
        StoreError::Read {
            stream: self.inner.stream.clone(),
            subject: ">".to_owned(),
            reason,
        }
    }

    /// Every message matching `filter` from `start` on, then new ones as they arrive.
    /// An ordered consumer: no server-side state to clean up, recreated on gaps.
    ///
    /// Returns the stream and how many matching messages were pending when it started.
    pub async fn follow(
        &self,
        filter: &str,
        start: Start,
    ) -> Result<(BoxStream<'static, Result<StoredMessage>>, u64)> {
        let read_error = |reason: String| StoreError::Read {
            stream: self.inner.stream.clone(),
            subject: filter.to_owned(),
            reason,
        };
        let stream = self
            .inner
            .js
            .get_stream_no_info(&self.inner.stream)
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let deliver_policy = match start {
            Start::Sequence(0 | 1) => consumer::DeliverPolicy::All,
            Start::Sequence(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            Start::Time(time) => consumer::DeliverPolicy::ByStartTime {
                start_time: time.to_offset_date_time(),
            },
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let stream_name = self.inner.stream.clone();
        let filter = filter.to_owned();
        let messages = messages
            .map(move |message| {
                let read_error = |reason: String| StoreError::Read {
                    stream: stream_name.clone(),
                    subject: filter.clone(),
                    reason,
                };
                let message = message.map_err(|e| read_error(e.to_string()))?;
                let info = message.info().map_err(|e| read_error(e.to_string()))?;
                let seq = info.stream_sequence;
                let stored_at = Timestamp::from_offset_date_time(info.published);
                let message = message.split().0;
                Ok(StoredMessage {
                    seq,
                    subject: message.subject.to_string(),
                    stored_at,
                    headers: message.headers.unwrap_or_default(),
                    payload: message.payload,
                })
            })
            .boxed();
        Ok((messages, pending))
    }
}

/// The stream that holds every event: immutable, deduplicating, never silently discarding.
fn events_stream_config(config: &StoreConfig, subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: config.events_stream(),
        description: Some(
            "Switchyard events: one message per command, one subject per entity".to_owned(),
        ),
        subjects: vec![subjects.all_events()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_messages: -1,
        max_messages_per_subject: -1,
        max_bytes: config.max_bytes.unwrap_or(-1),
        // With any limit, a full stream must refuse new events rather than drop old ones.
        discard: stream::DiscardPolicy::New,
        deny_delete: true,
        deny_purge: true,
        allow_rollup: false,
        allow_direct: true,
        duplicate_window: config.duplicate_window,
        num_replicas: config.replicas,
        ..Default::default()
    }
}

/// The `Nats-Msg-Id` of a commit: one per (command, entity), so a command id reused on another
/// entity is not mistaken for a retry.
pub fn message_id(command_id: &CommandId, subject: &str) -> String {
    let name = format!("{}\n{subject}", command_id.as_str());
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

fn commit_headers<E: DomainEvent>(commit: &Commit<'_, E>, encoding: Encoding) -> HeaderMap {
    let types: Vec<EventType> = commit.events.iter().map(DomainEvent::event_type).collect();
    let names = types.iter().map(|t| t.name).collect::<Vec<_>>().join(",");
    let versions = types
        .iter()
        .map(|t| t.version.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut headers = HeaderMap::new();
    headers.insert(header::EVENT_TYPE, names.as_str());
    headers.insert(header::SCHEMA_VERSION, versions.as_str());
    headers.insert(
        header::ENTITY_VERSION,
        commit.entity_version.to_string().as_str(),
    );
    headers.insert(header::COMMAND_ID, commit.command_id.as_str());
    headers.insert(header::PRINCIPAL, commit.principal.as_str());
    if let Some(digest) = commit.digest {
        headers.insert(header::COMMAND_DIGEST, digest);
    }
    if commit.generated_id {
        headers.insert(header::COMMAND_ID_GENERATED, "true");
    }
    headers.insert(header::RECORDED_AT, commit.recorded_at.to_string().as_str());
    headers.insert(header::CONTENT_TYPE, encoding.content_type());
    fence_headers(commit.fence, &mut headers);
    telemetry::inject(&Span::current(), &mut headers);
    headers
}

fn fence_headers(fence: Option<crate::cluster::Fence<'_>>, headers: &mut HeaderMap) {
    if let Some(fence) = fence {
        headers.insert(header::SHARD, fence.shard.to_string().as_str());
        headers.insert(header::FENCE, fence.token.to_string().as_str());
        headers.insert(header::REPLICA, fence.replica);
    }
}

/// A Direct Get reply: the stored message, with its stream coordinates in `Nats-*` headers.
fn direct_message(reply: async_nats::Message) -> Result<StoredMessage, String> {
    let headers = reply.headers.ok_or("direct get reply without headers")?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let seq = get("Nats-Sequence")
        .and_then(|s| s.parse().ok())
        .ok_or("direct get reply without Nats-Sequence")?;
    let subject = get("Nats-Subject").ok_or("direct get reply without Nats-Subject")?;
    let stored_at = get("Nats-Time-Stamp")
        .and_then(|t| {
            OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(Timestamp::from_offset_date_time)
        .unwrap_or(Timestamp::EPOCH);
    Ok(StoredMessage {
        seq,
        subject,
        stored_at,
        headers,
        payload: reply.payload,
    })
}
