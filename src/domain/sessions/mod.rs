//! `sessions`: test sessions on pooled machines (seed 001, orch).
//!
//! A **session** is a set of components (one driver, any servers and clients), each to run on
//! a machine of a named pool. The **scheduler** is one entity that holds the pools, the queue and
//! what each running session holds: it admits a session only when every machine it needs is
//! free at once (gang reservation), first fit over the queue, and the oldest waiting session
//! holds what it needs against later ones, so a stream of small sessions cannot starve a large
//! one. The session's executor (a reaction, `crate::sessions`) provisions, runs and cleans up
//! an admitted session through a backend; [`plan`] is what it does next, decided from the
//! session's events and what the backend observes, never from why it woke up.

pub mod plan;
pub mod scheduler;
pub mod session;
pub mod spec;

use crate::{entity_id, text_id};

pub use plan::{Observed, Step};
pub use scheduler::{Scheduler, SchedulerCommand, SchedulerEvent};
pub use session::{Session, SessionCommand, SessionEvent, SessionView, Status};
pub use spec::{ComponentKind, ComponentSpec, ReadinessCheck, SessionSpec};

entity_id!(
    /// Names a session: any printable text.
    SessionId,
    "session id"
);

entity_id!(
    /// Names the scheduler entity; there is one, [`SCHEDULER`].
    SchedulerId,
    "scheduler id"
);

/// The id of the one scheduler.
pub const SCHEDULER: &str = "sessions";

impl SchedulerId {
    /// The one scheduler's id.
    pub fn sessions() -> Self {
        Self(SCHEDULER.to_owned())
    }
}

/// The longest component or pool name: a DNS label, so it fits a Kubernetes name.
pub const MAX_NAME: usize = 63;

text_id!(
    /// Names a component within its session: a DNS label.
    ComponentName,
    "component name",
    MAX_NAME,
    dns_label
);

text_id!(
    /// Names a pool of machines: a DNS label.
    PoolName,
    "pool name",
    MAX_NAME,
    dns_label
);

text_id!(
    /// Names one machine of a pool: any printable text.
    MachineName,
    "machine name",
    253
);
