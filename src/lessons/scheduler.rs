//! The lesson scheduler: a reaction that delegates each live lesson's create, modify (a stage
//! change) and delete to the backend.
//!
//! It follows `livelesson` events and keeps, per lesson with work left (provisioning,
//! configuring, or killed and not yet deleted), the trace of the request it serves. A job, on
//! the owner of the lesson's shard, loops: read the lesson's record, observe what the backend
//! has, and do what `domain::lessons::plan::next` says, recording each step's outcome, until the
//! lesson is READY, in ERROR, or deleted. Every command is named after the lesson's version and
//! the step (`derived_command_id`), so a repeated job writes once, and an endpoint the backend
//! has already is adopted rather than started again. Every step is a span in the trace of the
//! request; a failure marks its span as an error, with the reason and the output.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::backend::LessonBackend;
use super::ssh;
use crate::backend::BackendError;
use crate::config::LessonsConfig;
use crate::domain::lessons::catalog::PresentationKind;
use crate::domain::lessons::livelesson::{LiveLessonCommand, LiveLessonEvent, Record, Status};
use crate::domain::lessons::livesession::LiveSessionCommand;
use crate::domain::lessons::plan::{self, Limits, Step};
use crate::domain::lessons::{EndpointName, LiveLesson, LiveLessonId, LiveSession};
use crate::domain::{Aggregate, ErrorKind, Principal, Timestamp};
use crate::runtime::reaction::{Due, Observed as Seen, Reaction};
use crate::runtime::{Clock, CommandMeta, Entities, derived_command_id, error_chain};
use crate::step_span;
use crate::store::StoreError;
use crate::telemetry::{self, failed};

/// What the scheduler needs to reach.
pub struct Shared {
    pub lessons: Entities<LiveLesson>,
    pub sessions: Entities<LiveSession>,
    pub backend: Arc<dyn LessonBackend>,
    pub config: LessonsConfig,
    pub clock: Clock,
}

#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// What the scheduler knows of one lesson with work left.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tracked {
    pub status: Status,
    pub killed: bool,
    /// The trace of the request being served (creation, stage change or kill).
    pub traceparent: Option<String>,
}

impl Tracked {
    fn has_work(&self) -> bool {
        self.killed
            || matches!(
                self.status,
                Status::Initialized | Status::Booting | Status::Configuration
            )
    }
}

pub struct Job {
    id: LiveLessonId,
    traceparent: Option<String>,
}

impl Reaction for Scheduler {
    const NAME: &'static str = "lesson_scheduler";
    const STATE_VERSION: u16 = 1;
    type State = BTreeMap<LiveLessonId, Tracked>;
    type Job = Job;

