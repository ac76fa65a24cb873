//! The session executor: a reaction that takes each session from the queue to its end.
//!
//! It follows `session` and `scheduler` events and keeps, per session that has not ended, what
//! its next job needs to know (admitted? on which machines? released?). A job, on the owner of
//! the session's shard, drives the session: enqueue it with the scheduler, accept the machines it
//! was admitted on, then loop: read the session's record, observe what the backend has, and do
//! what `domain::sessions::plan::next` says, recording each intent before its effect and each
//! outcome after, until it is cleaned up and its machines are released. Every command is named
//! after the session's version and the step (`derived_command_id`), so a repeated job writes
//! once; every step is a span in the trace of the request that scheduled the session.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::backend::SessionBackend;
use super::logs::LogStore;
use crate::backend::BackendError;
use crate::config::SessionsConfig;
use crate::domain::sessions::plan::{self, Step};
use crate::domain::sessions::scheduler::{Scheduler, SchedulerCommand, SchedulerEvent};
use crate::domain::sessions::session::{
    Health, Outcome, Placed, Record, Session, SessionCommand, SessionEvent, Status, StoredLog, tail,
};
use crate::domain::sessions::{
    ComponentKind, ComponentName, MachineName, PoolName, ReadinessCheck, SchedulerId, SessionId,
};
use crate::domain::{Aggregate, ErrorKind, Principal};
use crate::runtime::reaction::{Due, Observed as Seen, Reaction};
use crate::runtime::{Clock, CommandError, CommandMeta, Entities, derived_command_id, error_chain};
use crate::step_span;
use crate::store::StoreError;
use crate::telemetry::{self, failed};

/// What the executor needs to reach.
pub struct Shared {
    pub sessions: Entities<Session>,
    pub scheduler: Entities<Scheduler>,
    pub backend: Arc<dyn SessionBackend>,
    pub logs: LogStore,
    pub config: SessionsConfig,
    pub clock: Clock,
}

#[derive(Clone)]
pub struct Executor {
    shared: Arc<Shared>,
}

impl Executor {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// What the executor knows of one session that has not ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tracked {
    pub finished: bool,
    pub cleaned: bool,
    pub enqueued: bool,
    pub admitted: Option<BTreeMap<PoolName, Vec<MachineName>>>,
    pub released: bool,
    pub refused: Option<String>,
    /// The trace of the request that scheduled it: every step continues it.
    pub traceparent: Option<String>,
}

impl Tracked {
    /// Nothing is left to do for it: cleaned up, and whatever it held given back.
    fn ended(&self) -> bool {
        self.cleaned && (self.released || (!self.enqueued && self.admitted.is_none()))
    }

    /// Waiting in the queue: nothing to do until the scheduler admits or refuses it.
    fn waiting(&self) -> bool {
        self.enqueued && self.admitted.is_none() && self.refused.is_none() && !self.finished
    }
}

/// One job: drive one session.
pub struct Job {
    id: SessionId,
    tracked: Tracked,
}

impl Reaction for Executor {
    const NAME: &'static str = "session_executor";
    const STATE_VERSION: u16 = 1;
    type State = BTreeMap<SessionId, Tracked>;
    type Job = Job;

