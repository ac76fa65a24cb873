//! One test session: what it runs, where it stands, and everything that happened to it.
//!
//! Status: QUEUED (scheduled, waiting for its machines) → ACCEPTED (the scheduler admitted it)
//! → PROVISIONING (its first component is being started) → RUNNING (every component runs and is
//! ready) → DONE, ERROR or INTERNAL_ERROR (`finished`, with a reason). Then its logs are stored
//! and its processes cleaned up, whatever the outcome (`cleaned_up`).
//!
//! The executor records the intent to start a component (`component_starting`) before it asks
//! the backend, and the outcome (`component_started`) after, so a crash in between is resolved
//! by looking at what the backend has, never by assuming.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::scheduler::Wait;
use super::spec::{ComponentKind, ComponentSpec, Problem, SessionSpec};
use super::{ComponentName, MachineName, PoolName, SessionId};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

/// The longest log tail kept on an event.
pub const MAX_TAIL: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Queued,
    Accepted,
    Provisioning,
    Running,
    Done,
    Error,
    InternalError,
}

impl Status {
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Done | Status::Error | Status::InternalError)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "QUEUED",
            Status::Accepted => "ACCEPTED",
            Status::Provisioning => "PROVISIONING",
            Status::Running => "RUNNING",
            Status::Done => "DONE",
            Status::Error => "ERROR",
            Status::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// How a component is doing, as its backend sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not observed yet.
    #[default]
    Unknown,
    Ready,
    /// Running, but its readiness check does not pass (yet).
    NotReady,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise, was killed, vanished, or could not start.
    Failed,
}

impl Health {
    pub fn is_terminal(self) -> bool {
        matches!(self, Health::Succeeded | Health::Failed)
    }
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Done,
    Error,
    InternalError,
}

