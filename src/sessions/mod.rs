//! Test sessions (seed 001, orch): the capability. Sessions, the scheduler and pools are
//! entities (their rules in `domain::sessions`); the [`executor`] is a reaction that drives each
//! admitted session through the process backend; [`routes`] serve `session.*` and `pool.list`.

pub mod backend;
pub mod cli;
pub mod executor;
pub mod kubernetes;
pub mod logs;
pub mod protocol;
pub mod routes;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::api::catalog::{Capability, KindSpec, Starter};
use crate::backend::process::ProcessBackend;
use crate::config::{PoolConfig, SessionBackendKind, SessionsConfig};
use crate::domain::sessions::scheduler::{PoolSpec, Scheduler, SchedulerCommand};
use crate::domain::sessions::session::Session;
use crate::domain::sessions::{MachineName, PoolName, SchedulerId, SessionId};
use crate::domain::{EntityId, Principal};
use crate::kubernetes::Kube;
use crate::runtime::{CommandMeta, Entities, EntityTable, ProjectionHandle, error_chain};
use backend::{LocalSessions, SessionBackend};
use executor::{Executor, Shared};
use kubernetes::KubernetesSessions;
use logs::LogStore;

/// Handles to everything the routes use; cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    pub sessions: Entities<Session>,
    pub scheduler: Entities<Scheduler>,
    pub table: ProjectionHandle<EntityTable<Session>>,
    pub backend: Arc<dyn SessionBackend>,
    pub logs: LogStore,
    pub config: SessionsConfig,
}

/// Test sessions: `session` and `scheduler` entities, the executor, the pool configuration and
/// the orphan pruner.
pub fn capability() -> Capability {
    Capability {
        name: "sessions",
        kinds: || vec![KindSpec::of::<Session>(), KindSpec::of::<Scheduler>()],
        routes: routes::specs,
        start,
    }
}

/// The pools of the configuration, checked.
pub fn pool_specs(config: &SessionsConfig) -> Result<Vec<PoolSpec>, String> {
    config.pools.iter().map(pool_spec).collect()
}

