//! The actor runtime on actix: one actor per entity, activated on demand by a registry and
//! passivated when idle; projections that rebuild read models from the stream; reapers.
//!
//! **Architecture invariant:** an entity actor handles one command whole (decide, append, apply
//! after the ack, reply) before the next; actors hold no logic beyond that sequence.

pub mod entity;
pub mod feed;
pub mod indexer;
pub mod projection;
pub mod reaction;
pub mod reaper;
pub mod registry;
pub mod remote;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{CommandId, ErrorKind, Principal, Rejection, Timestamp};
use crate::store::StoreError;

pub use entity::EntityActor;
pub use projection::{EntityTable, Projection, ProjectionActor, ProjectionHandle, Readiness};
pub use reaper::Reaper;
pub use registry::{Entities, Registry};

/// Stops an actor: projections and reapers on shutdown.
pub struct Stop;

impl actix::Message for Stop {
    type Result = ();
}

/// The reason on `conflict` when an entity kept changing under a command: unlike a definite
/// conflict (a reused command id), retrying it may well succeed.
pub const CONTENDED: &str = "contended";

/// A fresh, time-ordered command id, for callers that did not supply one.
pub fn new_command_id() -> CommandId {
    uuid_command_id(uuid::Uuid::now_v7())
}

/// A command id derived deterministically from what a command reacts to (UUID v5), so every
/// instance that reacts to the same thing issues the same command.
pub fn derived_command_id(name: &str) -> CommandId {
    uuid_command_id(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        name.as_bytes(),
    ))
}

fn uuid_command_id(id: uuid::Uuid) -> CommandId {
    CommandId::new(id.to_string()).expect("a UUID is a valid command id")
}

/// Where the runtime reads the time; tests substitute a manual clock.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    #[allow(clippy::disallowed_methods)] // the one place the runtime reads the wall clock
    Arc::new(|| Timestamp::from_offset_date_time(time::OffsetDateTime::now_utc()))
}

/// How entity actors behave; from `RuntimeConfig` and `StoreConfig`.
#[derive(Clone)]
pub struct Settings {
    /// Which shards this replica serves; every command and read is routed by it.
    pub ownership: crate::cluster::Ownership,
    pub mailbox_capacity: usize,
    pub passivate_after: Duration,
    pub conflict_retries: u32,
    pub snapshot_every: u64,
    pub clock: Clock,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("ownership", &self.ownership)
            .field("mailbox_capacity", &self.mailbox_capacity)
            .field("passivate_after", &self.passivate_after)
            .field("conflict_retries", &self.conflict_retries)
            .field("snapshot_every", &self.snapshot_every)
            .finish_non_exhaustive()
    }
}

/// Who sent a command and how to recognise its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMeta {
    pub command_id: CommandId,
    pub principal: Principal,
    /// What the command said (route and body), for telling a retry from a reused id; `None`
    /// for the control plane's own commands.
    pub digest: Option<String>,
    /// The id was generated for this command just now, so no earlier attempt can have used
    /// it: the long-horizon retry check is skipped.
    pub fresh: bool,
}

impl CommandMeta {
    /// A command with an id that may have been used before: a caller's, or a derived one.
    pub fn new(command_id: CommandId, principal: Principal) -> Self {
        Self {
            command_id,
            principal,
            digest: None,
            fresh: false,
        }
    }

    /// A command with a new id, which no earlier attempt can have used.
    pub fn fresh(principal: Principal) -> Self {
        Self {
            command_id: new_command_id(),
            principal,
            digest: None,
            fresh: true,
        }
    }
}

/// A command's result: the aggregate's reply, and where the entity stands after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<R> {
    pub reply: R,
    /// The entity version after the command.
    pub version: u64,
    /// Stream sequence of the command's message (or of the entity's last one, if it changed
    /// nothing).
    pub seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{message}")]
    Rejected {
        kind: ErrorKind,
        message: String,
        reason: Option<&'static str>,
    },
    #[error("{kind} {id:?} has {queued} requests queued; retry later")]
    Busy {
        kind: &'static str,
        id: String,
        queued: usize,
    },
    #[error("{kind} {id:?} kept changing under the command; gave up after {attempts} attempts")]
    Contended {
        kind: &'static str,
        id: String,
        attempts: u32,
    },
    #[error("the actor for {kind} {id:?} stopped before answering")]
    Dropped { kind: &'static str, id: String },
    #[error("the event store failed")]
    Store(#[from] StoreError),
    #[error(
        "{kind} {id:?} is in shard {shard}, which no replica owns right now (a fail-over is under way); retry with the same command id"
    )]
    NoOwner {
        kind: &'static str,
        id: String,
        shard: u32,
    },
    #[error(
        "the shard of {kind} {id:?} moved to another replica while the request was on its way; retry with the same command id"
    )]
    NotOwner { kind: &'static str, id: String },
    /// The owning replica answered with this error.
    #[error("{message}")]
    Remote {
        kind: ErrorKind,
        message: String,
        reason: Option<&'static str>,
        definite: bool,
    },
    /// The owning replica could not be asked, or did not answer.
    #[error("cannot reach replica {replica}, which owns {kind} {id:?}: {reason}")]
    Unreachable {
        kind: &'static str,
        id: String,
        replica: String,
        reason: String,
        /// Nobody received the request (no responders), so nothing was done.
        definite: bool,
    },
}

impl CommandError {
    pub fn rejected(rejection: &impl Rejection) -> Self {
        CommandError::Rejected {
            kind: rejection.kind(),
            message: rejection.to_string(),
            reason: rejection.reason(),
        }
    }

    /// Whether this attempt certainly stored nothing: the command was refused, or never got
    /// as far as a write that might have landed. Only then may a caller undo the steps before
    /// it. Anything else (a lost acknowledgement, a broken connection, an actor gone) may
    /// have been stored, and only reading the log again can tell.
    pub fn is_definite(&self) -> bool {
        match self {
            CommandError::Rejected { .. }
            | CommandError::Busy { .. }
            | CommandError::Contended { .. } => true,
            CommandError::Store(err) => matches!(
                err,
                StoreError::Conflict { .. }
                    | StoreError::TooLarge { .. }
                    | StoreError::Encode { .. }
                    | StoreError::Newer { .. }
            ),
            CommandError::NoOwner { .. } | CommandError::NotOwner { .. } => true,
            CommandError::Remote { definite, .. } | CommandError::Unreachable { definite, .. } => {
                *definite
            }
            CommandError::Dropped { .. } => false,
        }
    }

    /// What narrows the kind for programs, if anything.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            CommandError::Rejected { reason, .. } => *reason,
            CommandError::Contended { .. } => Some(CONTENDED),
            CommandError::Store(StoreError::Newer { .. }) => {
                Some(crate::store::NEWER_EVENT_VERSION)
            }
            CommandError::NoOwner { .. } => Some(crate::cluster::NO_SHARD_OWNER),
            CommandError::NotOwner { .. } => Some(crate::cluster::SHARD_MOVED),
            CommandError::Remote { reason, .. } => *reason,
            _ => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Rejected { kind, .. } => *kind,
            CommandError::Busy { .. }
            | CommandError::Dropped { .. }
            | CommandError::NoOwner { .. }
            | CommandError::NotOwner { .. }
            | CommandError::Unreachable { .. } => ErrorKind::Unavailable,
            CommandError::Remote { kind, .. } => *kind,
            CommandError::Contended { .. } => ErrorKind::Conflict,
            CommandError::Store(err) => err.kind(),
        }
    }
}

pub use crate::error_chain::error_chain;
