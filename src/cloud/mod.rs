//! Cloud worker pools (seed 003, arvados dispatch-cloud): a sessions pool whose machines are
//! the instances of an instance set, created as sessions wait for machines and shut down when
//! idle. The capability: `worker` and `instance_set` entities (their rules in
//! `domain::cloud`), the driver contract and its drivers ([`driver`], [`loopback`]), an
//! instance set behind its throttles ([`throttled`]), the SSH executor that verifies an
//! instance before it runs anything on it ([`ssh`]), and the sync reaction ([`sync`]).

pub mod cli;
pub mod driver;
pub mod faults;
pub mod kubernetes;
pub mod local_ssh;
pub mod loopback;
pub mod protocol;
pub mod remote;
pub mod routes;
pub mod ssh;
pub mod static_hosts;
pub mod stub;
pub mod sync;
pub mod throttled;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::api::catalog::{Capability, KindSpec, Starter};
use crate::backend::process::ProcessBackend;
use crate::config::CloudConfig;
use crate::domain::Principal;
use crate::domain::cloud::InstanceSetId;
use crate::domain::cloud::instance_set::{InstanceSet as SetEntity, InstanceSetCommand};
use crate::domain::cloud::throttle::Limits;
use crate::domain::cloud::worker::Worker;
use crate::domain::sessions::PoolName;
use crate::domain::sessions::scheduler::PoolSpec;
use crate::runtime::{CommandMeta, Entities, EntityTable, ProjectionHandle, error_chain};
use driver::Registry;
use loopback::LoopbackDriver;
use static_hosts::StaticDriver;
use stub::StubDriver;
use sync::{Pool, Shared, Sync};
use throttled::Throttled;

/// Handles to everything the routes use; cheap to clone.
#[derive(Clone)]
pub struct Cloud {
    pub workers: Entities<Worker>,
    pub sets: Entities<SetEntity>,
    pub table: ProjectionHandle<EntityTable<Worker>>,
    pub set_table: ProjectionHandle<EntityTable<SetEntity>>,
}

/// Cloud pools: `worker` and `instance_set` entities and the sync reaction.
pub fn capability() -> Capability {
    Capability {
        name: "cloud",
        kinds: || vec![KindSpec::of::<Worker>(), KindSpec::of::<SetEntity>()],
        routes: routes::specs,
        start,
    }
}

/// The sessions pools the cloud pools make: no machines until instances boot, growing to
/// `max_instances`.
pub fn pool_specs(config: &CloudConfig) -> Result<Vec<PoolSpec>, String> {
    config
        .pools
        .iter()
        .map(|pool| {
            let name = PoolName::new(pool.name.clone())
                .map_err(|e| format!("cloud.pools: {:?}: {e}", pool.name))?;
            if pool.max_instances == 0 {
                return Err(format!(
                    "cloud.pools: {name}: max_instances must be at least 1"
                ));
            }
            Ok(PoolSpec {
                name,
                machines: Vec::new(),
                labels: pool.labels.clone(),
                max_machines: pool.max_instances,
            })
        })
        .collect()
}

/// The drivers configuration may name. The stub keeps its instances in this process: for
/// tests, drills and benchmarks. The static driver logs in to its hosts with `key`; the
/// Kubernetes driver uses the cluster `kubernetes` names.
pub fn registry(
    config: &CloudConfig,
    kubernetes: &crate::config::KubernetesConfig,
    instance: &str,
    clock: crate::runtime::Clock,
    key: Option<Arc<russh::keys::PrivateKey>>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register(Arc::new(LoopbackDriver::new(ProcessBackend::new(
        config.dir.join("instances"),
        instance,
        Duration::from_secs(5),
    ))));
    registry.register(Arc::new(
        StubDriver::new(clock).serving_from(config.dir.join("stub")),
    ));
    registry.register(Arc::new(StaticDriver::new(key, config.timeout_ssh)));
    registry.register(Arc::new(kubernetes::KubernetesDriver::new(
        kubernetes, instance,
    )));
    registry
}

