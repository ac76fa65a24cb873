//! The sync loop of each instance set (arvados's worker pool `sync`, `probe` and `autoscale`):
//! a reaction that follows `instance_set` entities and, on the replica that owns a set's
//! shard, runs one long job for it. Every `sync_interval` the job lists the set's instances
//! (by its id tag), probes each over SSH (the executor verifies the host first), reads what
//! sessions hold and wait for in the pool, and does what `domain::cloud::plan` says: adopt,
//! boot, busy or idle, shut down, destroy, create; then records the throttles in force and
//! gives the scheduler the pool's ready workers as its machines.
//!
//! Nothing here is remembered across restarts but the log: the workers' states are entities,
//! instances carry their set's id, and the last passing probe is simply probed again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use russh::keys::PrivateKey;
use serde::{Deserialize, Serialize};

use super::driver::{Instance, InstanceSet, InstanceSpec, tag};
use super::ssh::{self, ExecError, Executor, Target};
use super::throttled::{Refusal, Throttled};
use crate::config::{CloudConfig, CloudPoolConfig};
use crate::domain::cloud::instance_set::{InstanceSet as SetEntity, InstanceSetCommand, SetConfig};
use crate::domain::cloud::plan::{self, Action, Input, Listed};
use crate::domain::cloud::throttle::Counts;
use crate::domain::cloud::worker::{
    ShutdownReason, Timeouts, Worker, WorkerCommand, WorkerRecord, WorkerState,
};
use crate::domain::cloud::{InstanceSetId, WorkerId};
use crate::domain::sessions::scheduler::{Scheduler, SchedulerCommand};
use crate::domain::sessions::{MachineName, PoolName, SchedulerId};
use crate::domain::{Aggregate, Principal, Timestamp};
use crate::metrics::{Metrics, SetLabels, SetOutcomeLabels, WorkerStateLabels};
use crate::runtime::reaction::{Due, Observed, Reaction};
use crate::runtime::{Clock, CommandMeta, Entities, EntityTable, ProjectionHandle, error_chain};
use crate::store::StoreError;

/// What this process knows of one instance the last sync listed.
struct Known {
    /// As the driver listed it: where sessions' components reach the worker.
    instance: Instance,
    executor: Option<Arc<Executor>>,
    /// Its last passing probe.
    probed: Option<Timestamp>,
    /// When the driver last acknowledged destroying it.
    destroyed: Option<Timestamp>,
    /// Whether this process has had an SSH session with it.
    reached: bool,
}

/// One configured cloud pool, as this replica runs it.
pub struct Pool {
    pub id: InstanceSetId,
    pub name: PoolName,
    pub config: CloudPoolConfig,
    pub set: Arc<dyn InstanceSet>,
    pub throttled: Throttled,
    /// The instances the last sync listed; an instance no longer listed is forgotten.
    known: Mutex<BTreeMap<WorkerId, Known>>,
    /// Since when this process probes.
    probing_since: Timestamp,
}