    fn kinds(&self) -> Vec<&'static str> {
        vec![Session::KIND, Scheduler::KIND]
    }

    fn observe(&self, state: &mut Self::State, seen: &Seen<'_>) -> Result<(), StoreError> {
        if let (Some(events), Some(id)) = (seen.events::<Session>()?, seen.id_of::<Session>()) {
            for event in events {
                match event {
                    SessionEvent::Queued(_) => {
                        state.insert(
                            id.clone(),
                            Tracked {
                                traceparent: seen.traceparent(),
                                ..Tracked::default()
                            },
                        );
                    }
                    SessionEvent::Finished(_) => {
                        if let Some(t) = state.get_mut(&id) {
                            t.finished = true;
                        }
                    }
                    SessionEvent::CleanedUp(_) => {
                        if let Some(t) = state.get_mut(&id) {
                            t.cleaned = true;
                        }
                    }
                    _ => {}
                }
            }
            if state.get(&id).is_some_and(Tracked::ended) {
                state.remove(&id);
            }
        }
        if let Some(events) = seen.events::<Scheduler>()? {
            for event in events {
                let session = match &event {
                    SchedulerEvent::Enqueued(e) => &e.session,
                    SchedulerEvent::Admitted(e) => &e.session,
                    SchedulerEvent::Released(e) => &e.session,
                    SchedulerEvent::Refused(e) => &e.session,
                    SchedulerEvent::Configured(_) | SchedulerEvent::MachinesSet(_) => continue,
                };
                // Only sessions it follows: the session's own events come first in the log.
                let Some(tracked) = state.get_mut(session) else {
                    continue;
                };
                match &event {
                    SchedulerEvent::Enqueued(_) => tracked.enqueued = true,
                    SchedulerEvent::Admitted(e) => {
                        tracked.admitted = Some(
                            e.machines
                                .iter()
                                .map(|m| (m.pool.clone(), m.machines.clone()))
                                .collect(),
                        );
                    }
                    SchedulerEvent::Released(_) => tracked.released = true,
                    SchedulerEvent::Refused(e) => tracked.refused = Some(e.reason.clone()),
                    SchedulerEvent::Configured(_) | SchedulerEvent::MachinesSet(_) => {}
                }
                if tracked.ended() {
                    let session = session.clone();
                    state.remove(&session);
                }
            }
        }
        Ok(())
    }

    fn due(&self, state: &Self::State, _now: crate::domain::Timestamp) -> Vec<Due<Self::Job>> {
        state
            .iter()
            .filter(|(_, tracked)| !tracked.waiting() && !tracked.ended())
            .map(|(id, tracked)| Due {
                kind: Session::KIND,
                id: id.to_string(),
                job: Job {
                    id: id.clone(),
                    tracked: tracked.clone(),
                },
            })
            .collect()
    }

    fn run(&self, job: Job) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let span = tracing::debug_span!("session.execute", session = %job.id);
            telemetry::continue_traceparent(&span, job.tracked.traceparent.as_deref());
            Driver { shared, job }.drive().instrument(span).await
        })
    }
}

/// Refusals of the executor's own commands in a row before the job gives up (and is retried
/// with a back-off): each one means the record moved, so a few are normal.
const MAX_REFUSALS: u32 = 8;

struct Driver {
    shared: Arc<Shared>,
    job: Job,
}

impl Driver {
    async fn drive(self) -> Result<(), String> {
        let mut refusals = 0;
        loop {
            let (session, version) = self
                .shared
                .sessions
                .inspect_here(self.job.id.clone())
                .await
                .map_err(|e| error_chain(&e))?;
            let Session::Present(record) = session else {
                return Ok(());
            };
            let progressed = if record.status == Status::Queued {
                match self.before_admission(&record, version).await? {
                    Some(progressed) => progressed,
                    // Waiting for the scheduler: the next job starts when it says something.
                    None => return Ok(()),
                }
            } else {
                let observed = self
                    .shared
                    .backend
                    .observe(&self.job.id)
                    .await
                    .map_err(|e| error_chain(&e))?;
                let now = (self.shared.clock)();
                match plan::next(&record, &observed, now) {
                    Step::Done => {
                        self.release().await?;
                        return Ok(());
                    }
                    Step::Wait => {
                        tokio::time::sleep(self.shared.config.poll_interval).await;
                        true
                    }
                    step => self.step(&record, version, step).await?,
                }
            };
            if progressed {
                refusals = 0;
            } else {
                refusals += 1;
                if refusals > MAX_REFUSALS {
                    return Err(format!(
                        "session {}: its record refused {MAX_REFUSALS} steps in a row",
                        self.job.id
                    ));
                }
            }
        }
    }