fn start(cx: &mut Starter<'_>) {
    let config = cx.config.cloud.clone();
    let workers = cx.entities::<Worker>();
    let sets = cx.entities::<SetEntity>();
    let table = cx.table::<Worker>();
    let set_table = cx.table::<SetEntity>();
    cx.provide(Cloud {
        workers: workers.clone(),
        sets: sets.clone(),
        table: table.clone(),
        set_table,
    });
    if config.pools.is_empty() {
        return;
    }
    if let Err(err) = pool_specs(&config) {
        cx.invalid(err);
        return;
    }
    let Some(sessions) = cx.provided::<crate::sessions::Sessions>() else {
        cx.invalid("cloud pools need the sessions capability");
        return;
    };
    if let Err(err) = std::fs::create_dir_all(&config.dir) {
        cx.invalid(format!("cloud.dir {}: {err}", config.dir.display()));
        return;
    }
    let key = match crate::tunnel::keys::load_or_create(Some(&config.dir.join("id_ed25519"))) {
        Ok(key) => Arc::new(key),
        Err(err) => {
            cx.invalid(format!("cloud: the instances' SSH key: {err}"));
            return;
        }
    };
    let public_key = match key.public_key().to_openssh() {
        Ok(line) => line,
        Err(err) => {
            cx.invalid(format!("cloud: the instances' SSH key: {err}"));
            return;
        }
    };
    let instance = cx.store.config().stream_prefix.to_lowercase();
    let clock = cx.clock();
    let metrics = cx.metrics.clone();
    let registry = registry(
        &config,
        &cx.config.kubernetes,
        &instance,
        clock.clone(),
        Some(key.clone()),
    );
    let mut pools = BTreeMap::new();
    for pool in &config.pools {
        let made = (|| {
            let name = PoolName::new(pool.name.clone()).map_err(|e| e.to_string())?;
            let id = InstanceSetId::new(pool.name.clone()).map_err(|e| e.to_string())?;
            let errors = faults::parse(&pool.driver_config).map_err(|e| e.to_string())?;
            let mut set = registry
                .get(&pool.driver)
                .and_then(|d| {
                    d.instance_set(&faults::without_errors(&pool.driver_config), id.as_str())
                })
                .map_err(|e| e.to_string())?;
            if !errors.is_empty() {
                set = Arc::new(faults::Faulty::new(set, errors, clock.clone()));
            }
            let limits = Limits {
                max_instances: pool.max_instances,
                max_concurrent_creates: pool.max_concurrent_creates.max(1),
                quota_ttl: config.quota_hold,
                capacity_ttl: config.capacity_hold,
            };
            let throttled = Throttled::new(
                set.clone(),
                limits,
                config.max_cloud_ops_per_second,
                clock.clone(),
            )
            .with_metrics(metrics.clone(), id.as_str());
            Ok::<_, String>(Pool::new(id, name, pool.clone(), set, throttled, clock()))
        })();
        match made {
            Ok(made) => {
                pools.insert(made.id.clone(), Arc::new(made));
            }
            Err(err) => {
                cx.invalid(format!("cloud.pools: {:?}: {err}", pool.name));
                return;
            }
        }
    }
    let configured: Vec<(InstanceSetId, InstanceSetCommand)> = pools
        .values()
        .map(|p| {
            (
                p.id.clone(),
                InstanceSetCommand::Configure(sync::set_config(&p.config)),
            )
        })
        .collect();
    let shared = Arc::new(Shared {
        workers,
        table,
        sets: sets.clone(),
        scheduler: sessions.scheduler.clone(),
        pools,
        key,
        public_key,
        config,
        clock,
        metrics,
    });
    // Sessions' components on the pools' machines run over SSH.
    if let Some(slot) = cx.provided::<remote::RemoteSlot>() {
        let backend = remote::RemoteSessions::new(
            Arc::new(sync::CloudMachines(shared.clone())),
            sessions.table.clone(),
            sessions.config.stop_grace,
            shared.clock.clone(),
        );
        let _ = slot.0.set(Arc::new(backend));
    }
    cx.reaction(Sync::new(shared));
    tokio::spawn(configure(sets, configured));
}

/// Records each instance set's configuration, retrying until it lands (its shard may not
/// have an owner yet at start).
async fn configure(
    sets: Entities<SetEntity>,
    configured: Vec<(InstanceSetId, InstanceSetCommand)>,
) {
    for (id, command) in configured {
        let mut wait = Duration::from_millis(100);
        loop {
            let meta = CommandMeta::fresh(Principal::system());
            match sets.execute(id.clone(), command.clone(), meta).await {
                Ok(_) => break,
                Err(err) => {
                    tracing::info!(set = %id, error = %error_chain(&err), "cannot record the instance set yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