impl Pool {
    pub fn new(
        id: InstanceSetId,
        name: PoolName,
        config: CloudPoolConfig,
        set: Arc<dyn InstanceSet>,
        throttled: Throttled,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            name,
            config,
            set,
            throttled,
            known: Mutex::new(BTreeMap::new()),
            probing_since: now,
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<WorkerId, Known>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Only this set's instances carry this tag.
    pub fn owned(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(tag::INSTANCE_SET.to_owned(), self.id.to_string())])
    }

    /// A new list: what it has is what this process knows of, as listed now.
    fn relist(&self, listed: &BTreeMap<WorkerId, &Instance>) {
        let mut known = self.known();
        known.retain(|id, _| listed.contains_key(id));
        for (id, instance) in listed {
            match known.get_mut(id) {
                Some(known) => known.instance = (*instance).clone(),
                None => {
                    known.insert(
                        id.clone(),
                        Known {
                            instance: (*instance).clone(),
                            executor: None,
                            probed: None,
                            destroyed: None,
                            reached: false,
                        },
                    );
                }
            }
        }
    }

    /// The executor of listed instance `id`, made once per instance and address.
    pub fn executor(&self, shared: &Shared, id: &WorkerId) -> Option<Arc<Executor>> {
        let mut known = self.known();
        let known = known.get_mut(id)?;
        let address = known.instance.address.clone()?;
        if let Some(executor) = &known.executor
            && executor.target().address == address
        {
            return Some(executor.clone());
        }
        let instance = &known.instance;
        let executor = Arc::new(Executor::new(
            Target {
                instance: instance.id.clone(),
                address,
                user: instance.remote_user.clone(),
                secret: instance.tags.get(tag::INSTANCE_SECRET).cloned(),
            },
            shared.key.clone(),
            self.set.clone(),
            shared.config.timeout_ssh,
        ));
        known.executor = Some(executor.clone());
        Some(executor)
    }

    /// Whether this is the first SSH session with `id` this process has had.
    fn first_reach(&self, id: &WorkerId) -> bool {
        self.known()
            .get_mut(id)
            .is_some_and(|known| !std::mem::replace(&mut known.reached, true))
    }

    /// One timestamp of every known instance that has it.
    fn times(&self, of: impl Fn(&Known) -> Option<Timestamp>) -> BTreeMap<WorkerId, Timestamp> {
        self.known()
            .iter()
            .filter_map(|(id, known)| Some((id.clone(), of(known)?)))
            .collect()
    }
}

/// What the sync jobs reach.
pub struct Shared {
    pub workers: Entities<Worker>,
    pub table: ProjectionHandle<EntityTable<Worker>>,
    pub sets: Entities<SetEntity>,
    pub scheduler: Entities<Scheduler>,
    pub pools: BTreeMap<InstanceSetId, Arc<Pool>>,
    pub key: Arc<PrivateKey>,
    /// The key instances let in, as an OpenSSH line.
    pub public_key: String,
    pub config: CloudConfig,
    pub clock: Clock,
    pub metrics: Metrics,
}