    /// Enqueue, accept, or finish a refused session. `None`: nothing to do but wait.
    async fn before_admission(
        &self,
        record: &Record,
        version: u64,
    ) -> Result<Option<bool>, String> {
        let tracked = &self.job.tracked;
        if let Some(reason) = &tracked.refused {
            let command = SessionCommand::Finish {
                outcome: Outcome::Error,
                reason: Some(format!("refused by the scheduler: {reason}")),
            };
            return self.record(version, "refused", command).await.map(Some);
        }
        if let Some(machines) = &tracked.admitted {
            let placement = place(record, machines);
            let span = step_span!("session.accept");
            return self
                .record(version, "accept", SessionCommand::Accept { placement })
                .instrument(span)
                .await
                .map(Some);
        }
        if tracked.enqueued {
            return Ok(None);
        }
        let span = step_span!("session.reserve");
        let name = format!("{}\nenqueue\n{}", Executor::NAME, self.job.id);
        let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
        let command = SchedulerCommand::Enqueue {
            session: self.job.id.clone(),
            demand: record.spec.demand(),
        };
        match self
            .shared
            .scheduler
            .execute(scheduler_id(), command, meta)
            .instrument(span)
            .await
        {
            Ok(_) => Ok(None),
            Err(err @ CommandError::Rejected { .. }) | Err(err @ CommandError::Remote { .. })
                if matches!(
                    err.kind(),
                    ErrorKind::NotFound | ErrorKind::Capacity | ErrorKind::Invalid
                ) =>
            {
                let command = SessionCommand::Finish {
                    outcome: Outcome::Error,
                    reason: Some(format!("refused by the scheduler: {}", error_chain(&err))),
                };
                self.record(version, "refused", command).await.map(Some)
            }
            Err(err) => Err(error_chain(&err)),
        }
    }

