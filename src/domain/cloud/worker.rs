//! One cloud instance's life as a worker (arvados's `readme_states.txt`), as pure rules: its
//! states, its idle behaviour, and when it is to be shut down.
//!
//! ```text
//! (listed) -> Unknown --boot and run probes pass--> Idle <--> Running
//! create   -> Booting --boot and run probes pass--> Idle
//! Idle    --idle timeout, probe timeout, drain--> Shutdown
//! Running --drain, once nothing runs on it------> Shutdown
//! Unknown/Booting --boot timeout----------------> Shutdown
//! Shutdown --gone from the driver's list--------> (removed)
//! ```
//!
//! Idle behaviour: `run` (work runs on it; shut down when idle too long), `hold` (never shut
//! down, nothing new starts on it), `drain` (nothing new starts; shut down as soon as idle).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkerId;
use crate::domain::sessions::PoolName;
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Listed by the driver, not created by this Switchyard run (or not yet probed).
    Unknown,
    /// Created, not yet answering its probes.
    Booting,
    /// Ready, nothing running on it.
    Idle,
    /// Something runs on it.
    Running,
    /// Being destroyed.
    Shutdown,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdleBehavior {
    #[default]
    Run,
    Hold,
    Drain,
}

/// The timeouts configuration sets (arvados's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub booting: Duration,
    pub idle: Duration,
    pub probe: Duration,
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            booting: Duration::from_secs(600),
            idle: Duration::from_secs(60),
            probe: Duration::from_secs(600),
            shutdown: Duration::from_secs(10),
        }
    }
}

/// What the rules need to know of a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub state: WorkerState,
    pub idle_behavior: IdleBehavior,
    /// When it was created or first listed.
    pub appeared_at: Timestamp,
    /// When something last ran on it (or it became idle).
    pub busy_at: Timestamp,
    /// When a probe last passed.
    pub probed_ok_at: Option<Timestamp>,
    /// Whether something runs on it now.
    pub running: bool,
}

/// Why a worker is to be shut down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownReason {
    /// Its idle behaviour is drain, and nothing runs on it.
    Drained,
    /// Idle for longer than the idle timeout.
    Idle,
    /// It never passed its probes within the boot timeout.
    NeverBooted,
    /// Its probes have failed for longer than the probe timeout.
    Broken,
    /// An operator killed it.
    Killed,
    /// It is not the instance that was created: its host key or instance secret is wrong.
    Refused,
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShutdownReason::Drained => "drained",
            ShutdownReason::Idle => "idle too long",
            ShutdownReason::NeverBooted => "did not boot in time",
            ShutdownReason::Broken => "its probes failed for too long",
            ShutdownReason::Killed => "killed by an operator",
            ShutdownReason::Refused => "refused: it is not the instance that was created",
        })
    }
}

/// Whether `worker` is to be shut down now, and why. A held worker never is.
pub fn shutdown_reason(
    worker: &Facts,
    timeouts: &Timeouts,
    now: Timestamp,
) -> Option<ShutdownReason> {
    if worker.idle_behavior == IdleBehavior::Hold || worker.state == WorkerState::Shutdown {
        return None;
    }
    let drain = worker.idle_behavior == IdleBehavior::Drain;
    match worker.state {
        WorkerState::Booting | WorkerState::Unknown => {
            if drain {
                Some(ShutdownReason::Drained)
            } else if now.since(worker.appeared_at) >= timeouts.booting {
                Some(ShutdownReason::NeverBooted)
            } else {
                None
            }
        }
        WorkerState::Idle | WorkerState::Running => {
            let probed = worker.probed_ok_at.unwrap_or(worker.appeared_at);
            if now.since(probed) >= timeouts.probe {
                Some(ShutdownReason::Broken)
            } else if drain && !worker.running {
                Some(ShutdownReason::Drained)
            } else if worker.state == WorkerState::Idle
                && !worker.running
                && now.since(worker.busy_at) >= timeouts.idle
            {
                Some(ShutdownReason::Idle)
            } else {
                None
            }
        }
        WorkerState::Shutdown => None,
    }
}

/// Whether new work may start on `worker`.
pub fn accepts_work(worker: &Facts) -> bool {
    worker.idle_behavior == IdleBehavior::Run
        && matches!(worker.state, WorkerState::Idle | WorkerState::Running)
}