impl Shared {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            booting: self.config.timeout_booting,
            idle: self.config.timeout_idle,
            probe: self.config.timeout_probe,
            shutdown: self.config.timeout_shutdown,
        }
    }

    fn meta() -> CommandMeta {
        CommandMeta::fresh(Principal::system())
    }

    async fn worker(&self, id: &WorkerId, command: WorkerCommand) {
        if let Err(err) = self
            .workers
            .execute(id.clone(), command.clone(), Self::meta())
            .await
        {
            tracing::warn!(worker = %id, ?command, error = %error_chain(&err), "cannot record on the worker");
        }
    }

    fn boot_ended(&self, pool: &Pool, outcome: &str) {
        self.metrics
            .cloud_boots
            .get_or_create(&SetOutcomeLabels {
                set: pool.id.to_string(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The set's workers by type and state, and its oldest passing probe.
    fn gauge(
        &self,
        pool: &Pool,
        workers: &BTreeMap<WorkerId, WorkerRecord>,
        probes: &BTreeMap<WorkerId, Timestamp>,
    ) {
        let now = (self.clock)();
        let set = pool.id.to_string();
        let mut types: BTreeSet<&str> =
            workers.values().map(|w| w.instance_type.as_str()).collect();
        types.insert(pool.config.instance_type.as_str());
        for instance_type in types {
            for state in [
                WorkerState::Unknown,
                WorkerState::Booting,
                WorkerState::Idle,
                WorkerState::Running,
                WorkerState::Shutdown,
            ] {
                let count = workers
                    .values()
                    .filter(|w| w.instance_type == instance_type && w.state == state)
                    .count();
                let state = serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                self.metrics
                    .cloud_workers
                    .get_or_create(&WorkerStateLabels {
                        set: set.clone(),
                        instance_type: instance_type.to_owned(),
                        state,
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        let oldest = workers
            .iter()
            .filter(|(_, w)| matches!(w.state, WorkerState::Idle | WorkerState::Running))
            .map(|(id, _)| {
                let passed = probes.get(id).copied().unwrap_or(pool.probing_since);
                now.since(passed).as_secs()
            })
            .max()
            .unwrap_or(0);
        self.metrics
            .cloud_probe_age_seconds
            .get_or_create(&SetLabels { set })
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
    }

    /// The set's workers the log has, not yet gone.
    async fn workers_of(
        &self,
        set: &InstanceSetId,
    ) -> Result<BTreeMap<WorkerId, WorkerRecord>, String> {
        let set = PoolName::new(set.as_str()).map_err(|e| e.to_string())?;
        self.table
            .ask(move |table, _| {
                table
                    .rows()
                    .filter_map(|(id, row)| match &row.state {
                        Worker::Present(record) if record.set == set && !record.is_gone() => {
                            Some((id.clone(), record.clone()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .await
            .map_err(|e| format!("the worker table did not answer: {e}"))
    }
}

/// The reaction: one sync job per configured instance set.
#[derive(Clone)]
pub struct Sync {
    shared: Arc<Shared>,
}

impl Sync {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The instance sets the log has seen configured.
#[derive(Default, Serialize, Deserialize)]
pub struct Configured {
    pub sets: BTreeSet<String>,
}

impl Reaction for Sync {
    const NAME: &'static str = "cloud_sync";
    const STATE_VERSION: u16 = 1;
    type State = Configured;
    type Job = Arc<Pool>;

    fn kinds(&self) -> Vec<&'static str> {
        vec![SetEntity::KIND]
    }

    fn observe(&self, state: &mut Configured, seen: &Observed<'_>) -> Result<(), StoreError> {
        if seen.events::<SetEntity>()?.is_some() {
            state.sets.insert(seen.id.to_owned());
        }
        Ok(())
    }

    fn due(&self, state: &Configured, _now: Timestamp) -> Vec<Due<Arc<Pool>>> {
        state
            .sets
            .iter()
            .filter_map(|id| {
                let pool = self
                    .shared
                    .pools
                    .get(&InstanceSetId::new(id.clone()).ok()?)?;
                Some(Due {
                    kind: SetEntity::KIND,
                    id: id.clone(),
                    job: pool.clone(),
                })
            })
            .collect()
    }

    /// Syncs for as long as this replica owns the set (the job is aborted when it moves).
    fn run(&self, pool: Arc<Pool>) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            survey(&pool).await;
            loop {
                if let Err(err) = sync_once(&shared, &pool).await {
                    tracing::info!(set = %pool.id, error = %err, "instance set sync did not complete");
                }
                tokio::time::sleep(shared.config.sync_interval).await;
            }
        })
    }
}

/// Once, as this replica starts syncing a set: what the driver has that is not the set's,
/// which it leaves alone, in one line (arvados logs the same at start).
async fn survey(pool: &Pool) {
    let Ok(all) = pool.throttled.instances(&BTreeMap::new()).await else {
        return;
    };
    let (others, untagged) = strangers(&all, pool.id.as_str());
    if !others.is_empty() || untagged > 0 {
        tracing::info!(
            set = %pool.id,
            untagged,
            other_sets = ?others,
            "leaving alone the instances that are not this set's"
        );
    }
}

/// The instances that are not `set`'s: by the instance set they carry, and how many carry
/// none.
pub fn strangers(all: &[Instance], set: &str) -> (BTreeMap<String, usize>, usize) {
    let mut others: BTreeMap<String, usize> = BTreeMap::new();
    let mut untagged = 0;
    for instance in all {
        match instance.tags.get(tag::INSTANCE_SET) {
            Some(id) if id == set => {}
            Some(id) => *others.entry(id.clone()).or_default() += 1,
            None => untagged += 1,
        }
    }
    (others, untagged)
}

/// One sync; see the module documentation.
pub async fn sync_once(shared: &Shared, pool: &Pool) -> Result<(), String> {
    let listed_at = (shared.clock)();
    let instances = match pool.throttled.instances(&pool.owned()).await {
        Ok(instances) => instances,
        Err(refusal) => {
            record_holds(shared, pool, Counts::default()).await;
            return Err(format!("cannot list instances: {refusal}"));
        }
    };
    let by_id: BTreeMap<WorkerId, &Instance> = instances
        .iter()
        .filter_map(|i| Some((WorkerId::new(i.id.clone()).ok()?, i)))
        .collect();
    pool.relist(&by_id);
    let mut workers = shared.workers_of(&pool.id).await?;
    let passed = probe(shared, pool, &by_id, &mut workers).await;
    {
        let mut known = pool.known();
        for (id, at) in passed {
            if let Some(known) = known.get_mut(&id) {
                known.probed = Some(at);
            }
        }
    }
    let probes = pool.times(|known| known.probed);
    let (in_use, wanted) = demand(shared, &pool.name).await?;
    let listed: Vec<Listed> = by_id
        .iter()
        .map(|(id, i)| Listed {
            id: id.clone(),
            instance_type: i.instance_type.clone(),
            address: i.address.clone(),
        })
        .collect();
    let actions = plan::plan(&Input {
        listed: &listed,
        listed_at,
        workers: &workers,
        probes: &probes,
        destroyed: &pool.times(|known| known.destroyed),
        probing_since: pool.probing_since,
        in_use: &in_use,
        wanted,
        timeouts: &shared.timeouts(),
        now: (shared.clock)(),
    });
    let mut instances_now = u32::try_from(instances.len()).unwrap_or(u32::MAX);
    for action in actions {
        match action {
            Action::Adopt {
                id,
                instance_type,
                address,
            } => {
                tracing::info!(set = %pool.id, worker = %id, "adopting an instance that carries this set's id");
                shared
                    .worker(
                        &id,
                        WorkerCommand::Appear {
                            set: pool.name.clone(),
                            instance_type,
                            address,
                            created: false,
                        },
                    )
                    .await;
            }
            Action::Gone { id, disappeared } => {
                if disappeared {
                    tracing::warn!(set = %pool.id, worker = %id, "an instance disappeared from the driver's list");
                }
                shared
                    .worker(&id, WorkerCommand::Gone { disappeared })
                    .await;
                workers.remove(&id);
            }
            Action::Boot { id, address } => {
                shared.worker(&id, WorkerCommand::Boot { address }).await;
                if let Some(worker) = workers.get_mut(&id) {
                    worker.state = WorkerState::Idle;
                    if worker.created {
                        shared.boot_ended(pool, "booted");
                        shared
                            .metrics
                            .cloud_boot_seconds
                            .get_or_create(&SetLabels {
                                set: pool.id.to_string(),
                            })
                            .observe((shared.clock)().since(worker.appeared_at).as_secs_f64());
                    }
                }
            }
            Action::Busy { id, busy } => {
                shared.worker(&id, WorkerCommand::Busy { busy }).await;
                if let Some(worker) = workers.get_mut(&id) {
                    worker.state = if busy {
                        WorkerState::Running
                    } else {
                        WorkerState::Idle
                    };
                }
            }
            Action::Shutdown { id, reason } => {
                tracing::info!(set = %pool.id, worker = %id, %reason, "shutting a worker down");
                if reason == ShutdownReason::NeverBooted
                    && workers.get(&id).is_some_and(|w| w.created)
                {
                    shared.boot_ended(pool, "never_booted");
                }
                shared.worker(&id, WorkerCommand::Shutdown { reason }).await;
                if let Some(worker) = workers.get_mut(&id) {
                    worker.state = WorkerState::Shutdown;
                }
                destroy(shared, pool, &id).await;
            }
            Action::Destroy { id } => destroy(shared, pool, &id).await,
            Action::Create { count } => {
                instances_now = create(shared, pool, count, instances_now).await;
            }
        }
    }
    record_holds(
        shared,
        pool,
        Counts {
            instances: instances_now,
            creating: 0,
        },
    )
    .await;
    shared.gauge(pool, &workers, &probes);
    offer_machines(shared, pool, &workers).await
}

/// Probes every listed instance that is not being shut down; the last passing probe of each.
/// An instance that is refused (not the instance that was created) is shut down here.
async fn probe(
    shared: &Shared,
    pool: &Pool,
    listed: &BTreeMap<WorkerId, &Instance>,
    workers: &mut BTreeMap<WorkerId, WorkerRecord>,
) -> BTreeMap<WorkerId, Timestamp> {
    let probes = listed.keys().filter_map(|id| {
        let shutting_down = workers
            .get(id)
            .is_some_and(|w| w.state == WorkerState::Shutdown);
        if shutting_down {
            return None;
        }
        // Booting: the boot probe; booted: that the instance still answers.
        let booting = workers.get(id).is_none_or(|w| w.booted_at.is_none());
        let command = if booting {
            pool.config.boot_probe_command.as_str()
        } else {
            "true"
        };
        let executor = pool.executor(shared, id)?;
        Some(async move { (id.clone(), executor.execute(command, b"").await) })
    });
    let mut passed = BTreeMap::new();
    for (id, result) in futures::future::join_all(probes).await {
        if result.is_ok()
            && pool.first_reach(&id)
            && let Some(worker) = workers
                .get(&id)
                .filter(|w| w.created && w.booted_at.is_none())
        {
            shared
                .metrics
                .cloud_ssh_seconds
                .get_or_create(&SetLabels {
                    set: pool.id.to_string(),
                })
                .observe((shared.clock)().since(worker.appeared_at).as_secs_f64());
        }
        match result {
            Ok(output) if output.success() => {
                passed.insert(id, (shared.clock)());
            }
            Ok(output) => {
                tracing::info!(set = %pool.id, worker = %id, status = ?output.status, "probe failed");
            }
            Err(err) if err.refuses_instance() => {
                tracing::warn!(set = %pool.id, worker = %id, error = %err, "refusing an instance");
                if let Some(worker) = workers.get_mut(&id) {
                    if worker.created && worker.booted_at.is_none() {
                        shared.boot_ended(pool, "refused");
                    }
                    worker.state = WorkerState::Shutdown;
                    shared
                        .worker(
                            &id,
                            WorkerCommand::Shutdown {
                                reason: ShutdownReason::Refused,
                            },
                        )
                        .await;
                }
                destroy(shared, pool, &id).await;
            }
            Err(ExecError::Unreachable { .. }) => {}
            Err(err) => {
                tracing::info!(set = %pool.id, worker = %id, error = %err, "probe failed");
            }
        }
    }
    passed
}

/// The pool's machines that sessions hold, and how many machines sessions hold or wait for.
async fn demand(shared: &Shared, pool: &PoolName) -> Result<(BTreeSet<WorkerId>, u32), String> {
    let (view, _) = shared
        .scheduler
        .read(SchedulerId::sessions())
        .await
        .map_err(|e| format!("cannot read the scheduler: {}", error_chain(&e)))?;
    let Some(view) = view else {
        return Ok((BTreeSet::new(), 0));
    };
    let in_use: BTreeSet<WorkerId> = view
        .running
        .iter()
        .flat_map(|r| &r.machines)
        .filter(|m| &m.pool == pool)
        .flat_map(|m| &m.machines)
        .filter_map(|m| WorkerId::new(m.as_str()).ok())
        .collect();
    let waiting: u32 = view
        .queue
        .iter()
        .flat_map(|w| &w.demand)
        .filter(|d| &d.pool == pool)
        .map(|d| d.machines)
        .sum();
    let wanted = u32::try_from(in_use.len()).unwrap_or(u32::MAX) + waiting;
    Ok((in_use, wanted))
}

async fn destroy(shared: &Shared, pool: &Pool, id: &WorkerId) {
    match pool.throttled.destroy(id.as_str()).await {
        Ok(()) => {
            if let Some(known) = pool.known().get_mut(id) {
                known.destroyed = Some((shared.clock)());
            }
        }
        Err(err) => {
            tracing::info!(set = %pool.id, worker = %id, error = %err, "cannot destroy the instance yet");
        }
    }
}

/// Creates up to `count` instances, `max_concurrent_creates` at a time, until a throttle
/// holds or the driver fails; how many instances there are afterwards.
async fn create(shared: &Shared, pool: &Pool, count: u32, mut instances: u32) -> u32 {
    let mut left = count;
    let batch = pool.config.max_concurrent_creates.max(1);
    while left > 0 {
        let size = left.min(batch);
        let creates = (0..size).map(|n| {
            let secret = ssh::new_secret();
            let spec = InstanceSpec {
                instance_type: pool.config.instance_type.clone(),
                image: pool.config.image.clone(),
                tags: BTreeMap::from([
                    (tag::INSTANCE_SET.to_owned(), pool.id.to_string()),
                    (
                        tag::INSTANCE_TYPE.to_owned(),
                        pool.config.instance_type.clone(),
                    ),
                    (tag::IDLE_BEHAVIOR.to_owned(), "run".to_owned()),
                    (tag::INSTANCE_SECRET.to_owned(), secret.clone()),
                ]),
                init_command: ssh::init_command(&secret),
                public_key: shared.public_key.clone(),
            };
            let counts = Counts {
                instances,
                creating: n + 1,
            };
            async move {
                pool.throttled
                    .create(&spec, &pool.config.instance_type, counts)
                    .await
            }
        });
        let mut stop = false;
        for result in futures::future::join_all(creates).await {
            match result {
                Ok(instance) => {
                    // A crash here leaves a tagged instance the log does not know: adopted.
                    crate::failpoint::hit("cloud.after_create");
                    instances += 1;
                    let Ok(id) = WorkerId::new(instance.id.clone()) else {
                        tracing::warn!(set = %pool.id, instance = %instance.id, "the driver gave an instance an id that is not a valid worker id");
                        continue;
                    };
                    tracing::info!(set = %pool.id, worker = %id, "created an instance");
                    shared
                        .worker(
                            &id,
                            WorkerCommand::Appear {
                                set: pool.name.clone(),
                                instance_type: instance.instance_type,
                                address: instance.address,
                                created: true,
                            },
                        )
                        .await;
                }
                Err(Refusal::Held(hold)) => {
                    tracing::debug!(set = %pool.id, %hold, "not creating for now");
                    stop = true;
                }
                Err(Refusal::Driver(err)) => {
                    tracing::warn!(set = %pool.id, error = %err, "the driver did not create an instance");
                    stop = true;
                }
            }
        }
        if stop {
            break;
        }
        left -= size;
    }
    instances
}

/// Records the throttles in force when they changed.
async fn record_holds(shared: &Shared, pool: &Pool, counts: Counts) {
    let holds: Vec<String> = pool
        .throttled
        .holds(counts)
        .iter()
        .map(ToString::to_string)
        .collect();
    if let Err(err) = shared
        .sets
        .execute(
            pool.id.clone(),
            InstanceSetCommand::Holds { holds },
            Shared::meta(),
        )
        .await
    {
        tracing::info!(set = %pool.id, error = %error_chain(&err), "cannot record the throttles in force");
    }
}

/// Gives the scheduler the pool's machines now: its ready workers.
async fn offer_machines(
    shared: &Shared,
    pool: &Pool,
    workers: &BTreeMap<WorkerId, WorkerRecord>,
) -> Result<(), String> {
    let machines: Vec<MachineName> = plan::machines(workers)
        .iter()
        .filter_map(|id| MachineName::new(id.as_str()).ok())
        .collect();
    shared
        .scheduler
        .execute(
            SchedulerId::sessions(),
            SchedulerCommand::SetMachines {
                pool: pool.name.clone(),
                machines,
            },
            Shared::meta(),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "cannot give the scheduler the pool's machines: {}",
                error_chain(&e)
            )
        })
}

/// How an instance set is configured, as recorded.
pub fn set_config(config: &CloudPoolConfig) -> SetConfig {
    SetConfig {
        driver: config.driver.clone(),
        instance_type: config.instance_type.clone(),
        max_instances: config.max_instances,
    }
}

/// The cloud pools' workers as machines sessions' components run on.
pub struct CloudMachines(pub Arc<Shared>);

impl super::remote::Machines for CloudMachines {
    fn reach(&self, machine: &MachineName) -> Option<(Arc<Executor>, String)> {
        let id = WorkerId::new(machine.as_str()).ok()?;
        self.0.pools.values().find_map(|pool| {
            let address = pool.known().get(&id)?.instance.address.clone()?;
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .to_owned();
            Some((pool.executor(&self.0, &id)?, host))
        })
    }

    fn all(&self) -> Vec<MachineName> {
        self.0
            .pools
            .values()
            .flat_map(|pool| pool.known().keys().cloned().collect::<Vec<_>>())
            .filter_map(|id| MachineName::new(id.as_str()).ok())
            .collect()
    }
}
