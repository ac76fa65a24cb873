//! The pure core: commands, events, state, and the `decide`/`apply` contract.
//!
//! **Architecture invariant:** nothing in `domain` does I/O. No tokio, actix, NATS, kube or russh
//! here (checked by `tests/it/architecture.rs`); time comes in as an argument.

pub mod cloud;
pub mod counter;
pub mod event;
pub mod ids;
pub mod lessons;
pub mod sessions;
pub mod switchboard;
pub mod time;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use event::{DomainEvent, EventType};
pub use ids::{CommandId, EntityId, IdError, Principal};
pub use time::Timestamp;

/// The kinds of failure a caller can act on; the API's error codes, one for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or breaks a rule; retrying it unchanged will fail again.
    Invalid,
    /// The entity or route does not exist.
    NotFound,
    /// The entity exists already and the command would create it.
    AlreadyExists,
    /// The entity changed under the command; it can be retried.
    Conflict,
    /// A limit would be exceeded.
    Capacity,
    /// A dependency (NATS, a backend) is down or overloaded; retry with the same command id.
    Unavailable,
    /// A bug or corrupt data; the command may or may not have been applied.
    Internal,
    /// The caller may not do this; nothing was written.
    Forbidden,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Invalid,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Conflict,
        ErrorKind::Capacity,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
        ErrorKind::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Capacity => "capacity",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
            ErrorKind::Forbidden => "forbidden",
        }
    }

    /// The HTTP-like status the NATS micro protocol carries in `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => 409,
            ErrorKind::Capacity => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
            ErrorKind::Forbidden => 403,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command refused by the domain. Each aggregate has its own error enum implementing this.
pub trait Rejection: std::error::Error + Send + Sync + 'static {
    fn kind(&self) -> ErrorKind;

    /// Narrows the kind for programs, as a `snake_case` word (the API's `error.reason`).
    fn reason(&self) -> Option<&'static str> {
        None
    }
}

/// The reason on `conflict` when a command id is used again for a different command.
pub const COMMAND_ID_REUSED: &str = "command_id_reused";

/// What `decide` is given besides state and command: inputs the domain may not fetch itself.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub now: Timestamp,
}

/// One kind of entity: its state is a fold of its events.
///
/// The state derives serde only for snapshots, which are disposable: change the state's shape
/// and bump `SNAPSHOT_VERSION`, and old snapshots are ignored in favour of a full replay.
pub trait Aggregate:
    Default
    + Clone
    + PartialEq
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Unpin
    + 'static
{
    /// The entity kind, a subject token: `[a-z][a-z0-9_]*`.
    const KIND: &'static str;
    const SNAPSHOT_VERSION: u16;

    type Id: EntityId;
    /// Serializable so a replica can hand a command to the replica owning its entity.
    type Command: std::fmt::Debug + Clone + Send + Sync + Serialize + DeserializeOwned + 'static;
    type Event: DomainEvent;
    type Reply: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
    type View: Serialize + DeserializeOwned + JsonSchema + Clone + Send + 'static;
    type Error: Rejection;

    /// The events a command produces, or why it is refused. An empty list changes nothing.
    fn decide(
        &self,
        id: &Self::Id,
        command: &Self::Command,
        cx: &Context,
    ) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state. Total: an event that was stored is a fact.
    fn apply(&mut self, event: &Self::Event);

    /// The reply to `command`, computed from the state right after its events were applied.
    /// A retried command gets this same reply, rebuilt from the log.
    fn reply(&self, id: &Self::Id, command: &Self::Command) -> Self::Reply;

    /// What a reader sees of this entity, or `None` while it does not exist.
    fn view(&self, id: &Self::Id) -> Option<Self::View>;

    /// The command a reaper must send now, if any. Level-triggered: it reads only this state
    /// and the time, never why the reaper woke up.
    fn due(&self, _id: &Self::Id, _now: Timestamp) -> Option<Self::Command> {
        None
    }
}

/// A command as callers send it: one JSON body that names its target entity.
pub trait CommandRequest: DeserializeOwned + JsonSchema + Send + 'static {
    type Aggregate: Aggregate;
    /// The API verb: `<prefix>.api.<kind>.<verb>`.
    const VERB: &'static str;

    fn into_command(
        self,
    ) -> (
        <Self::Aggregate as Aggregate>::Id,
        <Self::Aggregate as Aggregate>::Command,
    );
}

/// Folds events into a fresh state; the reference every snapshot and cache must agree with.
pub fn replay<'a, A: Aggregate>(events: impl IntoIterator<Item = &'a A::Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(event);
    }
    state
}