    fn kinds(&self) -> Vec<&'static str> {
        vec![LiveLesson::KIND]
    }

    fn observe(&self, state: &mut Self::State, seen: &Seen<'_>) -> Result<(), StoreError> {
        let (Some(events), Some(id)) = (seen.events::<LiveLesson>()?, seen.id_of::<LiveLesson>())
        else {
            return Ok(());
        };
        for event in events {
            match event {
                LiveLessonEvent::Requested(_) => {
                    state.insert(
                        id.clone(),
                        Tracked {
                            status: Status::Initialized,
                            killed: false,
                            traceparent: seen.traceparent(),
                        },
                    );
                }
                LiveLessonEvent::Deleted(_) => {
                    state.remove(&id);
                }
                event => {
                    let Some(tracked) = state.get_mut(&id) else {
                        continue;
                    };
                    match event {
                        LiveLessonEvent::StageRequested(_) => {
                            tracked.status = Status::Configuration;
                            tracked.traceparent = seen.traceparent();
                        }
                        LiveLessonEvent::KillRequested(_) => {
                            tracked.killed = true;
                            tracked.traceparent = seen.traceparent();
                        }
                        LiveLessonEvent::Booting(_) => tracked.status = Status::Booting,
                        LiveLessonEvent::Configuring(_) => tracked.status = Status::Configuration,
                        LiveLessonEvent::Ready(_) => tracked.status = Status::Ready,
                        LiveLessonEvent::Failed(_) => tracked.status = Status::Error,
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn due(&self, state: &Self::State, _now: Timestamp) -> Vec<Due<Self::Job>> {
        state
            .iter()
            .filter(|(_, tracked)| tracked.has_work())
            .map(|(id, tracked)| Due {
                kind: LiveLesson::KIND,
                id: id.to_string(),
                job: Job {
                    id: id.clone(),
                    traceparent: tracked.traceparent.clone(),
                },
            })
            .collect()
    }

    fn run(&self, job: Job) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let span = tracing::debug_span!("lesson.schedule", lesson = %job.id);
            telemetry::continue_traceparent(&span, job.traceparent.as_deref());
            Driver { shared, id: job.id }.drive().instrument(span).await
        })
    }
}

/// Refusals in a row before the job gives up (and is retried with a back-off).
const MAX_REFUSALS: u32 = 8;

struct Driver {
    shared: Arc<Shared>,
    id: LiveLessonId,
}

impl Driver {
    async fn drive(self) -> Result<(), String> {
        let mut refusals = 0;
        loop {
            let (lesson, version) = self
                .shared
                .lessons
                .inspect_here(self.id.clone())
                .await
                .map_err(|e| error_chain(&e))?;
            let LiveLesson::Present(record) = lesson else {
                return Ok(());
            };
            let seen = if record.status == Status::Initialized && record.kill.is_none() {
                BTreeMap::new()
            } else {
                self.shared
                    .backend
                    .observe(&self.id, &record.lesson)
                    .await
                    .map_err(|e| backend_error(&e))?
            };
            let now = (self.shared.clock)();
            let limits = Limits {
                reachability: self.shared.config.reachability_timeout,
            };
            let step = plan::next(&record, &seen, now, limits);
            if step == Step::Done {
                return Ok(());
            }
            if self.step(&record, version, step).await? {
                refusals = 0;
            } else {
                refusals += 1;
                if refusals > MAX_REFUSALS {
                    return Err(format!(
                        "live lesson {}: its record refused {MAX_REFUSALS} steps in a row",
                        self.id
                    ));
                }
            }
        }
    }

    /// Records `command`, named after the version it was decided at and the step.
    /// `Ok(false)`: the record refused it (it moved on meanwhile); plan again.
    async fn record(
        &self,
        version: u64,
        step: &str,
        command: LiveLessonCommand,
    ) -> Result<bool, String> {
        let name = format!("{}\n{}\n{version}\n{step}", Scheduler::NAME, self.id);
        let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
        match self
            .shared
            .lessons
            .execute(self.id.clone(), command, meta)
            .await
        {
            Ok(outcome) => Ok(outcome.version > version),
            Err(err)
                if err.is_definite()
                    && matches!(
                        err.kind(),
                        ErrorKind::Conflict | ErrorKind::NotFound | ErrorKind::Invalid
                    ) =>
            {
                tracing::debug!(lesson = %self.id, step, error = %error_chain(&err), "the lesson refused a step; planning again");
                Ok(false)
            }
            Err(err) => Err(error_chain(&err)),
        }
    }

    async fn fail(
        &self,
        version: u64,
        span: &tracing::Span,
        step: &str,
        reason: String,
        output: String,
    ) -> Result<bool, String> {
        failed(span, &format!("{reason}\n{output}"));
        tracing::warn!(parent: span, lesson = %self.id, step, %reason, "a live lesson failed");
        let command = LiveLessonCommand::Fail {
            step: step.to_owned(),
            reason,
            output,
        };
        self.record(version, "fail", command).await
    }

    async fn step(&self, record: &Record, version: u64, step: Step) -> Result<bool, String> {
        let (span, work): (tracing::Span, BoxFuture<'_, Result<bool, String>>) = match step {
            Step::Delete => (
                step_span!("lesson.delete"),
                Box::pin(self.delete(record, version)),
            ),
            Step::Provision => (
                step_span!("lesson.provision", backend = self.shared.backend.name()),
                Box::pin(async move {
                    let recorded = self
                        .record(version, "provision", LiveLessonCommand::Provision)
                        .await?;
                    crate::failpoint::hit("lesson.after_booting");
                    Ok(recorded)
                }),
            ),
            Step::Start { endpoint } => (
                step_span!("lesson.start_endpoint", endpoint = %endpoint),
                Box::pin(self.start(record, version, endpoint)),
            ),
            Step::Adopt {
                endpoint,
                addresses,
            } => (
                step_span!("lesson.addresses", endpoint = %endpoint),
                Box::pin(async move {
                    let step = format!("started\n{endpoint}");
                    self.record(
                        version,
                        &step,
                        LiveLessonCommand::EndpointStarted {
                            endpoint,
                            addresses,
                        },
                    )
                    .await
                }),
            ),
            Step::Probe { deadline } => (
                step_span!(
                    "lesson.reachability",
                    healthy = tracing::field::Empty,
                    total = tracing::field::Empty
                ),
                Box::pin(self.probe(record, version, deadline)),
            ),
            Step::Configure { endpoints, stage } => (
                step_span!("lesson.configuration", stage),
                Box::pin(async move {
                    // Every endpoint at once, each its own span; the first failure fails it.
                    let runs = endpoints.into_iter().map(|endpoint| {
                        let span = step_span!("lesson.configure", endpoint = %endpoint, stage);
                        self.configure(record, version, endpoint, stage)
                            .instrument(span)
                    });
                    let mut progressed = false;
                    for result in futures::future::join_all(runs).await {
                        progressed |= result?;
                    }
                    Ok(progressed)
                }),
            ),
            Step::WaitUntil(at) => (
                step_span!("lesson.ready_delay"),
                Box::pin(async move {
                    let now = (self.shared.clock)();
                    let wait = at.since(now).min(Duration::from_secs(5));
                    tokio::time::sleep(wait).await;
                    Ok(true)
                }),
            ),
            // Not a step of its own: no span, only the pause.
            Step::Poll => {
                tokio::time::sleep(self.shared.config.poll_interval).await;
                return Ok(true);
            }
            Step::Ready { stage } => (
                step_span!("lesson.ready", stage),
                Box::pin(self.record(version, "ready", LiveLessonCommand::Ready { stage })),
            ),
            Step::Fail {
                step,
                reason,
                output,
            } => {
                let span = step_span!("lesson.fail", step);
                let failure = {
                    let span = span.clone();
                    Box::pin(async move { self.fail(version, &span, step, reason, output).await })
                };
                (span, failure)
            }
            Step::Done => return Ok(true),
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
        endpoint: EndpointName,
    ) -> Result<bool, String> {
        match self
            .shared
            .backend
            .start(&self.id, &record.session, &record.lesson, &endpoint)
            .await
        {
            Ok(()) => {
                crate::failpoint::hit("lesson.after_start");
                Ok(true)
            }
            // What retrying cannot fix fails the lesson, saying why.
            Err(err @ (BackendError::Refused { .. } | BackendError::Forbidden { .. })) => {
                let span = tracing::Span::current();
                self.fail(version, &span, "provision", err.to_string(), String::new())
                    .await
            }
            Err(err) => Err(backend_error(&err)),
        }
    }

    /// Tests every endpoint until all answer, the deadline passes, or the lesson is killed.
    async fn probe(
        &self,
        record: &Record,
        version: u64,
        deadline: Timestamp,
    ) -> Result<bool, String> {
        let span = tracing::Span::current();
        let timeout = self.shared.config.check_timeout;
        let total = u32::try_from(record.lesson.endpoints.len()).unwrap_or(u32::MAX);
        let mut version = version;
        loop {
            let mut healthy = 0;
            let mut problems = Vec::new();
            for endpoint in &record.lesson.endpoints {
                let addresses = record
                    .endpoints
                    .get(&endpoint.name)
                    .cloned()
                    .unwrap_or_default();
                let mut tests: Vec<(bool, String)> = endpoint
                    .presentations
                    .iter()
                    .filter_map(|p| {
                        let address = addresses.get(&p.port)?;
                        Some((p.kind == PresentationKind::Ssh, address.clone()))
                    })
                    .collect();
                if endpoint.presentations.is_empty() {
                    tests.extend(addresses.values().map(|a| (false, a.clone())));
                }
                let mut ok = !tests.is_empty();
                for (is_ssh, address) in tests {
                    let result = if is_ssh {
                        ssh::answers(&address, timeout).await
                    } else {
                        crate::backend::tcp_ready(&address, timeout).await
                    };
                    if let Err(why) = result {
                        ok = false;
                        problems.push(format!("endpoint {}: {why}", endpoint.name));
                    }
                }
                if ok {
                    healthy += 1;
                }
            }
            span.record("healthy", healthy);
            span.record("total", total);
            if (record.healthy, record.total) != (healthy, total) || healthy == total {
                let step = format!("reachability\n{healthy}\n{total}");
                if self
                    .record(
                        version,
                        &step,
                        LiveLessonCommand::Reachability { healthy, total },
                    )
                    .await?
                {
                    version += 1;
                }
            }
            if healthy == total {
                let recorded = self
                    .record(version, "configure", LiveLessonCommand::Configure)
                    .await?;
                crate::failpoint::hit("lesson.after_reachable");
                return Ok(recorded);
            }
            let now = (self.shared.clock)();
            if now >= deadline {
                let reason = format!(
                    "{} of {total} endpoints did not answer within {}",
                    total - healthy,
                    humantime::format_duration(self.shared.config.reachability_timeout)
                );
                return self
                    .fail(version, &span, "reachability", reason, problems.join("\n"))
                    .await;
            }
            tokio::time::sleep(self.shared.config.poll_interval).await;
            // A kill while it waits is seen at once.
            let (now_lesson, now_version) = self
                .shared
                .lessons
                .inspect_here(self.id.clone())
                .await
                .map_err(|e| error_chain(&e))?;
            match now_lesson {
                LiveLesson::Present(r) if r.kill.is_none() && r.status == Status::Booting => {
                    version = now_version;
                }
                _ => return Ok(true),
            }
        }
    }

    async fn configure(
        &self,
        record: &Record,
        version: u64,
        endpoint: EndpointName,
        stage: u32,
    ) -> Result<bool, String> {
        let span = tracing::Span::current();
        let Some(script) = record
            .lesson
            .stage(stage)
            .and_then(|s| s.configs.get(&endpoint))
        else {
            return Ok(false);
        };
        let address = record
            .lesson
            .endpoint(&endpoint)
            .and_then(|e| e.ssh())
            .and_then(|p| record.endpoints.get(&endpoint)?.get(&p.port).cloned());
        let Some(address) = address else {
            let reason = format!("endpoint {endpoint} has no SSH address to configure it through");
            return self
                .fail(version, &span, "configure", reason, String::new())
                .await;
        };
        let access = self
            .shared
            .backend
            .access(&self.id)
            .await
            .map_err(|e| backend_error(&e))?;
        let host_key = self.shared.backend.host_key(&self.id, &endpoint).await;
        let ran = ssh::run(
            &address,
            &access.user,
            &access.key,
            host_key,
            script.kind.interpreter(),
            &script.text,
            self.shared.config.configure_timeout,
        )
        .await;
        let step = format!("configured\n{stage}\n{endpoint}");
        match ran {
            Ok(ran) if ran.status == Some(0) => {
                crate::failpoint::hit("lesson.after_configure");
                self.record(
                    version,
                    &step,
                    LiveLessonCommand::EndpointConfigured {
                        stage,
                        endpoint,
                        output: ran.output,
                    },
                )
                .await
            }
            Ok(ran) => {
                let how = ran.status.map_or_else(
                    || "ended without an exit status".to_owned(),
                    |c| format!("exited with code {c}"),
                );
                let reason = format!(
                    "the stage {stage} script of endpoint {endpoint} ({}) {how}",
                    script.file
                );
                self.fail(version, &span, "configure", reason, ran.output)
                    .await
            }
            Err(err) => {
                let reason = format!(
                    "cannot run the stage {stage} script of endpoint {endpoint}: {}",
                    error_chain(&err)
                );
                self.fail(version, &span, "configure", reason, String::new())
                    .await
            }
        }
    }

    async fn delete(&self, record: &Record, version: u64) -> Result<bool, String> {
        self.shared
            .backend
            .delete(&self.id)
            .await
            .map_err(|e| backend_error(&e))?;
        crate::failpoint::hit("lesson.after_delete");
        let name = format!("{}\ndetach\n{}", Scheduler::NAME, self.id);
        let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
        let detach = LiveSessionCommand::Detach {
            live_lesson: self.id.clone(),
        };
        match self
            .shared
            .sessions
            .execute(record.session.clone(), detach, meta)
            .await
        {
            Ok(_) => {}
            // A session that is gone holds nothing.
            Err(err) if err.is_definite() && err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(error_chain(&err)),
        }
        self.record(version, "deleted", LiveLessonCommand::Deleted)
            .await
    }
}

fn backend_error(err: &BackendError) -> String {
    let message = error_chain(err);
    tracing::warn!(error = %message, "lesson backend call failed");
    message
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{Encoding, decode_events, encode_events};
    use crate::domain::lessons::catalog::{self, LESSON_FILE, LessonSource};
    use crate::domain::lessons::livelesson::Requested;

    /// Every field of a lesson survives the log's encodings (bincode has no room for skipped
    /// fields).
    #[test]
    fn a_requested_lesson_round_trips_through_both_encodings() {
        let mut files = BTreeMap::new();
        files.insert(
            LESSON_FILE.to_owned(),
            "name: x\nendpoints:\n  - name: a\n    command: [sleep, '9']\n    additional_ports: [8080]\n  - name: b\n    image: i\n    configuration: shell\n    presentations: [{name: cli, type: ssh, port: 22}]\nstages: [{}]\n".to_owned(),
        );
        files.insert("stage1/guide.md".into(), "guide".into());
        files.insert("stage1/configs/b.sh".into(), "true".into());
        let lesson = catalog::validate(&[LessonSource {
            dir: "x".into(),
            files,
            unreadable: BTreeMap::new(),
        }])
        .unwrap()
        .remove(0);
        let event = LiveLessonEvent::Requested(Requested {
            session: "s".parse().unwrap(),
            lesson,
            catalog: "d".into(),
            stage: 1,
            at: Timestamp::from_unix_nanos(5),
        });
        for encoding in [Encoding::Bincode, Encoding::Json] {
            let bytes = encode_events(std::slice::from_ref(&event), encoding).unwrap();
            let back: Vec<LiveLessonEvent> = decode_events(&bytes, encoding).unwrap();
            assert_eq!(back, vec![event.clone()]);
        }
    }
}