/// A worker as the log has it: one cloud instance, from when it appeared (created or adopted)
/// to when it is gone. Its state and idle behaviour are events, so a restart rebuilds them
/// from the log (arvados kept them in the instance's tags).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Worker {
    #[default]
    Absent,
    Present(WorkerRecord),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub set: PoolName,
    pub instance_type: String,
    pub address: Option<String>,
    pub state: WorkerState,
    pub idle_behavior: IdleBehavior,
    /// Created by this instance set (`false`: found in the driver's list and adopted).
    pub created: bool,
    pub appeared_at: Timestamp,
    pub booted_at: Option<Timestamp>,
    /// When work last started or ended on it.
    pub busy_at: Timestamp,
    pub shutdown: Option<(ShutdownReason, Timestamp)>,
    pub gone: Option<GoneEvent>,
}

impl WorkerRecord {
    /// What the shutdown rules need, with the last passing probe known to the caller.
    pub fn facts(&self, probed_ok_at: Option<Timestamp>) -> Facts {
        Facts {
            state: self.state,
            idle_behavior: self.idle_behavior,
            appeared_at: self.appeared_at,
            busy_at: self.busy_at,
            probed_ok_at: probed_ok_at.or(self.booted_at),
            running: self.state == WorkerState::Running,
        }
    }

