//! One sync of an instance set, as a pure plan (arvados's `sync` and `autoscale` together):
//! from what the driver listed, what the log knows of the set's workers, which probes passed,
//! which workers sessions hold, and how many machines sessions want, what to do now.
//!
//! - an instance that carries the set's id and the log does not know is adopted;
//! - a worker the list no longer has is gone: disappeared, unless it was being shut down (only
//!   workers that appeared before the list was asked for: a create that returned meanwhile is
//!   not missing, just not listed yet);
//! - a booting or unknown worker whose probe passed has booted;
//! - a worker that work holds is busy, one that nothing holds any more is idle;
//! - a worker the shutdown rules name is shut down, but for idle ones that sessions waiting
//!   for the pool are about to take; one being shut down that is still listed is destroyed,
//!   and destroyed again each `timeout_shutdown` (10 s) while the list still has it;
//! - the machines wanted beyond those in hand are created.

use std::collections::{BTreeMap, BTreeSet};

use super::WorkerId;
use super::worker::{
    IdleBehavior, ShutdownReason, Timeouts, WorkerRecord, WorkerState, shutdown_reason,
};
use crate::domain::Timestamp;

/// One instance as the driver lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: WorkerId,
    pub instance_type: String,
    pub address: Option<String>,
}

/// What a sync knows.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub listed: &'a [Listed],
    /// When the list was asked for.
    pub listed_at: Timestamp,
    /// The set's workers the log has, not yet gone.
    pub workers: &'a BTreeMap<WorkerId, WorkerRecord>,
    /// The last passing probe of each worker, as far as this process knows.
    pub probes: &'a BTreeMap<WorkerId, Timestamp>,
    /// When this process last destroyed each worker's instance (the driver said yes).
    pub destroyed: &'a BTreeMap<WorkerId, Timestamp>,
    /// Since when this process has probed: a booted worker it has not yet seen pass is
    /// counted as passing then (a restart does not make every worker look broken).
    pub probing_since: Timestamp,
    /// Workers that sessions hold now.
    pub in_use: &'a BTreeSet<WorkerId>,
    /// Machines of the pool that sessions hold or wait for.
    pub wanted: u32,
    pub timeouts: &'a Timeouts,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Adopt {
        id: WorkerId,
        instance_type: String,
        address: Option<String>,
    },
    Gone {
        id: WorkerId,
        disappeared: bool,
    },
    Boot {
        id: WorkerId,
        address: Option<String>,
    },
    Busy {
        id: WorkerId,
        busy: bool,
    },
    Shutdown {
        id: WorkerId,
        reason: ShutdownReason,
    },
    Destroy {
        id: WorkerId,
    },
    Create {
        count: u32,
    },
}

/// What to do now; see the module documentation.
pub fn plan(input: &Input<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let listed: BTreeMap<&WorkerId, &Listed> = input.listed.iter().map(|l| (&l.id, l)).collect();
    for (id, instance) in &listed {
        if !input.workers.contains_key(*id) {
            actions.push(Action::Adopt {
                id: (*id).clone(),
                instance_type: instance.instance_type.clone(),
                address: instance.address.clone(),
            });
        }
    }
    let mut in_hand = 0u32;
    // Idle workers that waiting sessions are about to take are not idle for long: as many as
    // wait are kept from the idle timeout (arvados shuts down only the excess).
    let mut needed_idle = (input.wanted as usize).saturating_sub(input.in_use.len());
    for (id, worker) in input.workers {
        let Some(instance) = listed.get(id) else {
            if worker.appeared_at < input.listed_at {
                actions.push(Action::Gone {
                    id: id.clone(),
                    disappeared: worker.state != WorkerState::Shutdown,
                });
            }
            continue;
        };
        if worker.state == WorkerState::Shutdown {
            let again_at = input
                .destroyed
                .get(id)
                .map(|at| at.saturating_add(input.timeouts.shutdown));
            if again_at.is_none_or(|again| input.now >= again) {
                actions.push(Action::Destroy { id: id.clone() });
            }
            continue;
        }
        let probed = input.probes.get(id).copied();
        let mut facts = worker.facts(probed.or_else(|| {
            worker
                .booted_at
                .map(|booted| booted.max(input.probing_since))
        }));
        if matches!(worker.state, WorkerState::Booting | WorkerState::Unknown) && probed.is_some() {
            actions.push(Action::Boot {
                id: id.clone(),
                address: instance.address.clone(),
            });
            facts.state = WorkerState::Idle;
            facts.busy_at = input.now;
        }
        if matches!(facts.state, WorkerState::Idle | WorkerState::Running) {
            let busy = input.in_use.contains(id);
            if busy != (facts.state == WorkerState::Running) {
                actions.push(Action::Busy {
                    id: id.clone(),
                    busy,
                });
                facts.state = if busy {
                    WorkerState::Running
                } else {
                    WorkerState::Idle
                };
                facts.running = busy;
                facts.busy_at = input.now;
            }
        }
        let reason = shutdown_reason(&facts, input.timeouts, input.now);
        if reason == Some(ShutdownReason::Idle) && needed_idle > 0 {
            needed_idle -= 1;
            in_hand += 1;
            continue;
        }
        if let Some(reason) = reason {
            actions.push(Action::Shutdown {
                id: id.clone(),
                reason,
            });
            continue;
        }
        if worker.idle_behavior == IdleBehavior::Run {
            in_hand += 1;
        }
    }
    // Adopted instances count as in hand too: they may be what is wanted.
    in_hand += actions
        .iter()
        .filter(|a| matches!(a, Action::Adopt { .. }))
        .count() as u32;
    let count = input.wanted.saturating_sub(in_hand);
    if count > 0 {
        actions.push(Action::Create { count });
    }
    actions
}