impl Outcome {
    pub fn status(self) -> Status {
        match self {
            Outcome::Done => Status::Done,
            Outcome::Error => Status::Error,
            Outcome::InternalError => Status::InternalError,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Session {
    #[default]
    Absent,
    Present(Box<Record>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub spec: SessionSpec,
    pub timeout: Duration,
    pub status: Status,
    /// Why it ended as it did (or, for DONE, what the driver said).
    pub reason: Option<String>,
    pub queued_at: Timestamp,
    pub accepted_at: Option<Timestamp>,
    pub provisioning_at: Option<Timestamp>,
    pub running_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub cleaned_up_at: Option<Timestamp>,
    pub cancel_requested: Option<Timestamp>,
    /// The machine each component got.
    pub placement: BTreeMap<ComponentName, Placed>,
    pub components: BTreeMap<ComponentName, Component>,
    pub logs: BTreeMap<ComponentName, StoredLog>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Placed {
    pub pool: PoolName,
    pub machine: MachineName,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// The executor asked the backend to start it (the intent).
    pub starting_at: Option<Timestamp>,
    pub started: Option<Started>,
    pub health: Health,
    pub detail: Option<String>,
    pub health_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Started {
    /// Where other components reach it, `host:port`.
    pub address: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StoredLog {
    /// The object in the log bucket.
    pub object: String,
    pub bytes: u64,
    /// Its last lines, at most 4 KiB.
    pub tail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionCommand {
    /// A new session (with the timeout the control plane settled).
    Schedule {
        spec: SessionSpec,
        timeout: Duration,
    },
    /// Stop it: at once if it waits, through cleanup if it runs; nothing if it has ended.
    Cancel,
    /// The scheduler admitted it on these machines.
    Accept {
        placement: BTreeMap<ComponentName, Placed>,
    },
    /// About to ask the backend to start `component`.
    StartComponent {
        component: ComponentName,
    },
    /// The backend has `component` running (or had it: an adopted one) at `address`.
    ComponentStarted {
        component: ComponentName,
        address: String,
    },
    Health {
        component: ComponentName,
        health: Health,
        detail: Option<String>,
    },
    /// Every component runs and is ready.
    Run,
    Finish {
        outcome: Outcome,
        reason: Option<String>,
    },
    LogStored {
        component: ComponentName,
        log: StoredLog,
    },
    CleanedUp,
}

event_set! {
    pub enum SessionEvent {
        Queued(Queued) = "session.queued" @ 1,
        Accepted(Accepted) = "session.accepted" @ 1,
        CancelRequested(CancelRequested) = "session.cancel_requested" @ 1,
        ComponentStarting(ComponentStarting) = "session.component_starting" @ 1,
        ComponentStarted(ComponentStarted) = "session.component_started" @ 1,
        ComponentHealth(ComponentHealth) = "session.component_health" @ 1,
        Running(Running) = "session.running" @ 1,
        Finished(Finished) = "session.finished" @ 1,
        LogStored(LogStoredEvent) = "session.log_stored" @ 1,
        CleanedUp(CleanedUp) = "session.cleaned_up" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Queued {
    pub components: Vec<ComponentSpec>,
    pub timeout_ms: u64,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlacedComponent {
    pub component: ComponentName,
    pub pool: PoolName,
    pub machine: MachineName,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Accepted {
    pub placement: Vec<PlacedComponent>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelRequested {
    pub at: Timestamp,
}

/// The intent: the executor is about to ask the backend to start it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentStarting {
    pub component: ComponentName,
    pub at: Timestamp,
}

/// The outcome: the backend runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentStarted {
    pub component: ComponentName,
    pub address: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentHealth {
    pub component: ComponentName,
    pub health: Health,
    pub detail: Option<String>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Running {
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Finished {
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogStoredEvent {
    pub component: ComponentName,
    pub log: StoredLog,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CleanedUp {
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session {session:?} does not exist")]
    NotFound { session: String },
    #[error("session {session:?} exists already")]
    AlreadyExists { session: String },
    #[error("the session is invalid: {}", super::spec::describe(.problems))]
    Invalid { problems: Vec<Problem> },
    #[error("the timeout must be 1 ms to {} s", super::spec::MAX_TIMEOUT.as_secs())]
    Timeout,
    #[error("session {session:?} has no component {component:?}")]
    NoComponent { session: String, component: String },
    #[error("session {session:?} is {status}: {what} is too late")]
    TooLate {
        session: String,
        status: &'static str,
        what: &'static str,
    },
    #[error("session {session:?} is {status}: it cannot be {what} yet")]
    TooEarly {
        session: String,
        status: &'static str,
        what: &'static str,
    },
    #[error("the placement does not give every component of session {session:?} one machine")]
    Placement { session: String },
}

impl Rejection for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::NotFound { .. } | SessionError::NoComponent { .. } => ErrorKind::NotFound,
            SessionError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            SessionError::Invalid { .. }
            | SessionError::Timeout
            | SessionError::Placement { .. } => ErrorKind::Invalid,
            SessionError::TooLate { .. } | SessionError::TooEarly { .. } => ErrorKind::Conflict,
        }
    }
}

/// One component as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentView {
    pub name: ComponentName,
    pub kind: ComponentKind,
    pub pool: PoolName,
    pub machine: Option<MachineName>,
    pub address: Option<String>,
    pub health: Health,
    pub detail: Option<String>,
    pub started_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionView {
    pub id: SessionId,
    pub status: Status,
    pub reason: Option<String>,
    /// Where it waits and why, while QUEUED (filled in from the scheduler by `session.get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Wait>,
    pub components: Vec<ComponentView>,
    pub timeout_ms: u64,
    pub queued_at: Timestamp,
    pub accepted_at: Option<Timestamp>,
    pub provisioning_at: Option<Timestamp>,
    pub running_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub cleaned_up_at: Option<Timestamp>,
    /// From admission to the end, once finished.
    pub elapsed_ms: Option<u64>,
    pub cancel_requested: bool,
    pub logs: BTreeMap<ComponentName, StoredLog>,
}

/// The reply to every session command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionReply {
    pub status: Status,
}

impl Record {
    /// When it must have finished by: its timeout counts from admission.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.accepted_at.map(|at| at.saturating_add(self.timeout))
    }

    pub fn component(&self, name: &ComponentName) -> Component {
        self.components.get(name).cloned().unwrap_or_default()
    }

    /// The addresses of the servers and clients that have started, in start order: what the
    /// driver gets.
    pub fn worker_addresses(&self) -> Vec<String> {
        self.spec
            .start_order()
            .into_iter()
            .filter(|c| c.kind != ComponentKind::Driver)
            .filter_map(|c| {
                self.components
                    .get(&c.name)
                    .and_then(|s| s.started.as_ref())
                    .map(|s| s.address.clone())
            })
            .collect()
    }

    fn too_late(&self, id: &SessionId, what: &'static str) -> SessionError {
        SessionError::TooLate {
            session: id.to_string(),
            status: self.status.as_str(),
            what,
        }
    }
}

fn component_of<'a>(
    record: &'a Record,
    id: &SessionId,
    component: &ComponentName,
) -> Result<&'a ComponentSpec, SessionError> {
    record
        .spec
        .component(component)
        .ok_or_else(|| SessionError::NoComponent {
            session: id.to_string(),
            component: component.to_string(),
        })
}

/// Keeps the last `MAX_TAIL` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str) -> String {
    if text.len() <= MAX_TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

impl Aggregate for Session {
    const KIND: &'static str = "session";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = SessionId;
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Reply = SessionReply;
    type View = SessionView;
    type Error = SessionError;

    fn decide(
        &self,
        id: &SessionId,
        command: &SessionCommand,
        cx: &Context,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        let at = cx.now;
        let record = match (self, command) {
            (Session::Absent, SessionCommand::Schedule { spec, timeout }) => {
                let problems = spec.problems(&[]);
                if !problems.is_empty() {
                    return Err(SessionError::Invalid { problems });
                }
                if timeout.is_zero() || *timeout > super::spec::MAX_TIMEOUT {
                    return Err(SessionError::Timeout);
                }
                return Ok(vec![SessionEvent::Queued(Queued {
                    components: spec.components.clone(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    at,
                })]);
            }
            (Session::Present(_), SessionCommand::Schedule { .. }) => {
                return Err(SessionError::AlreadyExists {
                    session: id.to_string(),
                });
            }
            (Session::Absent, _) => {
                return Err(SessionError::NotFound {
                    session: id.to_string(),
                });
            }
            (Session::Present(record), _) => record,
        };
        let finished = record.status.is_finished();
        match command {
            SessionCommand::Schedule { .. } => Ok(vec![]),
            SessionCommand::Cancel => {
                if finished || record.cancel_requested.is_some() {
                    return Ok(vec![]);
                }
                let mut events = vec![SessionEvent::CancelRequested(CancelRequested { at })];
                // Waiting, nothing of it runs: it ends now.
                if record.status == Status::Queued {
                    events.push(SessionEvent::Finished(Finished {
                        outcome: Outcome::Error,
                        reason: Some("cancelled while queued".to_owned()),
                        at,
                    }));
                }
                Ok(events)
            }
            SessionCommand::Accept { placement } => {
                if record.status != Status::Queued {
                    // Already accepted (a retry), or ended while it waited: nothing to do.
                    return Ok(vec![]);
                }
                let complete = placement.len() == record.spec.components.len()
                    && record
                        .spec
                        .components
                        .iter()
                        .all(|c| placement.get(&c.name).is_some_and(|p| p.pool == c.pool));
                if !complete {
                    return Err(SessionError::Placement {
                        session: id.to_string(),
                    });
                }
                Ok(vec![SessionEvent::Accepted(Accepted {
                    placement: placement
                        .iter()
                        .map(|(component, placed)| PlacedComponent {
                            component: component.clone(),
                            pool: placed.pool.clone(),
                            machine: placed.machine.clone(),
                        })
                        .collect(),
                    at,
                })])
            }
            SessionCommand::StartComponent { component } => {
                component_of(record, id, component)?;
                if finished {
                    return Err(record.too_late(id, "starting a component"));
                }
                if record.status == Status::Queued {
                    return Err(SessionError::TooEarly {
                        session: id.to_string(),
                        status: record.status.as_str(),
                        what: "provisioned",
                    });
                }
                if record.component(component).starting_at.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![SessionEvent::ComponentStarting(ComponentStarting {
                    component: component.clone(),
                    at,
                })])
            }
            SessionCommand::ComponentStarted { component, address } => {
                component_of(record, id, component)?;
                let current = record.component(component);
                if current.started.is_some() {
                    return Ok(vec![]);
                }
                if current.starting_at.is_none() {
                    return Err(SessionError::TooEarly {
                        session: id.to_string(),
                        status: record.status.as_str(),
                        what: "recorded as started before its start was",
                    });
                }
                Ok(vec![SessionEvent::ComponentStarted(ComponentStarted {
                    component: component.clone(),
                    address: address.clone(),
                    at,
                })])
            }
            SessionCommand::Health {
                component,
                health,
                detail,
            } => {
                component_of(record, id, component)?;
                let current = record.component(component);
                // A terminal health is final: a later observation never hides it.
                if current.health.is_terminal()
                    || (current.health == *health && &current.detail == detail)
                {
                    return Ok(vec![]);
                }
                Ok(vec![SessionEvent::ComponentHealth(ComponentHealth {
                    component: component.clone(),
                    health: *health,
                    detail: detail.clone(),
                    at,
                })])
            }
            SessionCommand::Run => {
                if record.status != Status::Provisioning {
                    return Ok(vec![]);
                }
                Ok(vec![SessionEvent::Running(Running { at })])
            }
            SessionCommand::Finish { outcome, reason } => {
                if finished {
                    // The first outcome stands.
                    return Ok(vec![]);
                }
                Ok(vec![SessionEvent::Finished(Finished {
                    outcome: *outcome,
                    reason: reason.clone(),
                    at,
                })])
            }
            SessionCommand::LogStored { component, log } => {
                component_of(record, id, component)?;
                if !finished {
                    return Err(SessionError::TooEarly {
                        session: id.to_string(),
                        status: record.status.as_str(),
                        what: "have its logs stored",
                    });
                }
                if record.logs.contains_key(component) {
                    return Ok(vec![]);
                }
                let log = StoredLog {
                    tail: tail(&log.tail),
                    ..log.clone()
                };
                Ok(vec![SessionEvent::LogStored(LogStoredEvent {
                    component: component.clone(),
                    log,
                    at,
                })])
            }
            SessionCommand::CleanedUp => {
                if !finished {
                    return Err(SessionError::TooEarly {
                        session: id.to_string(),
                        status: record.status.as_str(),
                        what: "cleaned up",
                    });
                }
                if record.cleaned_up_at.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![SessionEvent::CleanedUp(CleanedUp { at })])
            }
        }
    }

    fn apply(&mut self, event: &SessionEvent) {
        if let SessionEvent::Queued(e) = event {
            *self = Session::Present(Box::new(Record {
                spec: SessionSpec {
                    components: e.components.clone(),
                },
                timeout: Duration::from_millis(e.timeout_ms),
                status: Status::Queued,
                reason: None,
                queued_at: e.at,
                accepted_at: None,
                provisioning_at: None,
                running_at: None,
                finished_at: None,
                cleaned_up_at: None,
                cancel_requested: None,
                placement: BTreeMap::new(),
                components: BTreeMap::new(),
                logs: BTreeMap::new(),
            }));
            return;
        }
        let Session::Present(record) = self else {
            return;
        };
        match event {
            SessionEvent::Queued(_) => {}
            SessionEvent::Accepted(e) => {
                record.status = Status::Accepted;
                record.accepted_at = Some(e.at);
                record.placement = e
                    .placement
                    .iter()
                    .map(|p| {
                        (
                            p.component.clone(),
                            Placed {
                                pool: p.pool.clone(),
                                machine: p.machine.clone(),
                            },
                        )
                    })
                    .collect();
            }
            SessionEvent::CancelRequested(e) => record.cancel_requested = Some(e.at),
            SessionEvent::ComponentStarting(e) => {
                if record.status == Status::Accepted {
                    record.status = Status::Provisioning;
                    record.provisioning_at = Some(e.at);
                }
                record
                    .components
                    .entry(e.component.clone())
                    .or_default()
                    .starting_at = Some(e.at);
            }
            SessionEvent::ComponentStarted(e) => {
                record
                    .components
                    .entry(e.component.clone())
                    .or_default()
                    .started = Some(Started {
                    address: e.address.clone(),
                    at: e.at,
                });
            }
            SessionEvent::ComponentHealth(e) => {
                let component = record.components.entry(e.component.clone()).or_default();
                component.health = e.health;
                component.detail = e.detail.clone();
                component.health_at = Some(e.at);
            }
            SessionEvent::Running(e) => {
                record.status = Status::Running;
                record.running_at = Some(e.at);
            }
            SessionEvent::Finished(e) => {
                record.status = e.outcome.status();
                record.reason = e.reason.clone();
                record.finished_at = Some(e.at);
            }
            SessionEvent::LogStored(e) => {
                record.logs.insert(e.component.clone(), e.log.clone());
            }
            SessionEvent::CleanedUp(e) => record.cleaned_up_at = Some(e.at),
        }
    }

    fn reply(&self, _: &SessionId, _: &SessionCommand) -> SessionReply {
        SessionReply {
            status: match self {
                Session::Present(record) => record.status,
                Session::Absent => Status::Queued,
            },
        }
    }

    fn view(&self, id: &SessionId) -> Option<SessionView> {
        let Session::Present(record) = self else {
            return None;
        };
        let components = record
            .spec
            .components
            .iter()
            .map(|spec| {
                let state = record.component(&spec.name);
                ComponentView {
                    name: spec.name.clone(),
                    kind: spec.kind,
                    pool: spec.pool.clone(),
                    machine: record.placement.get(&spec.name).map(|p| p.machine.clone()),
                    address: state.started.as_ref().map(|s| s.address.clone()),
                    health: state.health,
                    detail: state.detail.clone(),
                    started_at: state.started.as_ref().map(|s| s.at),
                }
            })
            .collect();
        Some(SessionView {
            id: id.clone(),
            status: record.status,
            reason: record.reason.clone(),
            waiting: None,
            components,
            timeout_ms: u64::try_from(record.timeout.as_millis()).unwrap_or(u64::MAX),
            queued_at: record.queued_at,
            accepted_at: record.accepted_at,
            provisioning_at: record.provisioning_at,
            running_at: record.running_at,
            finished_at: record.finished_at,
            cleaned_up_at: record.cleaned_up_at,
            elapsed_ms: record
                .finished_at
                .zip(record.accepted_at.or(Some(record.queued_at)))
                .map(|(end, start)| u64::try_from(end.since(start).as_millis()).unwrap_or(0)),
            cancel_requested: record.cancel_requested.is_some(),
            logs: record.logs.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SessionSpec {
        let component = |name: &str, kind| ComponentSpec {
            name: ComponentName::new(name).unwrap(),
            kind,
            pool: PoolName::new("local").unwrap(),
            command: "true".into(),
            args: vec![],
            env: BTreeMap::new(),
            image: None,
            readiness: None,
            keep_log: false,
        };
        SessionSpec {
            components: vec![
                component("s", ComponentKind::Server),
                component("d", ComponentKind::Driver),
            ],
        }
    }

    fn id() -> SessionId {
        SessionId::new("t").unwrap()
    }

    fn name(n: &str) -> ComponentName {
        ComponentName::new(n).unwrap()
    }

    /// Runs commands in order and returns the state; panics on a refusal.
    fn after(commands: &[SessionCommand]) -> Session {
        let mut session = Session::default();
        for (t, command) in commands.iter().enumerate() {
            let cx = Context {
                now: Timestamp::from_unix_nanos(t as i64),
            };
            for event in session.decide(&id(), command, &cx).unwrap() {
                session.apply(&event);
            }
        }
        session
    }

    fn schedule() -> SessionCommand {
        SessionCommand::Schedule {
            spec: spec(),
            timeout: Duration::from_secs(60),
        }
    }

    fn accept() -> SessionCommand {
        let placed = |m: &str| Placed {
            pool: PoolName::new("local").unwrap(),
            machine: MachineName::new(m).unwrap(),
        };
        SessionCommand::Accept {
            placement: [(name("s"), placed("m0")), (name("d"), placed("m1"))].into(),
        }
    }

    fn status(session: &Session) -> Status {
        session.view(&id()).unwrap().status
    }

    #[test]
    fn a_session_goes_from_queued_to_done_and_cleaned_up() {
        let session = after(&[
            schedule(),
            accept(),
            SessionCommand::StartComponent {
                component: name("s"),
            },
            SessionCommand::ComponentStarted {
                component: name("s"),
                address: "127.0.0.1:1".into(),
            },
            SessionCommand::Run,
            SessionCommand::Finish {
                outcome: Outcome::Done,
                reason: None,
            },
            SessionCommand::CleanedUp,
        ]);
        let view = session.view(&id()).unwrap();
        assert_eq!(view.status, Status::Done);
        assert!(view.provisioning_at.is_some() && view.running_at.is_some());
        assert!(view.cleaned_up_at.is_some());
        assert_eq!(view.components[0].address.as_deref(), Some("127.0.0.1:1"));
    }

    #[test]
    fn a_queued_session_cancelled_ends_at_once_and_a_second_cancel_changes_nothing() {
        let session = after(&[schedule(), SessionCommand::Cancel]);
        assert_eq!(status(&session), Status::Error);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        assert!(
            session
                .decide(&id(), &SessionCommand::Cancel, &cx)
                .unwrap()
                .is_empty()
        );
        assert!(
            session.decide(&id(), &accept(), &cx).unwrap().is_empty(),
            "admitted after it was cancelled: nothing to accept"
        );
    }

    #[test]
    fn the_first_outcome_stands_and_terminal_health_is_final() {
        let session = after(&[
            schedule(),
            accept(),
            SessionCommand::StartComponent {
                component: name("d"),
            },
            SessionCommand::Health {
                component: name("d"),
                health: Health::Failed,
                detail: Some("exit code 1".into()),
            },
            SessionCommand::Finish {
                outcome: Outcome::Error,
                reason: Some("d failed".into()),
            },
        ]);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let later = SessionCommand::Finish {
            outcome: Outcome::Done,
            reason: None,
        };
        assert!(session.decide(&id(), &later, &cx).unwrap().is_empty());
        let healthier = SessionCommand::Health {
            component: name("d"),
            health: Health::Ready,
            detail: None,
        };
        assert!(session.decide(&id(), &healthier, &cx).unwrap().is_empty());
        assert_eq!(status(&session), Status::Error);
    }

    #[test]
    fn out_of_order_steps_are_refused_with_a_kind() {
        let queued = after(&[schedule()]);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let start = SessionCommand::StartComponent {
            component: name("s"),
        };
        assert_eq!(
            queued.decide(&id(), &start, &cx).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            queued
                .decide(&id(), &SessionCommand::CleanedUp, &cx)
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        let unknown = SessionCommand::StartComponent {
            component: name("nope"),
        };
        assert_eq!(
            after(&[schedule(), accept()])
                .decide(&id(), &unknown, &cx)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            queued.decide(&id(), &schedule(), &cx).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            Session::default()
                .decide(&id(), &SessionCommand::Cancel, &cx)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn a_started_component_needs_its_intent_first() {
        let accepted = after(&[schedule(), accept()]);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let started = SessionCommand::ComponentStarted {
            component: name("s"),
            address: "x:1".into(),
        };
        assert!(accepted.decide(&id(), &started, &cx).is_err());
    }

    #[test]
    fn tails_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_TAIL);
        let cut = tail(&long);
        assert!(cut.len() <= MAX_TAIL);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
