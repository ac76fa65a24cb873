//! One live lesson: a lesson of the catalog, provisioned for one live session.
//!
//! Status: INITIALIZED (requested) → BOOTING (the scheduler recorded that it provisions it) →
//! CONFIGURATION (every endpoint answers; the stage's scripts run) → READY. ERROR, with the
//! step, the reason and the output that explains it, can follow any of them. A stage change of
//! a READY lesson goes back to CONFIGURATION for the new stage only. A kill (or garbage
//! collection) is recorded first (`kill_requested`), then the scheduler deletes what the backend
//! has and records `deleted`.
//!
//! The lesson's definition is recorded on `requested`, with the digest of the catalog it came
//! from: a later catalog changes nothing of a live lesson, and the audit shows its origin.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::catalog::Lesson;
use super::{EndpointName, LiveLessonId, LiveSessionId};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

/// The most output kept on an event (the end of it).
pub const MAX_OUTPUT: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Initialized,
    Booting,
    Configuration,
    Ready,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Initialized => "INITIALIZED",
            Status::Booting => "BOOTING",
            Status::Configuration => "CONFIGURATION",
            Status::Ready => "READY",
            Status::Error => "ERROR",
        }
    }
}

/// Why a lesson is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KillReason {
    /// A caller asked.
    Killed,
    /// Inactive past its TTL (garbage collection).
    Expired,
    /// Its live session ended.
    SessionEnded,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LiveLesson {
    #[default]
    Absent,
    Present(Box<Record>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub session: LiveSessionId,
    pub lesson: Lesson,
    /// The digest of the catalog it was created from.
    pub catalog: String,
    /// The stage asked for.
    pub stage: u32,
    pub status: Status,
    pub requested_at: Timestamp,
    pub last_active: Timestamp,
    pub booting_at: Option<Timestamp>,
    /// Where each started endpoint is reached: its ports, by the port the lesson names.
    pub endpoints: BTreeMap<EndpointName, BTreeMap<u16, String>>,
    pub healthy: u32,
    pub total: u32,
    /// The stage being configured, since when, and what each endpoint's script said.
    pub configuring: Option<Configuring>,
    pub ready_at: Option<Timestamp>,
    pub error: Option<Failure>,
    pub kill: Option<Kill>,
    pub deleted_at: Option<Timestamp>,
    /// When each status was entered last, for timings.
    pub timeline: Vec<Moment>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Configuring {
    pub stage: u32,
    pub at: Timestamp,
    pub done: BTreeMap<EndpointName, Configured>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Configured {
    pub output: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Failure {
    /// The step that failed: `provision`, `reachability`, `configure`, ...
    pub step: String,
    pub reason: String,
    /// What explains it: a script's output, an endpoint's log.
    pub output: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Kill {
    pub reason: KillReason,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Moment {
    pub status: Status,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LiveLessonCommand {
    /// Create it, or (if it exists) keep it alive, or change its stage.
    Request {
        session: LiveSessionId,
        lesson: Box<Lesson>,
        catalog: String,
        stage: u32,
    },
    /// Keep-alive: resets its inactivity clock.
    Touch,
    Kill {
        reason: KillReason,
    },
    /// The scheduler is about to provision it.
    Provision,
    EndpointStarted {
        endpoint: EndpointName,
        addresses: BTreeMap<u16, String>,
    },
    Reachability {
        healthy: u32,
        total: u32,
    },
    /// Every endpoint answers: configure the stage asked for.
    Configure,
    EndpointConfigured {
        stage: u32,
        endpoint: EndpointName,
        output: String,
    },
    Ready {
        stage: u32,
    },
    Fail {
        step: String,
        reason: String,
        output: String,
    },
    /// The backend has nothing of it any more.
    Deleted,
}

event_set! {
    pub enum LiveLessonEvent {
        Requested(Requested) = "livelesson.requested" @ 1,
        Touched(Touched) = "livelesson.touched" @ 1,
        StageRequested(StageRequested) = "livelesson.stage_requested" @ 1,
        KillRequested(KillRequested) = "livelesson.kill_requested" @ 1,
        Booting(Booting) = "livelesson.booting" @ 1,
        EndpointStarted(EndpointStarted) = "livelesson.endpoint_started" @ 1,
        Reachability(Reachability) = "livelesson.reachability" @ 1,
        Configuring(ConfiguringEvent) = "livelesson.configuring" @ 1,
        EndpointConfigured(EndpointConfigured) = "livelesson.endpoint_configured" @ 1,
        Ready(Ready) = "livelesson.ready" @ 1,
        Failed(Failed) = "livelesson.failed" @ 1,
        Deleted(Deleted) = "livelesson.deleted" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Requested {
    pub session: LiveSessionId,
    pub lesson: Lesson,
    pub catalog: String,
    pub stage: u32,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Touched {
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageRequested {
    pub stage: u32,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillRequested {
    pub reason: KillReason,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Booting {
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EndpointStarted {
    pub endpoint: EndpointName,
    /// `host:port` by the port the lesson names.
    pub addresses: BTreeMap<u16, String>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reachability {
    pub healthy: u32,
    pub total: u32,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfiguringEvent {
    pub stage: u32,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EndpointConfigured {
    pub stage: u32,
    pub endpoint: EndpointName,
    pub output: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Ready {
    pub stage: u32,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Failed {
    pub step: String,
    pub reason: String,
    pub output: String,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveLessonError {
    #[error("live lesson {lesson:?} does not exist")]
    NotFound { lesson: String },
    #[error("lesson {lesson:?} has no stage {stage}")]
    NoStage { lesson: String, stage: u32 },
    #[error("live lesson {lesson:?} is {status}: wait until it is READY to change its stage")]
    Busy {
        lesson: String,
        status: &'static str,
    },
    #[error("live lesson {lesson:?} failed; kill it and request it again")]
    Failed { lesson: String },
    #[error("live lesson {lesson:?} is being deleted")]
    Deleting { lesson: String },
    #[error("live lesson {lesson:?} belongs to another session or lesson")]
    Mismatch { lesson: String },
    #[error("live lesson {lesson:?} is {status}: {what} does not apply")]
    OutOfOrder {
        lesson: String,
        status: &'static str,
        what: &'static str,
    },
}

impl Rejection for LiveLessonError {
    fn kind(&self) -> ErrorKind {
        match self {
            LiveLessonError::NotFound { .. } => ErrorKind::NotFound,
            LiveLessonError::NoStage { .. } | LiveLessonError::Mismatch { .. } => {
                ErrorKind::Invalid
            }
            LiveLessonError::Busy { .. }
            | LiveLessonError::Failed { .. }
            | LiveLessonError::Deleting { .. }
            | LiveLessonError::OutOfOrder { .. } => ErrorKind::Conflict,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            LiveLessonError::Busy { .. } => Some("busy"),
            LiveLessonError::Failed { .. } => Some("failed"),
            LiveLessonError::Deleting { .. } => Some("deleting"),
            _ => None,
        }
    }
}

/// One endpoint as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EndpointView {
    pub name: EndpointName,
    /// `host:port` by the port the lesson names.
    pub addresses: BTreeMap<u16, String>,
    /// How learners reach it: per presentation, its kind and address.
    pub presentations: Vec<PresentationView>,
    /// The output of its script for the stage being (or last) configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured: Option<Configured>,
    /// The command that opens a shell on it, for people (filled in by `livelesson.get` from
    /// the backend, while it has an ssh presentation with an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PresentationView {
    pub name: EndpointName,
    #[serde(rename = "type")]
    pub kind: super::catalog::PresentationKind,
    pub port: u16,
    pub address: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LiveLessonView {
    pub id: LiveLessonId,
    pub session: LiveSessionId,
    pub lesson: super::LessonSlug,
    pub lesson_name: String,
    pub catalog: String,
    pub stage: u32,
    pub stages: u32,
    /// The guide of the stage asked for (markdown).
    pub guide: String,
    pub status: Status,
    pub healthy: u32,
    pub total: u32,
    pub endpoints: Vec<EndpointView>,
    pub error: Option<Failure>,
    pub requested_at: Timestamp,
    pub last_active: Timestamp,
    pub ready_at: Option<Timestamp>,
    pub kill: Option<Kill>,
    pub deleted_at: Option<Timestamp>,
    pub timeline: Vec<Moment>,
}

/// The reply to every live-lesson command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LiveLessonReply {
    pub status: Status,
    pub stage: u32,
    pub deleting: bool,
}

/// Keeps the last `MAX_OUTPUT` bytes of `text`, cut at a character boundary.
pub fn output_tail(text: &str) -> String {
    if text.len() <= MAX_OUTPUT {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_OUTPUT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[...]\n{}", &text[start..])
}

impl Record {
    /// Nothing more happens to it: deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// Every endpoint has its addresses.
    pub fn all_started(&self) -> bool {
        self.lesson
            .endpoints
            .iter()
            .all(|e| self.endpoints.contains_key(&e.name))
    }

    /// When garbage collection may delete it (unless its session is persistent).
    pub fn idle_since(&self) -> Timestamp {
        self.last_active
    }

    fn out_of_order(&self, id: &LiveLessonId, what: &'static str) -> LiveLessonError {
        LiveLessonError::OutOfOrder {
            lesson: id.to_string(),
            status: self.status.as_str(),
            what,
        }
    }
}

impl Aggregate for LiveLesson {
    const KIND: &'static str = "livelesson";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = LiveLessonId;
    type Command = LiveLessonCommand;
    type Event = LiveLessonEvent;
    type Reply = LiveLessonReply;
    type View = LiveLessonView;
    type Error = LiveLessonError;

    fn decide(
        &self,
        id: &LiveLessonId,
        command: &LiveLessonCommand,
        cx: &Context,
    ) -> Result<Vec<LiveLessonEvent>, LiveLessonError> {
        let at = cx.now;
        let lesson_id = || id.to_string();
        let record = match (self, command) {
            (
                LiveLesson::Absent,
                LiveLessonCommand::Request {
                    session,
                    lesson,
                    catalog,
                    stage,
                },
            ) => {
                if lesson.stage(*stage).is_none() {
                    return Err(LiveLessonError::NoStage {
                        lesson: lesson.slug.to_string(),
                        stage: *stage,
                    });
                }
                return Ok(vec![LiveLessonEvent::Requested(Requested {
                    session: session.clone(),
                    lesson: (**lesson).clone(),
                    catalog: catalog.clone(),
                    stage: *stage,
                    at,
                })]);
            }
            (LiveLesson::Absent, _) => {
                return Err(LiveLessonError::NotFound {
                    lesson: lesson_id(),
                });
            }
            (LiveLesson::Present(record), _) => record,
        };
        let gone = record.kill.is_some() || record.is_deleted();
        match command {
            LiveLessonCommand::Request {
                session,
                lesson,
                stage,
                ..
            } => {
                if &record.session != session || record.lesson.slug != lesson.slug {
                    return Err(LiveLessonError::Mismatch {
                        lesson: lesson_id(),
                    });
                }
                if gone {
                    return Err(LiveLessonError::Deleting {
                        lesson: lesson_id(),
                    });
                }
                if record.lesson.stage(*stage).is_none() {
                    return Err(LiveLessonError::NoStage {
                        lesson: record.lesson.slug.to_string(),
                        stage: *stage,
                    });
                }
                if record.status == Status::Error {
                    return Err(LiveLessonError::Failed {
                        lesson: lesson_id(),
                    });
                }
                if *stage == record.stage {
                    return Ok(vec![LiveLessonEvent::Touched(Touched { at })]);
                }
                if record.status != Status::Ready {
                    return Err(LiveLessonError::Busy {
                        lesson: lesson_id(),
                        status: record.status.as_str(),
                    });
                }
                Ok(vec![LiveLessonEvent::StageRequested(StageRequested {
                    stage: *stage,
                    at,
                })])
            }
            LiveLessonCommand::Touch => {
                if gone {
                    return Err(LiveLessonError::Deleting {
                        lesson: lesson_id(),
                    });
                }
                Ok(vec![LiveLessonEvent::Touched(Touched { at })])
            }
            LiveLessonCommand::Kill { reason } => {
                if gone {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::KillRequested(KillRequested {
                    reason: *reason,
                    at,
                })])
            }
            // The scheduler's steps. Once deleted, or past the status a step belongs to, a
            // step is refused: the scheduler plans again from what is recorded.
            _ if record.is_deleted() => Err(record.out_of_order(id, "a step")),
            LiveLessonCommand::Deleted => {
                if record.kill.is_none() {
                    return Err(record.out_of_order(id, "deleted (not killed)"));
                }
                Ok(vec![LiveLessonEvent::Deleted(Deleted { at })])
            }
            LiveLessonCommand::Fail {
                step,
                reason,
                output,
            } => {
                if record.status == Status::Error {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::Failed(Failed {
                    step: step.clone(),
                    reason: reason.clone(),
                    output: output_tail(output),
                    at,
                })])
            }
            _ if gone || record.status == Status::Error => {
                Err(record.out_of_order(id, "a provisioning step"))
            }
            LiveLessonCommand::Provision => {
                if record.status != Status::Initialized {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::Booting(Booting { at })])
            }
            LiveLessonCommand::EndpointStarted {
                endpoint,
                addresses,
            } => {
                if record.status != Status::Booting || record.lesson.endpoint(endpoint).is_none() {
                    return Err(record.out_of_order(id, "an endpoint started"));
                }
                if record.endpoints.get(endpoint) == Some(addresses) {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::EndpointStarted(EndpointStarted {
                    endpoint: endpoint.clone(),
                    addresses: addresses.clone(),
                    at,
                })])
            }
            LiveLessonCommand::Reachability { healthy, total } => {
                if record.status != Status::Booting {
                    return Err(record.out_of_order(id, "reachability"));
                }
                if (record.healthy, record.total) == (*healthy, *total) {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::Reachability(Reachability {
                    healthy: *healthy,
                    total: *total,
                    at,
                })])
            }
            LiveLessonCommand::Configure => {
                if record.status != Status::Booting || !record.all_started() {
                    return Err(record.out_of_order(id, "configuration"));
                }
                Ok(vec![LiveLessonEvent::Configuring(ConfiguringEvent {
                    stage: record.stage,
                    at,
                })])
            }
            LiveLessonCommand::EndpointConfigured {
                stage,
                endpoint,
                output,
            } => {
                let Some(configuring) = &record.configuring else {
                    return Err(record.out_of_order(id, "an endpoint configured"));
                };
                if record.status != Status::Configuration || configuring.stage != *stage {
                    return Err(record.out_of_order(id, "an endpoint configured"));
                }
                if configuring.done.contains_key(endpoint) {
                    return Ok(vec![]);
                }
                Ok(vec![LiveLessonEvent::EndpointConfigured(
                    EndpointConfigured {
                        stage: *stage,
                        endpoint: endpoint.clone(),
                        output: output_tail(output),
                        at,
                    },
                )])
            }
            LiveLessonCommand::Ready { stage } => {
                if record.status == Status::Ready && record.stage == *stage {
                    return Ok(vec![]);
                }
                let configured = record.configuring.as_ref().is_some_and(|c| {
                    c.stage == *stage
                        && record
                            .lesson
                            .stage(*stage)
                            .is_some_and(|s| s.configs.keys().all(|e| c.done.contains_key(e)))
                });
                if record.status != Status::Configuration || !configured {
                    return Err(record.out_of_order(id, "ready"));
                }
                Ok(vec![LiveLessonEvent::Ready(Ready { stage: *stage, at })])
            }
        }
    }

    fn apply(&mut self, event: &LiveLessonEvent) {
        if let LiveLessonEvent::Requested(e) = event {
            *self = LiveLesson::Present(Box::new(Record {
                session: e.session.clone(),
                lesson: e.lesson.clone(),
                catalog: e.catalog.clone(),
                stage: e.stage,
                status: Status::Initialized,
                requested_at: e.at,
                last_active: e.at,
                booting_at: None,
                endpoints: BTreeMap::new(),
                healthy: 0,
                total: 0,
                configuring: None,
                ready_at: None,
                error: None,
                kill: None,
                deleted_at: None,
                timeline: vec![Moment {
                    status: Status::Initialized,
                    at: e.at,
                }],
            }));
            return;
        }
        let LiveLesson::Present(record) = self else {
            return;
        };
        let enter = |record: &mut Record, status: Status, at: Timestamp| {
            record.status = status;
            record.timeline.push(Moment { status, at });
        };
        match event {
            LiveLessonEvent::Requested(_) => {}
            LiveLessonEvent::Touched(e) => record.last_active = e.at,
            LiveLessonEvent::StageRequested(e) => {
                record.stage = e.stage;
                record.last_active = e.at;
                record.ready_at = None;
                record.configuring = Some(Configuring {
                    stage: e.stage,
                    at: e.at,
                    done: BTreeMap::new(),
                });
                enter(record, Status::Configuration, e.at);
            }
            LiveLessonEvent::KillRequested(e) => {
                record.kill = Some(Kill {
                    reason: e.reason,
                    at: e.at,
                });
            }
            LiveLessonEvent::Booting(e) => {
                record.booting_at = Some(e.at);
                enter(record, Status::Booting, e.at);
            }
            LiveLessonEvent::EndpointStarted(e) => {
                record
                    .endpoints
                    .insert(e.endpoint.clone(), e.addresses.clone());
            }
            LiveLessonEvent::Reachability(e) => {
                record.healthy = e.healthy;
                record.total = e.total;
            }
            LiveLessonEvent::Configuring(e) => {
                record.configuring = Some(Configuring {
                    stage: e.stage,
                    at: e.at,
                    done: BTreeMap::new(),
                });
                enter(record, Status::Configuration, e.at);
            }
            LiveLessonEvent::EndpointConfigured(e) => {
                if let Some(configuring) = &mut record.configuring {
                    configuring.done.insert(
                        e.endpoint.clone(),
                        Configured {
                            output: e.output.clone(),
                            at: e.at,
                        },
                    );
                }
            }
            LiveLessonEvent::Ready(e) => {
                record.ready_at = Some(e.at);
                enter(record, Status::Ready, e.at);
            }
            LiveLessonEvent::Failed(e) => {
                record.error = Some(Failure {
                    step: e.step.clone(),
                    reason: e.reason.clone(),
                    output: e.output.clone(),
                    at: e.at,
                });
                enter(record, Status::Error, e.at);
            }
            LiveLessonEvent::Deleted(e) => record.deleted_at = Some(e.at),
        }
    }

    fn reply(&self, _: &LiveLessonId, _: &LiveLessonCommand) -> LiveLessonReply {
        match self {
            LiveLesson::Present(record) => LiveLessonReply {
                status: record.status,
                stage: record.stage,
                deleting: record.kill.is_some(),
            },
            LiveLesson::Absent => LiveLessonReply {
                status: Status::Initialized,
                stage: 0,
                deleting: false,
            },
        }
    }

    fn view(&self, id: &LiveLessonId) -> Option<LiveLessonView> {
        let LiveLesson::Present(record) = self else {
            return None;
        };
        let endpoints = record
            .lesson
            .endpoints
            .iter()
            .map(|e| {
                let addresses = record.endpoints.get(&e.name).cloned().unwrap_or_default();
                EndpointView {
                    name: e.name.clone(),
                    presentations: e
                        .presentations
                        .iter()
                        .map(|p| PresentationView {
                            name: p.name.clone(),
                            kind: p.kind,
                            port: p.port,
                            address: addresses.get(&p.port).cloned(),
                        })
                        .collect(),
                    addresses,
                    configured: record
                        .configuring
                        .as_ref()
                        .and_then(|c| c.done.get(&e.name).cloned()),
                    ssh: None,
                }
            })
            .collect();
        Some(LiveLessonView {
            id: id.clone(),
            session: record.session.clone(),
            lesson: record.lesson.slug.clone(),
            lesson_name: record.lesson.name.clone(),
            catalog: record.catalog.clone(),
            stage: record.stage,
            stages: u32::try_from(record.lesson.stages.len()).unwrap_or(u32::MAX),
            guide: record
                .lesson
                .stage(record.stage)
                .map(|s| s.guide.clone())
                .unwrap_or_default(),
            status: record.status,
            healthy: record.healthy,
            total: record.total,
            endpoints,
            error: record.error.clone(),
            requested_at: record.requested_at,
            last_active: record.last_active,
            ready_at: record.ready_at,
            kill: record.kill.clone(),
            deleted_at: record.deleted_at,
            timeline: record.timeline.clone(),
        })
    }
}

/// How long a stage's configuration may take before it fails; and the ready delay.
pub fn ready_delay(record: &Record) -> Duration {
    Duration::from_millis(record.lesson.ready_delay_ms)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::catalog::{tests::sample, validate};
    use super::*;

    fn cx() -> Context {
        Context {
            now: Timestamp::from_unix_nanos(1_000_000_000),
        }
    }

    pub fn lesson() -> Lesson {
        validate(&[sample()]).unwrap().remove(0)
    }

    fn run(state: &mut LiveLesson, command: LiveLessonCommand) -> Result<(), LiveLessonError> {
        let id = LiveLessonId::new("abc-ssh-basics-1").unwrap();
        for event in state.decide(&id, &command, &cx())? {
            state.apply(&event);
        }
        Ok(())
    }

    fn request(stage: u32) -> LiveLessonCommand {
        LiveLessonCommand::Request {
            session: LiveSessionId::new("abc").unwrap(),
            lesson: Box::new(lesson()),
            catalog: "d1".into(),
            stage,
        }
    }

    fn status(state: &LiveLesson) -> Status {
        match state {
            LiveLesson::Present(r) => r.status,
            LiveLesson::Absent => panic!("absent"),
        }
    }

    fn name(n: &str) -> EndpointName {
        EndpointName::new(n).unwrap()
    }

    fn to_ready(state: &mut LiveLesson) {
        run(state, request(1)).unwrap();
        run(state, LiveLessonCommand::Provision).unwrap();
        assert!(run(state, LiveLessonCommand::Configure).is_err());
        for e in ["alpha", "beta"] {
            let addresses = BTreeMap::from([(22, "127.0.0.1:2222".to_owned())]);
            run(
                state,
                LiveLessonCommand::EndpointStarted {
                    endpoint: name(e),
                    addresses,
                },
            )
            .unwrap();
        }
        run(state, LiveLessonCommand::Configure).unwrap();
        assert_eq!(status(state), Status::Configuration);
        assert!(run(state, LiveLessonCommand::Ready { stage: 1 }).is_err());
        for e in ["alpha", "beta"] {
            run(
                state,
                LiveLessonCommand::EndpointConfigured {
                    stage: 1,
                    endpoint: name(e),
                    output: "ok".into(),
                },
            )
            .unwrap();
        }
        run(state, LiveLessonCommand::Ready { stage: 1 }).unwrap();
        assert_eq!(status(state), Status::Ready);
    }

    #[test]
    fn a_lesson_goes_to_ready_then_changes_stage() {
        let mut state = LiveLesson::default();
        to_ready(&mut state);
        // The same stage again is a keep-alive; another one reconfigures.
        run(&mut state, request(1)).unwrap();
        assert_eq!(status(&state), Status::Ready);
        run(&mut state, request(2)).unwrap();
        assert_eq!(status(&state), Status::Configuration);
        let err = run(&mut state, request(1)).unwrap_err();
        assert_eq!(err.reason(), Some("busy"));
        assert_eq!(
            run(&mut state, request(3)).unwrap_err().kind(),
            ErrorKind::Invalid
        );
    }

    #[test]
    fn a_failure_keeps_its_output_and_a_kill_deletes_once() {
        let mut state = LiveLesson::default();
        run(&mut state, request(1)).unwrap();
        run(&mut state, LiveLessonCommand::Provision).unwrap();
        run(
            &mut state,
            LiveLessonCommand::Fail {
                step: "configure".into(),
                reason: "exit 1".into(),
                output: "x".repeat(MAX_OUTPUT * 2),
            },
        )
        .unwrap();
        assert_eq!(status(&state), Status::Error);
        assert_eq!(
            run(&mut state, request(1)).unwrap_err().reason(),
            Some("failed")
        );
        assert!(run(&mut state, LiveLessonCommand::Deleted).is_err());
        run(
            &mut state,
            LiveLessonCommand::Kill {
                reason: KillReason::Killed,
            },
        )
        .unwrap();
        run(
            &mut state,
            LiveLessonCommand::Kill {
                reason: KillReason::Killed,
            },
        )
        .unwrap();
        run(&mut state, LiveLessonCommand::Deleted).unwrap();
        let LiveLesson::Present(record) = &state else {
            panic!()
        };
        assert!(record.error.as_ref().unwrap().output.len() < MAX_OUTPUT + 16);
        assert!(record.is_deleted());
        assert_eq!(
            run(&mut state, request(1)).unwrap_err().reason(),
            Some("deleting")
        );
    }
}