/// The machines a pool offers: workers that have booted and are not being shut down, that
/// take work or that work holds, oldest first.
pub fn machines(workers: &BTreeMap<WorkerId, WorkerRecord>) -> Vec<WorkerId> {
    let mut ready: Vec<(&WorkerId, &WorkerRecord)> = workers
        .iter()
        .filter(|(_, w)| {
            !w.is_gone()
                && (w.state == WorkerState::Running
                    || (w.state == WorkerState::Idle && w.idle_behavior == IdleBehavior::Run))
        })
        .collect();
    ready.sort_by_key(|(id, w)| (w.appeared_at, (*id).clone()));
    ready.into_iter().map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::sessions::PoolName;

    fn at(s: u64) -> Timestamp {
        Timestamp::EPOCH.saturating_add(Duration::from_secs(s))
    }

    fn id(name: &str) -> WorkerId {
        WorkerId::new(name).unwrap()
    }

    fn worker(state: WorkerState, appeared: u64) -> WorkerRecord {
        WorkerRecord {
            set: PoolName::new("workers").unwrap(),
            instance_type: "small".into(),
            address: Some("127.0.0.1:1".into()),
            state,
            idle_behavior: IdleBehavior::Run,
            created: true,
            appeared_at: at(appeared),
            booted_at: (state != WorkerState::Booting).then(|| at(appeared)),
            busy_at: at(appeared),
            shutdown: None,
            gone: None,
        }
    }

    fn listed(name: &str) -> Listed {
        Listed {
            id: id(name),
            instance_type: "small".into(),
            address: Some("127.0.0.1:1".into()),
        }
    }

    struct Case {
        listed: Vec<Listed>,
        workers: BTreeMap<WorkerId, WorkerRecord>,
        probes: BTreeMap<WorkerId, Timestamp>,
        destroyed: BTreeMap<WorkerId, Timestamp>,
        in_use: BTreeSet<WorkerId>,
        wanted: u32,
        now: u64,
        since: u64,
    }

    impl Case {
        fn new(now: u64) -> Self {
            Self {
                since: 0,
                listed: Vec::new(),
                workers: BTreeMap::new(),
                probes: BTreeMap::new(),
                destroyed: BTreeMap::new(),
                in_use: BTreeSet::new(),
                wanted: 0,
                now,
            }
        }

        fn plan(&self) -> Vec<Action> {
            plan(&Input {
                listed: &self.listed,
                listed_at: at(self.now),
                workers: &self.workers,
                probes: &self.probes,
                destroyed: &self.destroyed,
                probing_since: at(self.since),
                in_use: &self.in_use,
                wanted: self.wanted,
                timeouts: &Timeouts::default(),
                now: at(self.now),
            })
        }
    }

    #[test]
    fn what_waits_is_created_less_what_is_in_hand_and_strangers_are_adopted() {
        let mut case = Case::new(10);
        case.wanted = 3;
        case.workers
            .insert(id("a"), worker(WorkerState::Booting, 5));
        case.listed = vec![listed("a"), listed("found")];
        assert_eq!(
            case.plan(),
            [
                Action::Adopt {
                    id: id("found"),
                    instance_type: "small".into(),
                    address: Some("127.0.0.1:1".into())
                },
                Action::Create { count: 1 }
            ]
        );
        // Held or drained workers are not in hand.
        case.workers.get_mut(&id("a")).unwrap().idle_behavior = IdleBehavior::Hold;
        assert!(case.plan().contains(&Action::Create { count: 2 }));
    }

    #[test]
    fn a_missing_worker_disappeared_unless_it_was_shut_down_or_is_newer_than_the_list() {
        let mut case = Case::new(10);
        case.workers.insert(id("old"), worker(WorkerState::Idle, 1));
        case.workers
            .insert(id("stopping"), worker(WorkerState::Shutdown, 1));
        // Created after the list was asked for: not listed yet, not missing.
        case.workers
            .insert(id("new"), worker(WorkerState::Booting, 10));
        assert_eq!(
            case.plan(),
            [
                Action::Gone {
                    id: id("old"),
                    disappeared: true
                },
                Action::Gone {
                    id: id("stopping"),
                    disappeared: false
                },
            ]
        );
    }

    #[test]
    fn probes_boot_workers_and_work_makes_them_busy_then_idle() {
        let mut case = Case::new(10);
        case.wanted = 1;
        case.workers
            .insert(id("a"), worker(WorkerState::Booting, 1));
        case.listed = vec![listed("a")];
        assert!(case.plan().is_empty());
        case.probes.insert(id("a"), at(9));
        case.in_use.insert(id("a"));
        assert_eq!(
            case.plan(),
            [
                Action::Boot {
                    id: id("a"),
                    address: Some("127.0.0.1:1".into())
                },
                Action::Busy {
                    id: id("a"),
                    busy: true
                }
            ]
        );
        case.workers
            .insert(id("a"), worker(WorkerState::Running, 1));
        case.in_use.clear();
        assert_eq!(
            case.plan(),
            [Action::Busy {
                id: id("a"),
                busy: false
            }]
        );
    }

    #[test]
    fn idle_and_never_booted_workers_are_shut_down_and_destroyed_until_gone() {
        let mut case = Case::new(700);
        case.workers
            .insert(id("idle"), worker(WorkerState::Idle, 1));
        case.workers
            .insert(id("stuck"), worker(WorkerState::Booting, 1));
        case.workers
            .insert(id("going"), worker(WorkerState::Shutdown, 1));
        case.probes.insert(id("idle"), at(699));
        case.listed = vec![listed("idle"), listed("stuck"), listed("going")];
        assert_eq!(
            case.plan(),
            [
                Action::Destroy { id: id("going") },
                Action::Shutdown {
                    id: id("idle"),
                    reason: ShutdownReason::Idle
                },
                Action::Shutdown {
                    id: id("stuck"),
                    reason: ShutdownReason::NeverBooted
                },
            ]
        );
        // Destroyed 5 s ago and still listed: destroyed again once timeout_shutdown (10 s)
        // has passed since, not at every sync.
        case.destroyed.insert(id("going"), at(695));
        assert!(!case.plan().contains(&Action::Destroy { id: id("going") }));
        case.now = 705;
        assert!(case.plan().contains(&Action::Destroy { id: id("going") }));
        case.now = 700;
        case.destroyed.clear();
        // An idle worker that a waiting session is about to take stays.
        case.wanted = 1;
        assert!(
            !case
                .plan()
                .iter()
                .any(|a| matches!(a, Action::Shutdown { id: i, .. } if i == &id("idle")))
        );
        assert!(
            !case
                .plan()
                .iter()
                .any(|a| matches!(a, Action::Create { .. }))
        );
        case.wanted = 0;
        // A held worker stays, however long idle.
        case.workers.get_mut(&id("idle")).unwrap().idle_behavior = IdleBehavior::Hold;
        assert!(
            !case
                .plan()
                .iter()
                .any(|a| matches!(a, Action::Shutdown { id: i, .. } if i == &id("idle")))
        );
    }

    #[test]
    fn a_worker_is_broken_after_its_probes_fail_for_the_probe_timeout_not_since_it_booted() {
        let mut case = Case::new(1000);
        case.wanted = 1;
        case.workers
            .insert(id("a"), worker(WorkerState::Running, 1));
        case.in_use.insert(id("a"));
        case.listed = vec![listed("a")];
        // Booted long ago, passed a probe a minute ago: not broken.
        case.probes.insert(id("a"), at(940));
        assert!(case.plan().is_empty(), "{:?}", case.plan());
        // Passed last 600 s ago: broken, and another is made for the session that holds it.
        case.probes.insert(id("a"), at(400));
        assert_eq!(
            case.plan(),
            [
                Action::Shutdown {
                    id: id("a"),
                    reason: ShutdownReason::Broken
                },
                Action::Create { count: 1 }
            ]
        );
        // Never seen to pass by a process that started probing recently: not yet.
        case.probes.clear();
        case.since = 900;
        assert!(case.plan().is_empty());
    }

    #[test]
    fn machines_are_booted_workers_that_take_work_or_hold_it() {
        let mut workers = BTreeMap::new();
        workers.insert(id("b"), worker(WorkerState::Idle, 2));
        workers.insert(id("a"), worker(WorkerState::Running, 3));
        workers.insert(id("booting"), worker(WorkerState::Booting, 1));
        workers.insert(id("stopping"), worker(WorkerState::Shutdown, 1));
        let mut held = worker(WorkerState::Idle, 1);
        held.idle_behavior = IdleBehavior::Hold;
        workers.insert(id("held"), held);
        let mut draining = worker(WorkerState::Running, 1);
        draining.idle_behavior = IdleBehavior::Drain;
        workers.insert(id("draining"), draining);
        assert_eq!(machines(&workers), [id("draining"), id("b"), id("a")]);
    }
}