    pub fn is_gone(&self) -> bool {
        self.gone.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkerCommand {
    /// The sync found it (`created: false`) or made it (`true`). Nothing when it is known.
    Appear {
        set: PoolName,
        instance_type: String,
        address: Option<String>,
        created: bool,
    },
    /// Its probes passed: it takes work. Nothing when it had booted.
    Boot { address: Option<String> },
    /// An operator's run, hold or drain. Nothing when it is that already.
    SetIdleBehavior { idle_behavior: IdleBehavior },
    /// Work started on it, or ended.
    Busy { busy: bool },
    /// It is to be destroyed. Nothing when it is being destroyed already.
    Shutdown { reason: ShutdownReason },
    /// It is no longer in the driver's list: destroyed, or it disappeared on its own.
    Gone { disappeared: bool },
}

event_set! {
    pub enum WorkerEvent {
        Appeared(Appeared) = "worker.appeared" @ 1,
        Booted(Booted) = "worker.booted" @ 1,
        IdleBehaviorSet(IdleBehaviorSet) = "worker.idle_behavior_set" @ 1,
        BusyChanged(BusyChanged) = "worker.busy_changed" @ 1,
        ShuttingDown(ShuttingDown) = "worker.shutting_down" @ 1,
        Gone(GoneEvent) = "worker.gone" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Appeared {
    /// The instance set (cloud pool) it belongs to.
    pub set: PoolName,
    pub instance_type: String,
    pub address: Option<String>,
    pub created: bool,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Booted {
    pub address: Option<String>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IdleBehaviorSet {
    pub idle_behavior: IdleBehavior,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BusyChanged {
    pub busy: bool,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShuttingDown {
    pub reason: ShutdownReason,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GoneEvent {
    /// Gone without being shut down: it disappeared from the driver's list.
    pub disappeared: bool,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("no worker {worker:?}")]
    NotFound { worker: String },
    #[error("worker {worker:?} is gone")]
    Gone { worker: String },
    #[error("worker {worker:?} is being shut down ({reason})")]
    ShuttingDown {
        worker: String,
        reason: ShutdownReason,
    },
    #[error("instance type {instance_type:?} must be 1 to {MAX_TYPE} printable characters")]
    InstanceType { instance_type: String },
}

/// The longest instance type name.
pub const MAX_TYPE: usize = 128;

impl Rejection for WorkerError {
    fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::NotFound { .. } | WorkerError::Gone { .. } => ErrorKind::NotFound,
            WorkerError::ShuttingDown { .. } => ErrorKind::Conflict,
            WorkerError::InstanceType { .. } => ErrorKind::Invalid,
        }
    }
}

/// What readers see of a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerView {
    /// The instance id.
    pub id: WorkerId,
    pub set: PoolName,
    pub instance_type: String,
    pub address: Option<String>,
    pub state: WorkerState,
    pub idle_behavior: IdleBehavior,
    pub created: bool,
    pub appeared_at: Timestamp,
    pub booted_at: Option<Timestamp>,
    pub busy_at: Timestamp,
    pub shutdown_reason: Option<ShutdownReason>,
    pub shutdown_at: Option<Timestamp>,
    /// Set once it has left the driver's list.
    pub gone_at: Option<Timestamp>,
    pub disappeared: bool,
}

impl Aggregate for Worker {
    const KIND: &'static str = "worker";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = WorkerId;
    type Command = WorkerCommand;
    type Event = WorkerEvent;
    type Reply = Option<WorkerView>;
    type View = WorkerView;
    type Error = WorkerError;

    fn decide(
        &self,
        id: &WorkerId,
        command: &WorkerCommand,
        cx: &Context,
    ) -> Result<Vec<WorkerEvent>, WorkerError> {
        let at = cx.now;
        let worker = || id.to_string();
        let record = match (self, command) {
            (
                Worker::Absent,
                WorkerCommand::Appear {
                    set,
                    instance_type,
                    address,
                    created,
                },
            ) => {
                if instance_type.is_empty()
                    || instance_type.len() > MAX_TYPE
                    || instance_type.chars().any(char::is_control)
                {
                    return Err(WorkerError::InstanceType {
                        instance_type: instance_type.clone(),
                    });
                }
                return Ok(vec![WorkerEvent::Appeared(Appeared {
                    set: set.clone(),
                    instance_type: instance_type.clone(),
                    address: address.clone(),
                    created: *created,
                    at,
                })]);
            }
            (Worker::Absent, WorkerCommand::Gone { .. }) => return Ok(vec![]),
            (Worker::Absent, _) => return Err(WorkerError::NotFound { worker: worker() }),
            (Worker::Present(record), _) => record,
        };
        if record.is_gone() {
            return match command {
                WorkerCommand::Appear { .. }
                | WorkerCommand::Gone { .. }
                | WorkerCommand::Shutdown { .. }
                | WorkerCommand::Busy { .. } => Ok(vec![]),
                _ => Err(WorkerError::Gone { worker: worker() }),
            };
        }
        let shutting_down = record.state == WorkerState::Shutdown;
        Ok(match command {
            WorkerCommand::Appear { .. } => vec![],
            WorkerCommand::Boot { address } => {
                if matches!(record.state, WorkerState::Booting | WorkerState::Unknown) {
                    vec![WorkerEvent::Booted(Booted {
                        address: address.clone().or_else(|| record.address.clone()),
                        at,
                    })]
                } else {
                    vec![]
                }
            }
            WorkerCommand::SetIdleBehavior { idle_behavior } => {
                if let Some((reason, _)) = &record.shutdown {
                    return Err(WorkerError::ShuttingDown {
                        worker: worker(),
                        reason: reason.clone(),
                    });
                }
                if record.idle_behavior == *idle_behavior {
                    vec![]
                } else {
                    vec![WorkerEvent::IdleBehaviorSet(IdleBehaviorSet {
                        idle_behavior: *idle_behavior,
                        at,
                    })]
                }
            }
            WorkerCommand::Busy { busy } => {
                let running = record.state == WorkerState::Running;
                if shutting_down || running == *busy || record.booted_at.is_none() {
                    vec![]
                } else {
                    vec![WorkerEvent::BusyChanged(BusyChanged { busy: *busy, at })]
                }
            }
            WorkerCommand::Shutdown { reason } => {
                if shutting_down {
                    vec![]
                } else {
                    vec![WorkerEvent::ShuttingDown(ShuttingDown {
                        reason: reason.clone(),
                        at,
                    })]
                }
            }
            WorkerCommand::Gone { disappeared } => vec![WorkerEvent::Gone(GoneEvent {
                disappeared: *disappeared && !shutting_down,
                at,
            })],
        })
    }

    fn apply(&mut self, event: &WorkerEvent) {
        if let WorkerEvent::Appeared(e) = event {
            if let Worker::Absent = self {
                *self = Worker::Present(WorkerRecord {
                    set: e.set.clone(),
                    instance_type: e.instance_type.clone(),
                    address: e.address.clone(),
                    state: if e.created {
                        WorkerState::Booting
                    } else {
                        WorkerState::Unknown
                    },
                    idle_behavior: IdleBehavior::Run,
                    created: e.created,
                    appeared_at: e.at,
                    booted_at: None,
                    busy_at: e.at,
                    shutdown: None,
                    gone: None,
                });
            }
            return;
        }
        let Worker::Present(record) = self else {
            return;
        };
        match event {
            WorkerEvent::Appeared(_) => {}
            WorkerEvent::Booted(e) => {
                record.state = WorkerState::Idle;
                record.booted_at = Some(e.at);
                record.busy_at = e.at;
                if e.address.is_some() {
                    record.address = e.address.clone();
                }
            }
            WorkerEvent::IdleBehaviorSet(e) => record.idle_behavior = e.idle_behavior,
            WorkerEvent::BusyChanged(e) => {
                record.state = if e.busy {
                    WorkerState::Running
                } else {
                    WorkerState::Idle
                };
                record.busy_at = e.at;
            }
            WorkerEvent::ShuttingDown(e) => {
                record.state = WorkerState::Shutdown;
                record.shutdown = Some((e.reason.clone(), e.at));
            }
            WorkerEvent::Gone(e) => {
                record.state = WorkerState::Shutdown;
                record.gone = Some(e.clone());
            }
        }
    }

    fn reply(&self, id: &WorkerId, _command: &WorkerCommand) -> Option<WorkerView> {
        self.view(id)
    }

    fn view(&self, id: &WorkerId) -> Option<WorkerView> {
        let Worker::Present(r) = self else {
            return None;
        };
        Some(WorkerView {
            id: id.clone(),
            set: r.set.clone(),
            instance_type: r.instance_type.clone(),
            address: r.address.clone(),
            state: r.state,
            idle_behavior: r.idle_behavior,
            created: r.created,
            appeared_at: r.appeared_at,
            booted_at: r.booted_at,
            busy_at: r.busy_at,
            shutdown_reason: r.shutdown.as_ref().map(|(reason, _)| reason.clone()),
            shutdown_at: r.shutdown.as_ref().map(|(_, at)| *at),
            gone_at: r.gone.as_ref().map(|g| g.at),
            disappeared: r.gone.as_ref().is_some_and(|g| g.disappeared),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::EPOCH.saturating_add(Duration::from_secs(s))
    }

    fn worker(state: WorkerState, idle_behavior: IdleBehavior) -> Facts {
        Facts {
            state,
            idle_behavior,
            appeared_at: at(0),
            busy_at: at(0),
            probed_ok_at: Some(at(0)),
            running: state == WorkerState::Running,
        }
    }

    #[test]
    fn idle_workers_shut_down_after_the_idle_timeout_unless_held() {
        let t = Timeouts::default();
        let idle = worker(WorkerState::Idle, IdleBehavior::Run);
        assert_eq!(shutdown_reason(&idle, &t, at(59)), None);
        assert_eq!(
            shutdown_reason(
                &Facts {
                    probed_ok_at: Some(at(60)),
                    ..idle.clone()
                },
                &t,
                at(60)
            ),
            Some(ShutdownReason::Idle)
        );
        let held = worker(WorkerState::Idle, IdleBehavior::Hold);
        assert_eq!(shutdown_reason(&held, &t, at(100_000)), None);
        assert!(!accepts_work(&held));
        assert!(accepts_work(&idle));
    }

    #[test]
    fn draining_waits_for_what_runs_and_booting_ones_go_at_once() {
        let t = Timeouts::default();
        let running = worker(WorkerState::Running, IdleBehavior::Drain);
        assert_eq!(shutdown_reason(&running, &t, at(1)), None);
        let done = Facts {
            running: false,
            ..running
        };
        assert_eq!(
            shutdown_reason(&done, &t, at(1)),
            Some(ShutdownReason::Drained)
        );
        let booting = worker(WorkerState::Booting, IdleBehavior::Drain);
        assert_eq!(
            shutdown_reason(&booting, &t, at(1)),
            Some(ShutdownReason::Drained)
        );
    }

    #[test]
    fn never_booted_and_broken_workers_are_shut_down() {
        let t = Timeouts::default();
        let booting = worker(WorkerState::Booting, IdleBehavior::Run);
        assert_eq!(shutdown_reason(&booting, &t, at(599)), None);
        assert_eq!(
            shutdown_reason(&booting, &t, at(600)),
            Some(ShutdownReason::NeverBooted)
        );
        let running = worker(WorkerState::Running, IdleBehavior::Run);
        assert_eq!(
            shutdown_reason(&running, &t, at(600)),
            Some(ShutdownReason::Broken)
        );
        let held = worker(WorkerState::Running, IdleBehavior::Hold);
        assert_eq!(shutdown_reason(&held, &t, at(600)), None);
    }
    fn cx(s: u64) -> Context {
        Context { now: at(s) }
    }

    fn run(worker: &mut Worker, command: WorkerCommand, s: u64) -> Vec<WorkerEvent> {
        let id = WorkerId::new("i-1").unwrap();
        let events = worker.decide(&id, &command, &cx(s)).unwrap();
        for event in &events {
            worker.apply(event);
        }
        events
    }

    fn appear(created: bool) -> WorkerCommand {
        WorkerCommand::Appear {
            set: PoolName::new("workers").unwrap(),
            instance_type: "small".into(),
            address: Some("127.0.0.1:2222".into()),
            created,
        }
    }

    fn record(worker: &Worker) -> &WorkerRecord {
        match worker {
            Worker::Present(r) => r,
            Worker::Absent => panic!("absent"),
        }
    }

    #[test]
    fn a_created_worker_boots_works_and_is_shut_down_then_gone() {
        let mut w = Worker::default();
        assert_eq!(run(&mut w, appear(true), 0).len(), 1);
        assert_eq!(record(&w).state, WorkerState::Booting);
        // Appearing again (adopted by a later sync) changes nothing.
        assert!(run(&mut w, appear(false), 1).is_empty());
        // Busy before booting means nothing.
        assert!(run(&mut w, WorkerCommand::Busy { busy: true }, 1).is_empty());
        run(&mut w, WorkerCommand::Boot { address: None }, 2);
        assert_eq!(record(&w).state, WorkerState::Idle);
        assert!(run(&mut w, WorkerCommand::Boot { address: None }, 3).is_empty());
        run(&mut w, WorkerCommand::Busy { busy: true }, 4);
        assert_eq!(record(&w).state, WorkerState::Running);
        run(&mut w, WorkerCommand::Busy { busy: false }, 5);
        assert_eq!(record(&w).busy_at, at(5));
        run(
            &mut w,
            WorkerCommand::Shutdown {
                reason: ShutdownReason::Idle,
            },
            70,
        );
        assert!(
            run(
                &mut w,
                WorkerCommand::Shutdown {
                    reason: ShutdownReason::Killed
                },
                71
            )
            .is_empty()
        );
        let id = WorkerId::new("i-1").unwrap();
        assert!(matches!(
            w.decide(
                &id,
                &WorkerCommand::SetIdleBehavior {
                    idle_behavior: IdleBehavior::Hold
                },
                &cx(72)
            ),
            Err(WorkerError::ShuttingDown { .. })
        ));
        run(&mut w, WorkerCommand::Gone { disappeared: true }, 73);
        let view = w.view(&id).unwrap();
        assert_eq!(view.gone_at, Some(at(73)));
        // Shut down first: gone as asked, not disappeared.
        assert!(!view.disappeared);
        assert_eq!(view.shutdown_reason, Some(ShutdownReason::Idle));
        assert!(run(&mut w, appear(false), 74).is_empty());
    }

    #[test]
    fn an_adopted_worker_is_unknown_until_probed_and_keeps_its_hold() {
        let mut w = Worker::default();
        run(&mut w, appear(false), 0);
        assert_eq!(record(&w).state, WorkerState::Unknown);
        run(
            &mut w,
            WorkerCommand::SetIdleBehavior {
                idle_behavior: IdleBehavior::Hold,
            },
            1,
        );
        assert!(
            run(
                &mut w,
                WorkerCommand::SetIdleBehavior {
                    idle_behavior: IdleBehavior::Hold
                },
                2
            )
            .is_empty()
        );
        run(&mut w, WorkerCommand::Gone { disappeared: true }, 3);
        assert!(w.view(&WorkerId::new("i-1").unwrap()).unwrap().disappeared);
    }

    #[test]
    fn bad_commands_are_refused_and_change_nothing() {
        let id = WorkerId::new("i-1").unwrap();
        let w = Worker::default();
        assert!(matches!(
            w.decide(&id, &WorkerCommand::Busy { busy: true }, &cx(0)),
            Err(WorkerError::NotFound { .. })
        ));
        assert_eq!(
            w.decide(&id, &WorkerCommand::Gone { disappeared: true }, &cx(0)),
            Ok(vec![])
        );
        for instance_type in ["", "a\nb"] {
            let appear = WorkerCommand::Appear {
                set: PoolName::new("workers").unwrap(),
                instance_type: instance_type.into(),
                address: None,
                created: true,
            };
            assert!(matches!(
                w.decide(&id, &appear, &cx(0)),
                Err(WorkerError::InstanceType { .. })
            ));
        }
    }
}
