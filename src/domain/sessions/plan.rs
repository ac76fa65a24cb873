//! What a session's executor does next: decided from the session's record, what the backend
//! observes of its components, and the time. Never from why the executor woke up, so a resumed
//! executor (after a crash or a fail-over) takes the same path as one that never stopped.

use std::collections::BTreeMap;

use super::ComponentName;
use super::session::{Health, Outcome, Record};
use super::spec::{ComponentKind, ReadinessCheck};
use crate::domain::Timestamp;

/// What the backend has of one component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// It runs.
    Running { address: String },
    /// It ran and exited with this code.
    Exited { address: String, code: i32 },
    /// Its start was recorded by the backend, but no process runs and no exit code was left:
    /// killed by a signal, or lost in a crash while it was being started.
    Vanished {
        address: Option<String>,
        why: String,
    },
    /// The backend has it, but it does not run yet (a pod being scheduled, its image pulled).
    Pending,
    /// It will not run, and the backend says why (a pod whose image cannot be pulled, a
    /// container in a crash loop).
    Failed {
        address: Option<String>,
        why: String,
    },
}

impl Observed {
    fn address(&self) -> Option<&str> {
        match self {
            Observed::Running { address } | Observed::Exited { address, .. } => Some(address),
            Observed::Vanished { address, .. } | Observed::Failed { address, .. } => {
                address.as_deref()
            }
            Observed::Pending => None,
        }
    }
}

/// The executor's next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record the outcome; cleanup follows.
    Finish {
        outcome: Outcome,
        reason: Option<String>,
    },
    /// Record a change of a component's health.
    Health {
        component: ComponentName,
        health: Health,
        detail: Option<String>,
    },
    /// Record that the backend has this component (it was started before a crash, or by the
    /// previous owner): adopted, not started again.
    Adopt {
        component: ComponentName,
        address: String,
    },
    /// Record the intent to start it (if not recorded yet), then start it.
    Start { component: ComponentName },
    /// Run its readiness check.
    Probe {
        component: ComponentName,
        check: ReadinessCheck,
    },
    /// Every component runs and is ready: record RUNNING.
    Run,
    /// Store its output in the log bucket.
    StoreLog { component: ComponentName },
    /// Stop and remove everything the backend has of the session.
    CleanUp,
    /// Nothing to do until something changes (a process exits, a check passes, time passes).
    Wait,
    /// Nothing more to do: it is finished and cleaned up.
    Done,
}

