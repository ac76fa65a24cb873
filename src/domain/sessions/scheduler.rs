//! The scheduler: the pools, the queue of waiting sessions and what each running session holds,
//! in one entity, so every admission is decided against one consistent picture.
//!
//! **Gang reservation.** A session is admitted only when every machine it needs, in every pool,
//! is free at once, and an executor is free (`executor_count`, strictly: a session counts from
//! admission until it is released after its cleanup).
//!
//! **First fit, without starvation.** The queue is walked oldest first, and any session that
//! fits is admitted, also past one that does not. But the first session that does not fit, the
//! oldest waiting, *holds* what it needs: the free machines it lacks and one executor are kept
//! from every session behind it. So it is admitted as soon as the sessions that were running
//! when it became the oldest waiting have released enough: nothing admitted after that takes a
//! machine or the executor it waits for. Smaller sessions still run meanwhile on what it does
//! not need (backfill).
//!
//! A session that can never fit (more machines than a pool has) or names an unknown pool is
//! refused at `enqueue`; if the pools change so that a waiting one can no longer fit, it is
//! taken off the queue with a reason (`scheduler.refused`), never left to wait for ever.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{MachineName, PoolName, SchedulerId, SessionId};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

/// One pool as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolSpec {
    pub name: PoolName,
    /// Its machines, each running one component at a time.
    pub machines: Vec<MachineName>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A cloud pool grows to this many machines as sessions wait for them (its machines are
    /// the instances ready now); 0: its machines are all it ever has.
    #[serde(default)]
    pub max_machines: u32,
}

impl PoolSpec {
    /// The most machines it can have: what a session may ask of it.
    pub fn capacity(&self) -> usize {
        self.machines.len().max(self.max_machines as usize)
    }
}

