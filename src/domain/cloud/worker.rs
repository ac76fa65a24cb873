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

use crate::domain::Timestamp;

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
pub struct Worker {
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
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShutdownReason::Drained => "drained",
            ShutdownReason::Idle => "idle too long",
            ShutdownReason::NeverBooted => "did not boot in time",
            ShutdownReason::Broken => "its probes failed for too long",
        })
    }
}

/// Whether `worker` is to be shut down now, and why. A held worker never is.
pub fn shutdown_reason(
    worker: &Worker,
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
pub fn accepts_work(worker: &Worker) -> bool {
    worker.idle_behavior == IdleBehavior::Run
        && matches!(worker.state, WorkerState::Idle | WorkerState::Running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::EPOCH.saturating_add(Duration::from_secs(s))
    }

    fn worker(state: WorkerState, idle_behavior: IdleBehavior) -> Worker {
        Worker {
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
                &Worker {
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
        let done = Worker {
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
}