/// The next step for `record`, given what the backend has (`observed`, by component; a
/// component the backend has nothing of is absent) and the time.
pub fn next(record: &Record, observed: &BTreeMap<ComponentName, Observed>, now: Timestamp) -> Step {
    if record.cleaned_up_at.is_some() {
        return Step::Done;
    }
    if record.status.is_finished() {
        // Logs first: cleanup removes them. A component that never started has none.
        for spec in record.spec.start_order() {
            if spec.keeps_log()
                && !record.logs.contains_key(&spec.name)
                && observed.contains_key(&spec.name)
            {
                return Step::StoreLog {
                    component: spec.name.clone(),
                };
            }
        }
        return Step::CleanUp;
    }
    if record.accepted_at.is_none() {
        // Waiting for the scheduler; nothing of it runs.
        return Step::Wait;
    }
    let order = record.spec.start_order();
    // Terminal health is never dropped: whatever the backend says ended is recorded first.
    for spec in &order {
        let state = record.component(&spec.name);
        let (health, detail) = match observed.get(&spec.name) {
            // It ran, and the backend has nothing of it any more (a pod deleted under it).
            None if state.started.is_some() && !state.health.is_terminal() => (
                Health::Failed,
                "the backend has nothing of it any more".to_owned(),
            ),
            Some(Observed::Exited { code: 0, .. }) => (Health::Succeeded, "exited 0".to_owned()),
            Some(Observed::Exited { code, .. }) => {
                (Health::Failed, format!("exited with code {code}"))
            }
            Some(Observed::Vanished { why, .. } | Observed::Failed { why, .. }) => {
                (Health::Failed, why.clone())
            }
            _ => continue,
        };
        if state.started.is_none() {
            // Record where it ran before its end.
            if let Some(address) = observed.get(&spec.name).and_then(Observed::address) {
                return Step::Adopt {
                    component: spec.name.clone(),
                    address: address.to_owned(),
                };
            }
        }
        // A terminal health already recorded is final, whatever is observed later.
        if state.health != health && !state.health.is_terminal() {
            return Step::Health {
                component: spec.name.clone(),
                health,
                detail: Some(detail),
            };
        }
    }
    // The outcome, once there is one.
    for spec in &order {
        let state = record.component(&spec.name);
        match (state.health, spec.kind) {
            (Health::Failed, _) => {
                // Lost by the backend (not a refusal to start it): an internal error.
                let vanished = match observed.get(&spec.name) {
                    Some(Observed::Vanished { .. }) => true,
                    None => state.started.is_some(),
                    Some(_) => false,
                };
                let detail = state.detail.clone().unwrap_or_else(|| "failed".to_owned());
                return Step::Finish {
                    outcome: if vanished {
                        Outcome::InternalError
                    } else {
                        Outcome::Error
                    },
                    reason: Some(format!("{} {} {detail}", spec.kind, spec.name)),
                };
            }
            (Health::Succeeded, ComponentKind::Driver) => {
                return Step::Finish {
                    outcome: Outcome::Done,
                    reason: Some(format!("driver {} exited 0", spec.name)),
                };
            }
            _ => {}
        }
    }
    if record.cancel_requested.is_some() {
        return Step::Finish {
            outcome: Outcome::Error,
            reason: Some("cancelled".to_owned()),
        };
    }
    if let Some(deadline) = record.deadline()
        && now >= deadline
    {
        return Step::Finish {
            outcome: Outcome::Error,
            reason: Some(format!(
                "timeout: not done within {} s",
                record.timeout.as_secs_f64()
            )),
        };
    }
    // Provisioning, one component at a time, each ready before the next starts.
    for spec in &order {
        let state = record.component(&spec.name);
        if state.started.is_none() {
            return match observed.get(&spec.name) {
                Some(Observed::Running { address }) if state.starting_at.is_some() => Step::Adopt {
                    component: spec.name.clone(),
                    address: address.clone(),
                },
                // Started, not running yet: the backend says when it runs.
                Some(Observed::Pending) if state.starting_at.is_some() => Step::Wait,
                _ => Step::Start {
                    component: spec.name.clone(),
                },
            };
        }
        match (state.health, &spec.readiness) {
            (Health::Ready | Health::Succeeded, _) => {}
            (_, Some(check)) => {
                return Step::Probe {
                    component: spec.name.clone(),
                    check: check.clone(),
                };
            }
            (_, None) => {
                return Step::Health {
                    component: spec.name.clone(),
                    health: Health::Ready,
                    detail: Some("running".to_owned()),
                };
            }
        }
    }
    if record.running_at.is_none() {
        return Step::Run;
    }
    Step::Wait
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::sessions::session::{Component, Placed, Started};
    use crate::domain::sessions::spec::{ComponentSpec, SessionSpec};
    use crate::domain::sessions::{MachineName, PoolName, Status};

    fn name(n: &str) -> ComponentName {
        ComponentName::new(n).unwrap()
    }

    fn t(s: u64) -> Timestamp {
        Timestamp::EPOCH.saturating_add(Duration::from_secs(s))
    }

    fn record() -> Record {
        let component = |n: &str, kind, readiness| ComponentSpec {
            name: name(n),
            kind,
            pool: PoolName::new("local").unwrap(),
            command: "true".into(),
            args: vec![],
            env: BTreeMap::new(),
            image: None,
            readiness,
            keep_log: false,
        };
        Record {
            spec: SessionSpec {
                components: vec![
                    component("d", ComponentKind::Driver, None),
                    component(
                        "s",
                        ComponentKind::Server,
                        Some(ReadinessCheck::Tcp { port: None }),
                    ),
                ],
            },
            timeout: Duration::from_secs(100),
            status: Status::Accepted,
            reason: None,
            queued_at: t(0),
            accepted_at: Some(t(1)),
            provisioning_at: None,
            running_at: None,
            finished_at: None,
            cleaned_up_at: None,
            cancel_requested: None,
            placement: [(
                name("s"),
                Placed {
                    pool: PoolName::new("local").unwrap(),
                    machine: MachineName::new("m").unwrap(),
                },
            )]
            .into(),
            components: BTreeMap::new(),
            logs: BTreeMap::new(),
        }
    }

    fn started(record: &mut Record, n: &str, health: Health) {
        record.components.insert(
            name(n),
            Component {
                starting_at: Some(t(1)),
                started: Some(Started {
                    address: format!("127.0.0.1:{}", n.len()),
                    at: t(1),
                }),
                health,
                detail: None,
                health_at: None,
            },
        );
    }

    fn running(address: &str) -> Observed {
        Observed::Running {
            address: address.into(),
        }
    }

    #[test]
    fn servers_start_first_and_each_must_be_ready_before_the_next() {
        let mut r = record();
        let none = BTreeMap::new();
        assert_eq!(
            next(&r, &none, t(2)),
            Step::Start {
                component: name("s")
            }
        );
        started(&mut r, "s", Health::Unknown);
        let seen = [(name("s"), running("a:1"))].into();
        assert!(matches!(next(&r, &seen, t(2)), Step::Probe { .. }));
        started(&mut r, "s", Health::Ready);
        assert_eq!(
            next(&r, &seen, t(2)),
            Step::Start {
                component: name("d")
            }
        );
        started(&mut r, "d", Health::Unknown);
        let both = [(name("s"), running("a:1")), (name("d"), running("a:2"))].into();
        assert!(matches!(
            next(&r, &both, t(2)),
            Step::Health {
                health: Health::Ready,
                ..
            }
        ));
        started(&mut r, "d", Health::Ready);
        assert_eq!(next(&r, &both, t(2)), Step::Run);
        r.running_at = Some(t(3));
        assert_eq!(next(&r, &both, t(3)), Step::Wait);
    }

    #[test]
    fn a_component_found_running_after_a_crash_is_adopted_not_started_again() {
        let mut r = record();
        r.components.insert(
            name("s"),
            Component {
                starting_at: Some(t(1)),
                ..Component::default()
            },
        );
        let seen = [(name("s"), running("a:1"))].into();
        assert_eq!(
            next(&r, &seen, t(2)),
            Step::Adopt {
                component: name("s"),
                address: "a:1".into()
            }
        );
        // Recorded as starting but nothing there: the start never reached the backend.
        assert_eq!(
            next(&r, &BTreeMap::new(), t(2)),
            Step::Start {
                component: name("s")
            }
        );
    }

    #[test]
    fn the_driver_exiting_decides_the_outcome_after_its_health_is_recorded() {
        let mut r = record();
        started(&mut r, "s", Health::Ready);
        started(&mut r, "d", Health::Ready);
        r.running_at = Some(t(2));
        let exited = |code| {
            BTreeMap::from([
                (name("s"), running("a:1")),
                (
                    name("d"),
                    Observed::Exited {
                        address: "a:2".into(),
                        code,
                    },
                ),
            ])
        };
        assert_eq!(
            next(&r, &exited(0), t(3)),
            Step::Health {
                component: name("d"),
                health: Health::Succeeded,
                detail: Some("exited 0".into())
            }
        );
        started(&mut r, "d", Health::Succeeded);
        assert!(matches!(
            next(&r, &exited(0), t(3)),
            Step::Finish {
                outcome: Outcome::Done,
                ..
            }
        ));
        started(&mut r, "d", Health::Failed);
        r.components.get_mut(&name("d")).unwrap().detail = Some("exited with code 1".into());
        assert_eq!(
            next(&r, &exited(1), t(3)),
            Step::Finish {
                outcome: Outcome::Error,
                reason: Some("driver d exited with code 1".into())
            }
        );
    }

    #[test]
    fn a_terminal_health_recorded_is_never_proposed_again() {
        let mut r = record();
        started(&mut r, "s", Health::Ready);
        started(&mut r, "d", Health::Failed);
        r.running_at = Some(t(2));
        let seen = [
            (name("s"), running("a:1")),
            (
                name("d"),
                Observed::Exited {
                    address: "a:2".into(),
                    code: 0,
                },
            ),
        ]
        .into();
        assert!(
            matches!(
                next(&r, &seen, t(3)),
                Step::Finish {
                    outcome: Outcome::Error,
                    ..
                }
            ),
            "{:?}",
            next(&r, &seen, t(3))
        );
    }

    #[test]
    fn a_started_component_that_is_pending_is_waited_for_then_fails_with_the_reason() {
        let mut r = record();
        r.components.insert(
            name("s"),
            Component {
                starting_at: Some(t(1)),
                ..Component::default()
            },
        );
        let pending = [(name("s"), Observed::Pending)].into();
        assert_eq!(next(&r, &pending, t(2)), Step::Wait);
        let failed = [(
            name("s"),
            Observed::Failed {
                address: None,
                why: "ImagePullBackOff".into(),
            },
        )]
        .into();
        assert_eq!(
            next(&r, &failed, t(2)),
            Step::Health {
                component: name("s"),
                health: Health::Failed,
                detail: Some("ImagePullBackOff".into()),
            }
        );
        r.components.get_mut(&name("s")).unwrap().health = Health::Failed;
        assert!(matches!(
            next(&r, &failed, t(2)),
            Step::Finish {
                outcome: Outcome::Error,
                ..
            }
        ));
    }

    #[test]
    fn a_started_component_the_backend_lost_is_an_internal_error() {
        let mut r = record();
        started(&mut r, "s", Health::Ready);
        let nothing = BTreeMap::new();
        assert_eq!(
            next(&r, &nothing, t(2)),
            Step::Health {
                component: name("s"),
                health: Health::Failed,
                detail: Some("the backend has nothing of it any more".into()),
            }
        );
        r.components.get_mut(&name("s")).unwrap().health = Health::Failed;
        assert!(matches!(
            next(&r, &nothing, t(2)),
            Step::Finish {
                outcome: Outcome::InternalError,
                ..
            }
        ));
    }

    #[test]
    fn a_vanished_process_is_an_internal_error() {
        let mut r = record();
        started(&mut r, "s", Health::Failed);
        let seen = [(
            name("s"),
            Observed::Vanished {
                address: None,
                why: "gone".into(),
            },
        )]
        .into();
        assert!(matches!(
            next(&r, &seen, t(2)),
            Step::Finish {
                outcome: Outcome::InternalError,
                ..
            }
        ));
    }

    #[test]
    fn past_its_deadline_or_cancelled_it_finishes_with_an_error() {
        let mut r = record();
        assert!(matches!(
            next(&r, &BTreeMap::new(), t(101)),
            Step::Finish { outcome: Outcome::Error, reason: Some(reason) } if reason.starts_with("timeout")
        ));
        r.cancel_requested = Some(t(2));
        assert_eq!(
            next(&r, &BTreeMap::new(), t(3)),
            Step::Finish {
                outcome: Outcome::Error,
                reason: Some("cancelled".into())
            }
        );
    }

    #[test]
    fn once_finished_the_driver_log_is_stored_then_everything_is_cleaned_up() {
        let mut r = record();
        started(&mut r, "s", Health::Ready);
        started(&mut r, "d", Health::Failed);
        r.status = Status::Error;
        let seen = [(name("s"), running("a:1")), (name("d"), running("a:2"))].into();
        assert_eq!(
            next(&r, &seen, t(5)),
            Step::StoreLog {
                component: name("d")
            }
        );
        r.logs.insert(
            name("d"),
            crate::domain::sessions::session::StoredLog {
                object: "o".into(),
                bytes: 0,
                tail: String::new(),
            },
        );
        assert_eq!(next(&r, &seen, t(5)), Step::CleanUp);
        r.cleaned_up_at = Some(t(6));
        assert_eq!(next(&r, &seen, t(6)), Step::Done);
    }

    #[test]
    fn a_queued_session_waits() {
        let mut r = record();
        r.accepted_at = None;
        r.status = Status::Queued;
        assert_eq!(next(&r, &BTreeMap::new(), t(1000)), Step::Wait);
    }
}