/// `PoolSpec` as `scheduler.configured` v1 wrote it, before cloud pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "PoolSpec")]
pub struct PoolSpecV1 {
    pub name: PoolName,
    /// Its machines, each running one component at a time.
    pub machines: Vec<MachineName>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Machines of one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolMachines {
    pub pool: PoolName,
    pub machines: Vec<MachineName>,
}

/// How many machines of one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolDemand {
    pub pool: PoolName,
    pub machines: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scheduler {
    pub pools: BTreeMap<PoolName, PoolSpec>,
    pub executor_count: u32,
    /// Oldest first.
    pub queue: Vec<Waiting>,
    pub running: BTreeMap<SessionId, Admitted>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    pub session: SessionId,
    pub demand: BTreeMap<PoolName, u32>,
    pub since: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Admitted {
    pub machines: BTreeMap<PoolName, Vec<MachineName>>,
    pub since: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SchedulerCommand {
    /// The pools and executor count from configuration; changes nothing when they are the
    /// same.
    Configure {
        pools: Vec<PoolSpec>,
        executor_count: u32,
    },
    /// Put a session in the queue (nothing if it is queued or running already).
    Enqueue {
        session: SessionId,
        demand: BTreeMap<PoolName, u32>,
    },
    /// A session is over: give back what it holds, or take it off the queue.
    Release { session: SessionId },
    /// A cloud pool's machines now (its instance set's ready workers). Nothing when they are
    /// what it has.
    SetMachines {
        pool: PoolName,
        machines: Vec<MachineName>,
    },
}

event_set! {
    pub enum SchedulerEvent {
        Configured(Configured) = "scheduler.configured" @ 2 older { 1 => ConfiguredV1 },
        Enqueued(Enqueued) = "scheduler.enqueued" @ 1,
        Admitted(AdmittedEvent) = "scheduler.admitted" @ 1,
        Released(Released) = "scheduler.released" @ 1,
        Refused(Refused) = "scheduler.refused" @ 1,
        MachinesSet(MachinesSet) = "scheduler.machines_set" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Configured {
    pub pools: Vec<PoolSpec>,
    pub executor_count: u32,
    pub at: Timestamp,
}

/// `scheduler.configured` before cloud pools: every pool's machines were all it had.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfiguredV1 {
    pub pools: Vec<PoolSpecV1>,
    pub executor_count: u32,
    pub at: Timestamp,
}

impl From<ConfiguredV1> for Configured {
    fn from(old: ConfiguredV1) -> Self {
        Configured {
            pools: old
                .pools
                .into_iter()
                .map(|p| PoolSpec {
                    name: p.name,
                    machines: p.machines,
                    labels: p.labels,
                    max_machines: 0,
                })
                .collect(),
            executor_count: old.executor_count,
            at: old.at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Enqueued {
    pub session: SessionId,
    pub demand: Vec<PoolDemand>,
    pub at: Timestamp,
}

/// Every machine the session needs is its own until it is released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AdmittedEvent {
    pub session: SessionId,
    pub machines: Vec<PoolMachines>,
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// It was admitted, and is over: its machines are free again.
    Finished,
    /// It was still waiting (cancelled, or failed before admission).
    Withdrawn,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Released {
    pub session: SessionId,
    pub reason: ReleaseReason,
    pub at: Timestamp,
}

/// A cloud pool grew or shrank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MachinesSet {
    pub pool: PoolName,
    pub machines: Vec<MachineName>,
    pub at: Timestamp,
}

/// A waiting session can no longer fit the pools as configured now: off the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Refused {
    pub session: SessionId,
    pub reason: String,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("pool {pool:?} does not exist; pools: {known}")]
    UnknownPool { pool: String, known: String },
    #[error(
        "pool {pool:?} has {capacity} machines and the session needs {needs}: it can never run"
    )]
    ExceedsCapacity {
        pool: String,
        needs: u32,
        capacity: usize,
    },
    #[error("executor_count must be at least 1")]
    NoExecutors,
    #[error("pool {pool:?} is configured twice")]
    DuplicatePool { pool: String },
    #[error("machine {machine:?} of pool {pool:?} is listed twice")]
    DuplicateMachine { pool: String, machine: String },
    #[error("pool {pool:?} is not a cloud pool: its machines are configured")]
    FixedPool { pool: String },
    #[error("pool {pool:?} grows to {max} machines, not {machines}")]
    TooManyMachines {
        pool: String,
        machines: usize,
        max: u32,
    },
}

/// The reason on `not_found` for a pool that does not exist.
pub const UNKNOWN_POOL: &str = "unknown_pool";
/// The reason on `capacity` for a session larger than a pool.
pub const EXCEEDS_POOL_CAPACITY: &str = "exceeds_pool_capacity";

impl Rejection for SchedulerError {
    fn kind(&self) -> ErrorKind {
        match self {
            SchedulerError::UnknownPool { .. } => ErrorKind::NotFound,
            SchedulerError::ExceedsCapacity { .. } => ErrorKind::Capacity,
            SchedulerError::NoExecutors
            | SchedulerError::DuplicatePool { .. }
            | SchedulerError::DuplicateMachine { .. }
            | SchedulerError::FixedPool { .. }
            | SchedulerError::TooManyMachines { .. } => ErrorKind::Invalid,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            SchedulerError::UnknownPool { .. } => Some(UNKNOWN_POOL),
            SchedulerError::ExceedsCapacity { .. } => Some(EXCEEDS_POOL_CAPACITY),
            _ => None,
        }
    }
}

/// Why a session waits, and where it is in the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Wait {
    /// 1 for the oldest waiting session.
    pub position: usize,
    /// Sessions waiting in all.
    pub of: usize,
    pub reason: String,
}

/// One pool as readers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolView {
    pub name: PoolName,
    pub machines: Vec<MachineName>,
    pub capacity: usize,
    /// A cloud pool: how many machines it grows to (0: a fixed pool).
    pub max_machines: u32,
    /// Machines held by admitted sessions.
    pub reserved: usize,
    pub free: usize,
    /// Machines the waiting sessions need of this pool, in all.
    pub waiting: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SchedulerView {
    pub pools: Vec<PoolView>,
    pub executor_count: u32,
    /// Sessions admitted and not yet released, with their machines.
    pub running: Vec<RunningView>,
    /// Sessions waiting, oldest first, with what they need.
    pub queue: Vec<WaitingView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunningView {
    pub session: SessionId,
    pub machines: Vec<PoolMachines>,
    pub since: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WaitingView {
    pub session: SessionId,
    pub demand: Vec<PoolDemand>,
    pub since: Timestamp,
}

impl SchedulerView {
    /// The scheduler this view shows, for questions asked of it elsewhere (why a session
    /// waits).
    pub fn scheduler(&self) -> Scheduler {
        Scheduler {
            pools: self
                .pools
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        PoolSpec {
                            name: p.name.clone(),
                            machines: p.machines.clone(),
                            labels: p.labels.clone(),
                            max_machines: p.max_machines,
                        },
                    )
                })
                .collect(),
            executor_count: self.executor_count,
            queue: self
                .queue
                .iter()
                .map(|w| Waiting {
                    session: w.session.clone(),
                    demand: w
                        .demand
                        .iter()
                        .map(|d| (d.pool.clone(), d.machines))
                        .collect(),
                    since: w.since,
                })
                .collect(),
            running: self
                .running
                .iter()
                .map(|r| {
                    (
                        r.session.clone(),
                        Admitted {
                            machines: r
                                .machines
                                .iter()
                                .map(|m| (m.pool.clone(), m.machines.clone()))
                                .collect(),
                            since: r.since,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// The reply to every scheduler command: where it stands afterwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SchedulerReply {
    pub running: usize,
    pub waiting: usize,
}

impl Scheduler {
    /// Whether a session needing `demand` could ever run here.
    pub fn check_fits(&self, demand: &BTreeMap<PoolName, u32>) -> Result<(), SchedulerError> {
        for (pool, needs) in demand {
            let Some(spec) = self.pools.get(pool) else {
                return Err(SchedulerError::UnknownPool {
                    pool: pool.to_string(),
                    known: self.pool_names(),
                });
            };
            if *needs as usize > spec.capacity() {
                return Err(SchedulerError::ExceedsCapacity {
                    pool: pool.to_string(),
                    needs: *needs,
                    capacity: spec.capacity(),
                });
            }
        }
        Ok(())
    }

    fn pool_names(&self) -> String {
        if self.pools.is_empty() {
            return "none".to_owned();
        }
        self.pools
            .keys()
            .map(PoolName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The machines of each pool no admitted session holds, in configured order.
    fn free(&self) -> BTreeMap<&PoolName, Vec<&MachineName>> {
        self.pools
            .iter()
            .map(|(name, spec)| {
                let held: Vec<&MachineName> = self
                    .running
                    .values()
                    .filter_map(|a| a.machines.get(name))
                    .flatten()
                    .collect();
                let free = spec.machines.iter().filter(|m| !held.contains(m)).collect();
                (name, free)
            })
            .collect()
    }

    /// What the oldest waiting session holds against later ones, if it waits: the free machines
    /// of each pool it needs (up to its need), and one executor.
    fn head_hold(&self) -> BTreeMap<PoolName, u32> {
        self.queue
            .first()
            .map(|head| head.demand.clone())
            .unwrap_or_default()
    }

    /// The sessions that can be admitted now, in queue order, with the machines each gets.
    pub fn admissions(&self) -> Vec<(SessionId, BTreeMap<PoolName, Vec<MachineName>>)> {
        let mut free: BTreeMap<PoolName, Vec<MachineName>> = self
            .free()
            .into_iter()
            .map(|(pool, machines)| (pool.clone(), machines.into_iter().cloned().collect()))
            .collect();
        let mut slots = (self.executor_count as usize).saturating_sub(self.running.len());
        let mut held: BTreeMap<PoolName, u32> = BTreeMap::new();
        let mut slot_held = false;
        let mut admitted = Vec::new();
        for waiting in &self.queue {
            if slots == 0 {
                break;
            }
            let available = |pool: &PoolName, free: &BTreeMap<PoolName, Vec<MachineName>>| {
                let have = free.get(pool).map_or(0, Vec::len);
                have.saturating_sub(held.get(pool).copied().unwrap_or(0) as usize)
            };
            let fits = waiting
                .demand
                .iter()
                .all(|(pool, needs)| available(pool, &free) >= *needs as usize);
            if fits && slots > usize::from(slot_held) {
                let mut machines = BTreeMap::new();
                for (pool, needs) in &waiting.demand {
                    let pool_free = free.entry(pool.clone()).or_default();
                    let taken: Vec<MachineName> = pool_free.drain(..*needs as usize).collect();
                    machines.insert(pool.clone(), taken);
                }
                slots -= 1;
                admitted.push((waiting.session.clone(), machines));
            } else if !slot_held {
                // The oldest session that waits holds what it needs from now on.
                held = waiting.demand.clone();
                slot_held = true;
            }
        }
        admitted
    }

    /// Why `session` waits, if it does.
    pub fn explain(&self, session: &SessionId) -> Option<Wait> {
        let index = self.queue.iter().position(|w| &w.session == session)?;
        let waiting = &self.queue[index];
        let free = self.free();
        let slots = (self.executor_count as usize).saturating_sub(self.running.len());
        let hold = if index == 0 {
            BTreeMap::new()
        } else {
            self.head_hold()
        };
        let mut lacking = Vec::new();
        let mut behind_head = false;
        for (pool, needs) in &waiting.demand {
            let have = free.get(pool).map_or(0, Vec::len);
            if have < *needs as usize {
                let spec = self.pools.get(pool);
                let grows = spec
                    .filter(|p| p.max_machines as usize > p.machines.len())
                    .map(|p| format!("; it grows to {} as instances boot", p.max_machines))
                    .unwrap_or_default();
                lacking.push(format!(
                    "{needs} machine{} of pool {pool} ({have} of {} free{grows})",
                    if *needs == 1 { "" } else { "s" },
                    spec.map_or(0, |p| p.machines.len())
                ));
            } else if have.saturating_sub(hold.get(pool).copied().unwrap_or(0) as usize)
                < *needs as usize
            {
                behind_head = true;
            }
        }
        let head = &self.queue[0].session;
        let reason = if !lacking.is_empty() {
            format!("needs {}", lacking.join(" and "))
        } else if slots == 0 {
            format!(
                "all {} executors are busy ({} sessions running)",
                self.executor_count,
                self.running.len()
            )
        } else if behind_head {
            format!("the machines it needs are kept for session {head}, which has waited longest")
        } else if index > 0 && slots <= 1 {
            format!("the last free executor is kept for session {head}, which has waited longest")
        } else {
            "about to be admitted".to_owned()
        };
        Some(Wait {
            position: index + 1,
            of: self.queue.len(),
            reason,
        })
    }

    pub fn view(&self) -> SchedulerView {
        let free = self.free();
        let pools = self
            .pools
            .values()
            .map(|spec| {
                let free = free.get(&spec.name).map_or(0, Vec::len);
                PoolView {
                    name: spec.name.clone(),
                    machines: spec.machines.clone(),
                    capacity: spec.machines.len(),
                    max_machines: spec.max_machines,
                    reserved: self
                        .running
                        .values()
                        .filter_map(|a| a.machines.get(&spec.name))
                        .map(Vec::len)
                        .sum(),
                    free,
                    waiting: self
                        .queue
                        .iter()
                        .filter_map(|w| w.demand.get(&spec.name))
                        .sum(),
                    labels: spec.labels.clone(),
                }
            })
            .collect();
        SchedulerView {
            pools,
            executor_count: self.executor_count,
            running: self
                .running
                .iter()
                .map(|(session, admitted)| RunningView {
                    session: session.clone(),
                    machines: admitted
                        .machines
                        .iter()
                        .map(|(pool, machines)| PoolMachines {
                            pool: pool.clone(),
                            machines: machines.clone(),
                        })
                        .collect(),
                    since: admitted.since,
                })
                .collect(),
            queue: self
                .queue
                .iter()
                .map(|w| WaitingView {
                    session: w.session.clone(),
                    demand: w
                        .demand
                        .iter()
                        .map(|(pool, machines)| PoolDemand {
                            pool: pool.clone(),
                            machines: *machines,
                        })
                        .collect(),
                    since: w.since,
                })
                .collect(),
        }
    }

    /// The events that admit whatever can be admitted once `events` are applied.
    fn with_admissions(
        &self,
        mut events: Vec<SchedulerEvent>,
        at: Timestamp,
    ) -> Vec<SchedulerEvent> {
        let mut after = self.clone();
        for event in &events {
            after.apply(event);
        }
        for (session, machines) in after.admissions() {
            events.push(SchedulerEvent::Admitted(AdmittedEvent {
                session,
                machines: machines
                    .into_iter()
                    .map(|(pool, machines)| PoolMachines { pool, machines })
                    .collect(),
                at,
            }));
        }
        events
    }
}

fn check_pools(pools: &[PoolSpec], executor_count: u32) -> Result<(), SchedulerError> {
    if executor_count == 0 {
        return Err(SchedulerError::NoExecutors);
    }
    let mut names = std::collections::BTreeSet::new();
    for pool in pools {
        if !names.insert(&pool.name) {
            return Err(SchedulerError::DuplicatePool {
                pool: pool.name.to_string(),
            });
        }
        let mut machines = std::collections::BTreeSet::new();
        for machine in &pool.machines {
            if !machines.insert(machine) {
                return Err(SchedulerError::DuplicateMachine {
                    pool: pool.name.to_string(),
                    machine: machine.to_string(),
                });
            }
        }
    }
    Ok(())
}

impl Aggregate for Scheduler {
    const KIND: &'static str = "scheduler";
    const SNAPSHOT_VERSION: u16 = 2;

    type Id = SchedulerId;
    type Command = SchedulerCommand;
    type Event = SchedulerEvent;
    type Reply = SchedulerReply;
    type View = SchedulerView;
    type Error = SchedulerError;

    fn decide(
        &self,
        _: &SchedulerId,
        command: &SchedulerCommand,
        cx: &Context,
    ) -> Result<Vec<SchedulerEvent>, SchedulerError> {
        let at = cx.now;
        let events = match command {
            SchedulerCommand::Configure {
                pools,
                executor_count,
            } => {
                check_pools(pools, *executor_count)?;
                // A cloud pool's machines are what its instance set said last, not configured.
                let pools: Vec<PoolSpec> = pools
                    .iter()
                    .map(|p| match self.pools.get(&p.name) {
                        Some(now) if p.max_machines > 0 && now.max_machines > 0 => PoolSpec {
                            machines: now.machines.clone(),
                            ..p.clone()
                        },
                        _ => p.clone(),
                    })
                    .collect();
                let pools = &pools;
                let same = *executor_count == self.executor_count
                    && pools.len() == self.pools.len()
                    && pools.iter().all(|p| self.pools.get(&p.name) == Some(p));
                if same {
                    return Ok(vec![]);
                }
                let mut events = vec![SchedulerEvent::Configured(Configured {
                    pools: pools.clone(),
                    executor_count: *executor_count,
                    at,
                })];
                let mut after = self.clone();
                after.apply(&events[0]);
                for waiting in &self.queue {
                    if let Err(err) = after.check_fits(&waiting.demand) {
                        events.push(SchedulerEvent::Refused(Refused {
                            session: waiting.session.clone(),
                            reason: err.to_string(),
                            at,
                        }));
                    }
                }
                events
            }
            SchedulerCommand::Enqueue { session, demand } => {
                if self.running.contains_key(session)
                    || self.queue.iter().any(|w| &w.session == session)
                {
                    return Ok(vec![]);
                }
                self.check_fits(demand)?;
                vec![SchedulerEvent::Enqueued(Enqueued {
                    session: session.clone(),
                    demand: demand
                        .iter()
                        .map(|(pool, machines)| PoolDemand {
                            pool: pool.clone(),
                            machines: *machines,
                        })
                        .collect(),
                    at,
                })]
            }
            SchedulerCommand::SetMachines { pool, machines } => {
                let Some(spec) = self.pools.get(pool) else {
                    return Err(SchedulerError::UnknownPool {
                        pool: pool.to_string(),
                        known: self.pool_names(),
                    });
                };
                if spec.max_machines == 0 {
                    return Err(SchedulerError::FixedPool {
                        pool: pool.to_string(),
                    });
                }
                if machines.len() > spec.max_machines as usize {
                    return Err(SchedulerError::TooManyMachines {
                        pool: pool.to_string(),
                        machines: machines.len(),
                        max: spec.max_machines,
                    });
                }
                let resized = PoolSpec {
                    machines: machines.clone(),
                    ..spec.clone()
                };
                check_pools(std::slice::from_ref(&resized), 1)?;
                if &spec.machines == machines {
                    return Ok(vec![]);
                }
                vec![SchedulerEvent::MachinesSet(MachinesSet {
                    pool: pool.clone(),
                    machines: machines.clone(),
                    at,
                })]
            }
            SchedulerCommand::Release { session } => {
                let reason = if self.running.contains_key(session) {
                    ReleaseReason::Finished
                } else if self.queue.iter().any(|w| &w.session == session) {
                    ReleaseReason::Withdrawn
                } else {
                    return Ok(vec![]);
                };
                vec![SchedulerEvent::Released(Released {
                    session: session.clone(),
                    reason,
                    at,
                })]
            }
        };
        Ok(self.with_admissions(events, at))
    }

    fn apply(&mut self, event: &SchedulerEvent) {
        match event {
            SchedulerEvent::Configured(e) => {
                self.pools = e
                    .pools
                    .iter()
                    .map(|p| (p.name.clone(), p.clone()))
                    .collect();
                self.executor_count = e.executor_count;
            }
            SchedulerEvent::Enqueued(e) => self.queue.push(Waiting {
                session: e.session.clone(),
                demand: e
                    .demand
                    .iter()
                    .map(|d| (d.pool.clone(), d.machines))
                    .collect(),
                since: e.at,
            }),
            SchedulerEvent::Admitted(e) => {
                self.queue.retain(|w| w.session != e.session);
                self.running.insert(
                    e.session.clone(),
                    Admitted {
                        machines: e
                            .machines
                            .iter()
                            .map(|m| (m.pool.clone(), m.machines.clone()))
                            .collect(),
                        since: e.at,
                    },
                );
            }
            SchedulerEvent::Released(e) => {
                self.queue.retain(|w| w.session != e.session);
                self.running.remove(&e.session);
            }
            SchedulerEvent::Refused(e) => self.queue.retain(|w| w.session != e.session),
            SchedulerEvent::MachinesSet(e) => {
                if let Some(spec) = self.pools.get_mut(&e.pool) {
                    spec.machines = e.machines.clone();
                }
            }
        }
    }

    fn reply(&self, _: &SchedulerId, _: &SchedulerCommand) -> SchedulerReply {
        SchedulerReply {
            running: self.running.len(),
            waiting: self.queue.len(),
        }
    }

    fn view(&self, _: &SchedulerId) -> Option<SchedulerView> {
        Some(self.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SchedulerId {
        SchedulerId::new(super::super::SCHEDULER).unwrap()
    }

    fn pool(name: &str, machines: usize) -> PoolSpec {
        PoolSpec {
            name: PoolName::new(name).unwrap(),
            machines: (0..machines)
                .map(|i| MachineName::new(format!("{name}-{i}")).unwrap())
                .collect(),
            labels: BTreeMap::new(),
            max_machines: 0,
        }
    }

    fn session(name: &str) -> SessionId {
        SessionId::new(name).unwrap()
    }

    fn demand(pairs: &[(&str, u32)]) -> BTreeMap<PoolName, u32> {
        pairs
            .iter()
            .map(|(p, n)| (PoolName::new(*p).unwrap(), *n))
            .collect()
    }

    /// Runs `command`, applies its events, and returns the sessions it admitted.
    fn run(scheduler: &mut Scheduler, command: SchedulerCommand, t: i64) -> Vec<String> {
        let cx = Context {
            now: Timestamp::from_unix_nanos(t),
        };
        let events = scheduler.decide(&id(), &command, &cx).unwrap();
        let mut admitted = Vec::new();
        for event in &events {
            if let SchedulerEvent::Admitted(e) = event {
                admitted.push(e.session.to_string());
            }
            scheduler.apply(event);
        }
        admitted
    }

    fn configured(pools: Vec<PoolSpec>, executors: u32) -> Scheduler {
        let mut scheduler = Scheduler::default();
        run(
            &mut scheduler,
            SchedulerCommand::Configure {
                pools,
                executor_count: executors,
            },
            0,
        );
        scheduler
    }

    fn enqueue(scheduler: &mut Scheduler, name: &str, pairs: &[(&str, u32)]) -> Vec<String> {
        run(
            scheduler,
            SchedulerCommand::Enqueue {
                session: session(name),
                demand: demand(pairs),
            },
            1,
        )
    }

    fn release(scheduler: &mut Scheduler, name: &str) -> Vec<String> {
        run(
            scheduler,
            SchedulerCommand::Release {
                session: session(name),
            },
            2,
        )
    }

    #[test]
    fn a_cloud_pool_takes_sessions_up_to_what_it_grows_to_and_runs_them_as_machines_come() {
        let mut elastic = pool("cloud", 0);
        elastic.max_machines = 3;
        let mut s = configured(vec![elastic.clone()], 4);
        assert_eq!(
            enqueue(&mut s, "one", &[("cloud", 2)]),
            Vec::<String>::new()
        );
        let wait = s.explain(&session("one")).unwrap();
        assert!(wait.reason.contains("grows to 3"), "{}", wait.reason);
        assert!(
            s.check_fits(&BTreeMap::from([(PoolName::new("cloud").unwrap(), 4)]))
                .is_err()
        );
        // Two instances booted: the pool has them, and the session runs.
        let two = pool("cloud", 2).machines;
        let admitted = run(
            &mut s,
            SchedulerCommand::SetMachines {
                pool: PoolName::new("cloud").unwrap(),
                machines: two.clone(),
            },
            5,
        );
        assert_eq!(admitted, ["one"]);
        assert_eq!(s.view().pools[0].max_machines, 3);
        // Configuration again (a restart) keeps what the instance set said.
        run(
            &mut s,
            SchedulerCommand::Configure {
                pools: vec![elastic],
                executor_count: 4,
            },
            6,
        );
        assert_eq!(s.pools[&PoolName::new("cloud").unwrap()].machines, two);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let refused = [
            (pool("cloud", 4).machines, "grows to 3"),
            (vec![two[0].clone(), two[0].clone()], "twice"),
        ];
        for (machines, why) in refused {
            let set = SchedulerCommand::SetMachines {
                pool: PoolName::new("cloud").unwrap(),
                machines,
            };
            let err = s.decide(&id(), &set, &cx).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        let fixed = configured(vec![pool("a", 1)], 1);
        let set = SchedulerCommand::SetMachines {
            pool: PoolName::new("a").unwrap(),
            machines: vec![],
        };
        assert!(matches!(
            fixed.decide(&id(), &set, &cx),
            Err(SchedulerError::FixedPool { .. })
        ));
    }

    #[test]
    fn configured_v1_upcasts_to_fixed_pools() {
        let v1 = ConfiguredV1 {
            pools: vec![PoolSpecV1 {
                name: PoolName::new("a").unwrap(),
                machines: vec![MachineName::new("m").unwrap()],
                labels: BTreeMap::new(),
            }],
            executor_count: 1,
            at: Timestamp::EPOCH,
        };
        let v2: Configured = v1.into();
        assert_eq!(v2.pools[0].max_machines, 0);
        assert_eq!(v2.pools[0].capacity(), 1);
    }

    #[test]
    fn a_session_takes_all_its_machines_at_once_or_waits() {
        let mut s = configured(vec![pool("a", 2), pool("b", 1)], 4);
        assert_eq!(enqueue(&mut s, "one", &[("a", 1), ("b", 1)]), ["one"]);
        // b is full: "two" waits though a has a machine free, and holds nothing of b yet.
        assert_eq!(
            enqueue(&mut s, "two", &[("a", 1), ("b", 1)]),
            Vec::<String>::new()
        );
        assert_eq!(
            s.view().pools[0].free,
            1,
            "nothing of a taken by a waiting session"
        );
        assert_eq!(release(&mut s, "one"), ["two"]);
        let machines = &s.running[&session("two")].machines;
        assert_eq!(machines[&PoolName::new("a").unwrap()].len(), 1);
        assert_eq!(machines[&PoolName::new("b").unwrap()].len(), 1);
    }

    #[test]
    fn unknown_pools_and_sessions_that_can_never_fit_are_refused_at_enqueue() {
        let s = configured(vec![pool("a", 2)], 1);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let unknown = s
            .decide(
                &id(),
                &SchedulerCommand::Enqueue {
                    session: session("x"),
                    demand: demand(&[("nope", 1)]),
                },
                &cx,
            )
            .unwrap_err();
        assert_eq!(unknown.kind(), ErrorKind::NotFound);
        assert_eq!(unknown.reason(), Some(UNKNOWN_POOL));
        let big = s
            .decide(
                &id(),
                &SchedulerCommand::Enqueue {
                    session: session("x"),
                    demand: demand(&[("a", 3)]),
                },
                &cx,
            )
            .unwrap_err();
        assert_eq!(big.kind(), ErrorKind::Capacity);
        assert_eq!(
            big.to_string(),
            "pool \"a\" has 2 machines and the session needs 3: it can never run"
        );
    }

    #[test]
    fn never_more_sessions_run_than_executors() {
        let mut s = configured(vec![pool("a", 10)], 2);
        let mut admitted = Vec::new();
        for name in ["s1", "s2", "s3", "s4"] {
            admitted.extend(enqueue(&mut s, name, &[("a", 1)]));
        }
        assert_eq!(admitted, ["s1", "s2"]);
        assert_eq!(s.running.len(), 2);
        assert_eq!(
            s.explain(&session("s3")).unwrap().reason,
            "all 2 executors are busy (2 sessions running)"
        );
        assert_eq!(release(&mut s, "s1"), ["s3"]);
        assert_eq!(s.running.len(), 2);
    }

    #[test]
    fn smaller_sessions_fill_in_but_never_take_what_the_oldest_waiting_one_needs() {
        // 4 machines; three small sessions run; a large one needing all four waits.
        let mut s = configured(vec![pool("a", 4)], 10);
        for name in ["small1", "small2", "small3"] {
            assert_eq!(enqueue(&mut s, name, &[("a", 1)]), [name]);
        }
        assert!(enqueue(&mut s, "large", &[("a", 4)]).is_empty());
        // A stream of small sessions: the free machine is held for the large one.
        for name in ["late1", "late2"] {
            assert!(
                enqueue(&mut s, name, &[("a", 1)]).is_empty(),
                "{name} waits"
            );
        }
        assert_eq!(
            s.explain(&session("late1")).unwrap().reason,
            "the machines it needs are kept for session large, which has waited longest"
        );
        assert_eq!(s.explain(&session("large")).unwrap().position, 1);
        assert_eq!(release(&mut s, "small1"), Vec::<String>::new());
        assert_eq!(release(&mut s, "small2"), Vec::<String>::new());
        // Once the sessions running when it started waiting are done, it runs.
        assert_eq!(release(&mut s, "small3"), ["large"]);
        assert_eq!(release(&mut s, "large"), ["late1", "late2"]);
    }

    #[test]
    fn a_small_session_runs_past_a_large_one_on_machines_it_does_not_need() {
        let mut s = configured(vec![pool("a", 2), pool("b", 2)], 10);
        assert_eq!(enqueue(&mut s, "a-user", &[("a", 2)]), ["a-user"]);
        assert!(enqueue(&mut s, "big", &[("a", 2)]).is_empty());
        assert_eq!(enqueue(&mut s, "b-user", &[("b", 1)]), ["b-user"]);
    }

    #[test]
    fn the_last_executor_is_kept_for_the_oldest_waiting_session() {
        let mut s = configured(vec![pool("a", 2), pool("b", 2)], 2);
        assert_eq!(enqueue(&mut s, "one", &[("a", 2)]), ["one"]);
        assert!(enqueue(&mut s, "big", &[("a", 2)]).is_empty());
        assert!(enqueue(&mut s, "other", &[("b", 1)]).is_empty());
        assert_eq!(
            s.explain(&session("other")).unwrap().reason,
            "the last free executor is kept for session big, which has waited longest"
        );
        assert_eq!(release(&mut s, "one"), ["big", "other"]);
    }

    #[test]
    fn a_release_of_a_waiting_session_withdraws_it_and_a_second_release_changes_nothing() {
        let mut s = configured(vec![pool("a", 1)], 1);
        enqueue(&mut s, "one", &[("a", 1)]);
        enqueue(&mut s, "two", &[("a", 1)]);
        release(&mut s, "two");
        assert!(s.queue.is_empty());
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let again = s
            .decide(
                &id(),
                &SchedulerCommand::Release {
                    session: session("two"),
                },
                &cx,
            )
            .unwrap();
        assert!(again.is_empty());
        let twice = s
            .decide(
                &id(),
                &SchedulerCommand::Enqueue {
                    session: session("one"),
                    demand: demand(&[("a", 1)]),
                },
                &cx,
            )
            .unwrap();
        assert!(
            twice.is_empty(),
            "enqueueing a running session again is nothing"
        );
    }

    #[test]
    fn the_view_holds_the_whole_scheduler() {
        let mut s = configured(vec![pool("a", 2)], 1);
        enqueue(&mut s, "one", &[("a", 1)]);
        enqueue(&mut s, "two", &[("a", 2)]);
        assert_eq!(s.view().scheduler(), s);
    }

    #[test]
    fn shrinking_a_pool_refuses_the_waiting_sessions_that_no_longer_fit() {
        let mut s = configured(vec![pool("a", 3)], 1);
        enqueue(&mut s, "one", &[("a", 1)]);
        enqueue(&mut s, "three", &[("a", 3)]);
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let events = s
            .decide(
                &id(),
                &SchedulerCommand::Configure {
                    pools: vec![pool("a", 2)],
                    executor_count: 1,
                },
                &cx,
            )
            .unwrap();
        assert!(matches!(&events[1], SchedulerEvent::Refused(r) if r.session.as_str() == "three"));
        let same = configured(vec![pool("a", 2)], 1)
            .decide(
                &id(),
                &SchedulerCommand::Configure {
                    pools: vec![pool("a", 2)],
                    executor_count: 1,
                },
                &cx,
            )
            .unwrap();
        assert!(
            same.is_empty(),
            "the same configuration again changes nothing"
        );
    }
}