    /// Gives back the machines (or the place in the queue) once everything is cleaned up.
    async fn release(&self) -> Result<(), String> {
        let span = step_span!("session.release");
        let name = format!("{}\nrelease\n{}", Executor::NAME, self.job.id);
        let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
        let command = SchedulerCommand::Release {
            session: self.job.id.clone(),
        };
        self.shared
            .scheduler
            .execute(scheduler_id(), command, meta)
            .instrument(span)
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e))
    }

    /// Records `command` on the session, named after the version it was decided at and the
    /// step. `Ok(false)`: the record refused it (it moved on meanwhile); plan again.
    async fn record(
        &self,
        version: u64,
        step: &str,
        command: SessionCommand,
    ) -> Result<bool, String> {
        let name = format!("{}\n{}\n{version}\n{step}", Executor::NAME, self.job.id);
        let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
        match self
            .shared
            .sessions
            .execute(self.job.id.clone(), command, meta)
            .await
        {
            // Nothing recorded: the record is already there; planning again must move on, or
            // the job gives up after a few such steps rather than loop.
            Ok(outcome) => Ok(outcome.version > version),
            Err(err)
                if err.is_definite()
                    && matches!(
                        err.kind(),
                        ErrorKind::Conflict | ErrorKind::NotFound | ErrorKind::Invalid
                    ) =>
            {
                tracing::debug!(session = %self.job.id, step, error = %error_chain(&err), "the session refused a step; planning again");
                Ok(false)
            }
            Err(err) => Err(error_chain(&err)),
        }
    }

    async fn step(&self, record: &Record, version: u64, step: Step) -> Result<bool, String> {
        let (span, work): (tracing::Span, BoxFuture<'_, Result<bool, String>>) = match step {
            Step::Finish { outcome, reason } => {
                let span = step_span!("session.finish", outcome = ?outcome);
                if outcome != Outcome::Done {
                    failed(&span, reason.as_deref().unwrap_or("failed"));
                }
                let command = SessionCommand::Finish { outcome, reason };
                (span, Box::pin(self.record(version, "finish", command)))
            }
            Step::Health {
                component,
                health,
                detail,
            } => {
                let span = step_span!("session.health", component = %component, health = ?health);
                let step = format!("health\n{component}");
                let command = SessionCommand::Health {
                    component,
                    health,
                    detail,
                };
                (
                    span,
                    Box::pin(async move { self.record(version, &step, command).await }),
                )
            }
            Step::Adopt { component, address } => {
                let span = step_span!("session.adopt", component = %component, address = %address);
                let step = format!("started\n{component}");
                let command = SessionCommand::ComponentStarted { component, address };
                (
                    span,
                    Box::pin(async move { self.record(version, &step, command).await }),
                )
            }
            Step::Start { component } => (
                step_span!("session.provision", component = %component),
                Box::pin(self.start(record, version, component)),
            ),
            Step::Probe { component, check } => (
                step_span!("session.probe", component = %component),
                Box::pin(self.probe(record, version, component, check)),
            ),
            Step::Run => (
                step_span!("session.run"),
                Box::pin(self.record(version, "run", SessionCommand::Run)),
            ),
            Step::StoreLog { component } => (
                step_span!("session.logs", component = %component),
                Box::pin(self.store_log(version, component)),
            ),
            Step::CleanUp => (
                step_span!("session.cleanup"),
                Box::pin(async move {
                    self.shared
                        .backend
                        .remove(&self.job.id)
                        .await
                        .map_err(|e| backend_error(&e))?;
                    self.record(version, "cleaned_up", SessionCommand::CleanedUp)
                        .await
                }),
            ),
            Step::Wait | Step::Done => return Ok(true),
        };
        let result = work.instrument(span.clone()).await;
        if let Err(err) = &result {
            failed(&span, err);
        }
        result
    }

    async fn start(
        &self,
        record: &Record,
        version: u64,
        component: ComponentName,
    ) -> Result<bool, String> {
        // The intent first: a crash after it is settled by observing.
        if record.component(&component).starting_at.is_none() {
            let step = format!("starting\n{component}");
            let recorded = self
                .record(
                    version,
                    &step,
                    SessionCommand::StartComponent {
                        component: component.clone(),
                    },
                )
                .await?;
            crate::failpoint::hit("session.after_intent");
            return Ok(recorded);
        }
        let Some(spec) = record.spec.component(&component) else {
            return Ok(false);
        };
        let mut env = spec.env.clone();
        env.insert("SWITCHYARD_SESSION".into(), self.job.id.to_string());
        env.insert("SWITCHYARD_COMPONENT".into(), component.to_string());
        if spec.kind == ComponentKind::Driver {
            env.insert(
                self.shared.config.workers_env.clone(),
                record.worker_addresses().join(","),
            );
        }
        let machine = record.placement.get(&component).map(|p| &p.machine);
        match self
            .shared
            .backend
            .start(&self.job.id, spec, machine, env)
            .await
        {
            Ok(started) => {
                crate::failpoint::hit("session.after_start");
                // Not known yet (a pod not yet running): observing reports it, in a moment.
                let Some(address) = started else {
                    tokio::time::sleep(self.shared.config.poll_interval).await;
                    return Ok(true);
                };
                let step = format!("started\n{component}");
                self.record(
                    version,
                    &step,
                    SessionCommand::ComponentStarted { component, address },
                )
                .await
            }
            Err(err @ (BackendError::Refused { .. } | BackendError::Forbidden { .. })) => {
                let why = err.to_string();
                failed(&tracing::Span::current(), &why);
                let step = format!("health\n{component}");
                self.record(
                    version,
                    &step,
                    SessionCommand::Health {
                        component,
                        health: Health::Failed,
                        detail: Some(why),
                    },
                )
                .await
            }
            Err(err) => Err(backend_error(&err)),
        }
    }

    async fn probe(
        &self,
        record: &Record,
        version: u64,
        component: ComponentName,
        check: ReadinessCheck,
    ) -> Result<bool, String> {
        let state = record.component(&component);
        let timeout = self.shared.config.check_timeout;
        let result = match &check {
            ReadinessCheck::Tcp { port } => {
                // The port asked for, on the host the component runs on.
                let address = match (port, &state.started) {
                    (Some(port), Some(started)) => {
                        let host = started
                            .address
                            .rsplit_once(':')
                            .map_or("127.0.0.1", |(host, _)| host);
                        format!("{host}:{port}")
                    }
                    (Some(port), None) => format!("127.0.0.1:{port}"),
                    (None, Some(started)) => started.address.clone(),
                    (None, None) => return Ok(false),
                };
                crate::backend::tcp_ready(&address, timeout).await
            }
            ReadinessCheck::Command { command, args } => {
                let env = record
                    .spec
                    .component(&component)
                    .map(|c| c.env.clone())
                    .unwrap_or_default();
                self.shared
                    .backend
                    .check(&self.job.id, &component, command, args, &env, timeout)
                    .await
            }
        };
        let step = format!("health\n{component}");
        match result {
            Ok(()) => {
                self.record(
                    version,
                    &step,
                    SessionCommand::Health {
                        component,
                        health: Health::Ready,
                        detail: Some("ready".to_owned()),
                    },
                )
                .await
            }
            Err(why) => {
                if state.health != Health::NotReady {
                    self.record(
                        version,
                        &step,
                        SessionCommand::Health {
                            component,
                            health: Health::NotReady,
                            detail: Some(why),
                        },
                    )
                    .await?;
                }
                tokio::time::sleep(self.shared.config.poll_interval).await;
                Ok(true)
            }
        }
    }

    async fn store_log(&self, version: u64, component: ComponentName) -> Result<bool, String> {
        let max = self.shared.config.max_log_bytes;
        let length = match self
            .shared
            .backend
            .output(&self.job.id, &component, 0, 0)
            .await
        {
            Ok(Some((_, length))) => length,
            Ok(None) => 0,
            Err(err) => return Err(backend_error(&err)),
        };
        let from = length.saturating_sub(max);
        let data = match self
            .shared
            .backend
            .output(
                &self.job.id,
                &component,
                from,
                usize::try_from(max).unwrap_or(usize::MAX),
            )
            .await
        {
            Ok(Some((data, _))) => data,
            Ok(None) => Vec::new(),
            Err(err) => return Err(backend_error(&err)),
        };
        let mut kept = Vec::new();
        if from > 0 {
            kept.extend_from_slice(
                format!("[... the first {from} bytes were not kept ...]\n").as_bytes(),
            );
        }
        kept.extend_from_slice(&data);
        let object = LogStore::object(self.job.id.as_str(), component.as_str());
        self.shared
            .logs
            .put(&object, &kept)
            .await
            .map_err(|e| error_chain(&e))?;
        let text = String::from_utf8_lossy(&kept);
        let log = StoredLog {
            object,
            bytes: length,
            tail: tail(&text),
        };
        let step = format!("log\n{component}");
        self.record(version, &step, SessionCommand::LogStored { component, log })
            .await
    }
}

fn backend_error(err: &BackendError) -> String {
    let message = error_chain(err);
    tracing::warn!(error = %message, "backend call failed");
    message
}

fn scheduler_id() -> SchedulerId {
    SchedulerId::sessions()
}

/// Which machine each component gets: per pool, the admitted machines in order, to the pool's
/// components in the order the session lists them.
pub fn place(
    record: &Record,
    machines: &BTreeMap<PoolName, Vec<MachineName>>,
) -> BTreeMap<ComponentName, Placed> {
    let mut next: BTreeMap<&PoolName, std::slice::Iter<'_, MachineName>> =
        machines.iter().map(|(pool, m)| (pool, m.iter())).collect();
    record
        .spec
        .components
        .iter()
        .filter_map(|c| {
            let machine = next.get_mut(&c.pool)?.next()?;
            Some((
                c.name.clone(),
                Placed {
                    pool: c.pool.clone(),
                    machine: machine.clone(),
                },
            ))
        })
        .collect()
}