fn pool_spec(pool: &PoolConfig) -> Result<PoolSpec, String> {
    let name = PoolName::new(pool.name.clone())
        .map_err(|e| format!("sessions.pools: {:?}: {e}", pool.name))?;
    let names: Vec<String> = if pool.machines.is_empty() {
        (0..pool.capacity).map(|i| format!("{name}-{i}")).collect()
    } else {
        if pool.capacity != 0 && pool.capacity as usize != pool.machines.len() {
            return Err(format!(
                "sessions.pools: {name}: capacity {} but {} machines; give one or the other",
                pool.capacity,
                pool.machines.len()
            ));
        }
        pool.machines.clone()
    };
    if names.is_empty() {
        return Err(format!(
            "sessions.pools: {name}: no machines; give capacity or machines"
        ));
    }
    let machines = names
        .into_iter()
        .map(|m| {
            MachineName::new(m.clone())
                .map_err(|e| format!("sessions.pools: {name}: machine {m:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PoolSpec {
        name,
        machines,
        labels: pool.labels.clone(),
        max_machines: 0,
    })
}

fn start(cx: &mut Starter<'_>) {
    let sessions = cx.entities::<Session>();
    let scheduler = cx.entities::<Scheduler>();
    let table = cx.table::<Session>();
    let config = cx.config.sessions.clone();
    let pools = match pool_specs(&config) {
        Ok(pools) => pools,
        Err(err) => {
            cx.invalid(err);
            Vec::new()
        }
    };
    if config.executor_count == 0 {
        cx.invalid("sessions.executor_count must be at least 1");
    }
    // Cloud pools are sessions pools too, their machines given by their instance sets.
    let cloud = match crate::cloud::pool_specs(&cx.config.cloud) {
        Ok(cloud) => cloud,
        Err(err) => {
            cx.invalid(err);
            Vec::new()
        }
    };
    for spec in &cloud {
        if pools.iter().any(|p| p.name == spec.name) {
            cx.invalid(format!(
                "pool {} is both in sessions.pools and in cloud.pools",
                spec.name
            ));
        }
    }
    // Every resource carries the instance: the stream prefix names this Switchyard.
    let instance = cx.store.config().stream_prefix.to_lowercase();
    let (stop, stopped) = watch::channel(false);
    cx.on_shutdown(move || {
        let _ = stop.send(true);
    });
    let local = || -> Arc<dyn SessionBackend> {
        Arc::new(LocalSessions::new(ProcessBackend::new(
            config.process_dir.clone(),
            instance.clone(),
            config.stop_grace,
        )))
    };
    // The pools: from configuration, or the cluster's nodes as they come and go.
    let (backend, pools) = match config.backend {
        SessionBackendKind::Local => (local(), watch::channel(Some(pools)).1),
        SessionBackendKind::Kubernetes => match Kube::new(cx.config.kubernetes.clone()) {
            Ok(kube) => {
                let from_nodes = pools.is_empty();
                let backend: Arc<dyn SessionBackend> = Arc::new(KubernetesSessions::start(
                    kube.clone(),
                    &instance,
                    from_nodes,
                    stopped.clone(),
                ));
                let pools = if from_nodes {
                    kubernetes::watch_pools(kube, stopped.clone())
                } else {
                    watch::channel(Some(pools)).1
                };
                (backend, pools)
            }
            Err(err) => {
                cx.invalid(err.to_string());
                (local(), watch::channel(Some(pools)).1)
            }
        },
    };
    // With cloud pools, their components run on the pools' instances over SSH (the cloud
    // capability, started next, puts that backend in the slot).
    let backend: Arc<dyn SessionBackend> = if cloud.is_empty() {
        backend
    } else {
        let slot = crate::cloud::remote::RemoteSlot::default();
        cx.provide(slot.clone());
        Arc::new(crate::cloud::remote::Routed {
            local: backend,
            remote: slot,
            cloud_pools: cloud.iter().map(|p| p.name.clone()).collect(),
            sessions: table.clone(),
        })
    };
    let logs = LogStore::new(cx.store.clone());
    let shared = Arc::new(Shared {
        sessions: sessions.clone(),
        scheduler: scheduler.clone(),
        backend: backend.clone(),
        logs: logs.clone(),
        config: config.clone(),
        clock: cx.clock(),
    });
    cx.reaction(Executor::new(shared.clone()));
    tokio::spawn(configure(
        scheduler.clone(),
        pools,
        cloud,
        config.executor_count.max(1),
        stopped.clone(),
    ));
    tokio::spawn(prune(shared, stopped));
    cx.provide(Sessions {
        sessions,
        scheduler,
        table,
        backend,
        logs,
        config,
    });
}

/// Records the pools on the scheduler each time they change (from configuration: once), with
/// the cloud pools after them.
async fn configure(
    scheduler: Entities<Scheduler>,
    mut pools: watch::Receiver<Option<Vec<PoolSpec>>>,
    cloud: Vec<PoolSpec>,
    executor_count: u32,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let current = pools.borrow_and_update().clone().map(|mut current| {
            current.extend(cloud.iter().cloned());
            current
        });
        if let Some(current) = current
            && !record_pools(&scheduler, current, executor_count, &mut stopped).await
        {
            return;
        }
        tokio::select! {
            changed = pools.changed() => if changed.is_err() { return },
            _ = stopped.changed() => return,
        }
    }
}

/// Records `pools` on the scheduler (nothing if they are what it has), retrying until it
/// lands: the scheduler's shard may not have an owner yet at start. False: stopped first.
async fn record_pools(
    scheduler: &Entities<Scheduler>,
    pools: Vec<PoolSpec>,
    executor_count: u32,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        // No pool, and none ever recorded: nothing to say (and nothing written).
        if pools.is_empty() {
            match scheduler.read(SchedulerId::sessions()).await {
                Ok((view, _))
                    if view
                        .as_ref()
                        .is_none_or(|v| v.pools.is_empty() && v.executor_count == 0) =>
                {
                    return true;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::info!(error = %error_chain(&err), "cannot read the scheduler yet; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stopped.changed() => return false,
                    }
                    continue;
                }
            }
        }
        let command = SchedulerCommand::Configure {
            pools: pools.clone(),
            executor_count,
        };
        let meta = CommandMeta::fresh(Principal::system());
        match scheduler
            .execute(SchedulerId::sessions(), command, meta)
            .await
        {
            Ok(_) => return true,
            Err(err) => {
                tracing::info!(error = %error_chain(&err), "cannot record the pools on the scheduler yet; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return false,
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Removes what the backend has of sessions that have ended (or that the log never had): left
/// by a crash between a session's end and its cleanup being recorded, or by a Switchyard whose
/// log was wiped. Only sessions of this replica's shards, only once unchanged for the grace.
async fn prune(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let every = shared.config.prune_interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stopped.changed() => return,
        }
        let owners = match shared.backend.sessions().await {
            Ok(owners) => owners,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot list what the session backend has");
                continue;
            }
        };
        // File ages: both times are this machine's wall clock.
        #[allow(clippy::disallowed_methods)]
        let now = SystemTime::now();
        for (name, modified) in owners {
            let age = now.duration_since(modified).unwrap_or_default();
            if age < shared.config.prune_grace {
                continue;
            }
            let Ok(id) = SessionId::parse(&name) else {
                tracing::warn!(resource = %name, "the session backend has something that is not a session's; leaving it");
                continue;
            };
            if !shared.sessions.owns(&id) {
                continue;
            }
            let live = match shared.sessions.inspect_here(id.clone()).await {
                Ok((Session::Present(record), _)) => record.cleaned_up_at.is_none(),
                Ok((Session::Absent, _)) => false,
                Err(_) => continue,
            };
            if live {
                continue;
            }
            match shared.backend.remove(&id).await {
                Ok(()) => {
                    tracing::info!(session = %id, "removed what the backend had of a session that has ended")
                }
                Err(err) => {
                    tracing::warn!(session = %id, error = %error_chain(&err), "cannot remove what an ended session left")
                }
            }
        }
    }
}
