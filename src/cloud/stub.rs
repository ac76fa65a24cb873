//! The stub driver, for tests, drills and benchmarks: instances that exist in this process
//! only, errors injected per operation ([`StubDriver::inject`]), and a record of every call.
//!
//! Configuration (JSON, from the pool's `driver_config`):
//! `{"ssh": true, "boot_delay": "200ms", "verify_host_key": false, "faults": [...]}`.
//! Without `ssh` an instance never gets an address (enough for the sync loop's benchmark).
//! With it, each instance boots after `boot_delay`: it gets a home directory under the
//! driver's (`<cloud.dir>/stub/<id>`), runs the init command there, and serves SSH from this
//! process ([`LocalServer`]) with a host key of its own, letting in the key it was created
//! with. Instance faults (`slow_boot`, `no_boot`, `disappear`, `wrong_host_key`, `impostor`)
//! are the loopback driver's ([`super::faults`]). Destroying an instance, or its
//! disappearing, ends it as a machine ends: its server closes, the process groups of the
//! components it ran are killed, and its home is deleted. Its host key can be verified
//! (`verify_host_key`); by default the driver cannot, and the instance secret is checked.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::driver::{
    Driver, DriverError, Instance, InstanceSet, InstanceSpec, Operation, Result, check_set_id,
    parse_config,
};
use super::faults::{InstanceFault, InstanceFaultKind, check_instance_faults, instance_faults_of};
use super::local_ssh::LocalServer;
use super::loopback::same_key;
use super::remote::END_ALL;
use crate::domain::Timestamp;
use crate::runtime::Clock;
use crate::tunnel::keys;

/// One call the stub received, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubCall {
    pub operation: Operation,
    pub at: Timestamp,
    pub set_id: String,
}

/// A stub set's configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StubConfig {
    /// Instances boot and serve SSH from this process.
    #[serde(default)]
    pub ssh: bool,
    #[serde(default, with = "humantime_serde")]
    pub boot_delay: Duration,
    /// `false`: the driver cannot verify host keys (the instance secret is checked instead).
    #[serde(default)]
    pub verify_host_key: bool,
    #[serde(default)]
    pub faults: Vec<InstanceFault>,
}

/// An instance the stub holds.
struct Held {
    instance: Instance,
    /// The host key it was made with (an OpenSSH line), once it has booted.
    host_key: Option<String>,
    /// Its home, when it serves SSH.
    home: Option<PathBuf>,
    /// Its boot and life; aborting it closes its server.
    life: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct StubState {
    instances: BTreeMap<String, Held>,
    next: u64,
    calls: Vec<StubCall>,
    errors: BTreeMap<Operation, VecDeque<DriverError>>,
}

/// Instances in this process, errors on demand, every call recorded.
#[derive(Clone)]
pub struct StubDriver {
    clock: Clock,
    state: Arc<Mutex<StubState>>,
    /// Where instances that serve SSH have their homes.
    dir: Option<PathBuf>,
}

impl StubDriver {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            state: Arc::new(Mutex::new(StubState::default())),
            dir: None,
        }
    }

    /// Instances that serve SSH (`"ssh": true`) have their homes under `dir`.
    pub fn serving_from(mut self, dir: PathBuf) -> Self {
        self.dir = Some(dir);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next call of `operation` fails with `error` (queued: one per call).
    pub fn inject(&self, operation: Operation, error: DriverError) {
        self.state()
            .errors
            .entry(operation)
            .or_default()
            .push_back(error);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<StubCall> {
        self.state().calls.clone()
    }

    /// Every instance, of every set.
    pub fn all_instances(&self) -> Vec<Instance> {
        self.state()
            .instances
            .values()
            .map(|held| held.instance.clone())
            .collect()
    }

    /// Takes the instance away, as a cloud does when it is destroyed or disappears.
    async fn end(&self, id: &str) {
        let Some(held) = self.state().instances.remove(id) else {
            return;
        };
        if let Some(life) = held.life {
            life.abort();
        }
        if let Some(home) = held.home {
            end_machine(&home).await;
        }
    }
}

/// What ends with a machine: the components it ran (as the remote backend lays them out on
/// an instance, [`END_ALL`]), and its disk.
async fn end_machine(home: &Path) {
    let _ = tokio::process::Command::new("/bin/sh")
        .args(["-c", END_ALL])
        .env("SWITCHYARD_HOME", home)
        .status()
        .await;
    let _ = tokio::fs::remove_dir_all(home).await;
}

struct StubSet {
    driver: StubDriver,
    set_id: String,
    config: StubConfig,
    /// Instances created by this set in this process: the ordinal faults count with.
    created: AtomicU64,
}

impl StubSet {
    /// Records the call; the injected error, if one is queued.
    fn call(&self, operation: Operation) -> Result<()> {
        let at = (self.driver.clock)();
        let mut state = self.driver.state();
        state.calls.push(StubCall {
            operation,
            at,
            set_id: self.set_id.clone(),
        });
        match state
            .errors
            .get_mut(&operation)
            .and_then(VecDeque::pop_front)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Boots an instance that serves SSH, then keeps its server until it disappears or the task
/// is aborted (destroyed).
async fn live(
    driver: StubDriver,
    id: String,
    spec: InstanceSpec,
    home: PathBuf,
    faults: Vec<InstanceFault>,
    boot_delay: Duration,
) {
    let fault = |kind| faults.iter().find(|f| f.kind == kind);
    // Its disk exists from the start, booted or not.
    if let Err(err) = tokio::fs::create_dir_all(&home).await {
        tracing::warn!(instance = %id, error = %err, "a stub instance has no home");
        return std::future::pending().await;
    }
    let delay = fault(InstanceFaultKind::SlowBoot)
        .and_then(|f| f.delay)
        .unwrap_or(boot_delay);
    tokio::time::sleep(delay).await;
    if fault(InstanceFaultKind::NoBoot).is_some() {
        return std::future::pending().await;
    }
    let init = fault(InstanceFaultKind::Impostor)
        .is_none()
        .then_some(spec.init_command.as_str());
    let booted = boot(&home, init, &spec.public_key).await;
    let (key, authorized) = match booted {
        Ok(booted) => booted,
        Err(err) => {
            tracing::warn!(instance = %id, error = %err, "a stub instance failed to boot");
            return std::future::pending().await;
        }
    };
    let presented = if fault(InstanceFaultKind::WrongHostKey).is_some() {
        keys::generate().unwrap_or_else(|_| key.clone())
    } else {
        key.clone()
    };
    let server = match LocalServer::start(presented, authorized, home).await {
        Ok(server) => server,
        Err(err) => {
            tracing::warn!(instance = %id, error = %err, "a stub instance cannot serve SSH");
            return std::future::pending().await;
        }
    };
    if let Some(held) = driver.state().instances.get_mut(&id) {
        held.instance.address = Some(server.address().to_owned());
        held.host_key = key.public_key().to_openssh().ok();
    }
    match fault(InstanceFaultKind::Disappear).and_then(|f| f.after) {
        Some(after) => {
            tokio::time::sleep(after).await;
            drop(server);
            let held = driver.state().instances.remove(&id);
            if let Some(home) = held.and_then(|held| held.home) {
                end_machine(&home).await;
            }
        }
        None => {
            std::future::pending::<()>().await;
            drop(server);
        }
    }
}

/// Runs the instance's init command in its home (none: an impostor); its host key and the
/// key it lets in.
async fn boot(
    home: &Path,
    init: Option<&str>,
    public_key: &str,
) -> std::result::Result<(russh::keys::PrivateKey, russh::keys::PublicKey), String> {
    if let Some(init) = init {
        let status = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(init)
            .current_dir(home)
            .env("SWITCHYARD_HOME", home)
            .status()
            .await
            .map_err(|e| format!("the init command: {e}"))?;
        if !status.success() {
            return Err(format!("the init command failed: {status}"));
        }
    }
    let key = keys::generate().map_err(|e| e.to_string())?;
    let authorized = keys::parse_public(public_key).map_err(|e| e.to_string())?;
    Ok((key, authorized))
}

impl InstanceSet for StubSet {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            self.call(Operation::Create)?;
            let ordinal = self.created.fetch_add(1, Ordering::Relaxed) + 1;
            let mut state = self.driver.state();
            state.next += 1;
            let instance = Instance {
                id: format!("stub-{}", state.next),
                instance_type: spec.instance_type.clone(),
                tags: spec.tags.clone(),
                address: None,
                remote_user: "root".to_owned(),
            };
            let mut held = Held {
                instance: instance.clone(),
                host_key: None,
                home: None,
                life: None,
            };
            if let (true, Some(dir)) = (self.config.ssh, &self.driver.dir) {
                let home = dir.join(&instance.id);
                let faults = instance_faults_of(&self.config.faults, ordinal)
                    .cloned()
                    .collect();
                held.home = Some(home.clone());
                held.life = Some(tokio::spawn(live(
                    self.driver.clone(),
                    instance.id.clone(),
                    spec.clone(),
                    home,
                    faults,
                    self.config.boot_delay,
                )));
            }
            state.instances.insert(instance.id.clone(), held);
            Ok(instance)
        })
    }

    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            self.call(Operation::Instances)?;
            Ok(self
                .driver
                .state()
                .instances
                .values()
                .map(|held| &held.instance)
                .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
                .cloned()
                .collect())
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call(Operation::Destroy)?;
            self.driver.end(id).await;
            Ok(())
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call(Operation::SetTags)?;
            match self.driver.state().instances.get_mut(id) {
                Some(held) => {
                    held.instance.tags = tags.clone();
                    Ok(())
                }
                None => Err(DriverError::Failed {
                    message: format!("no instance {id}"),
                }),
            }
        })
    }

    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call(Operation::VerifyHostKey)?;
            if !self.config.verify_host_key {
                return Err(DriverError::NotImplemented);
            }
            let known = self
                .driver
                .state()
                .instances
                .get(id)
                .and_then(|held| held.host_key.clone());
            match known {
                Some(known) if same_key(&known, host_key) => Ok(()),
                Some(_) => Err(DriverError::Failed {
                    message: format!("{id} presented a host key that is not its own"),
                }),
                None => Err(DriverError::Failed {
                    message: format!("no host key recorded for {id}"),
                }),
            }
        })
    }

    fn stop(&self) {}
}

impl Driver for StubDriver {
    fn name(&self) -> &'static str {
        "stub"
    }

    fn instance_set(
        &self,
        config: &serde_json::Value,
        set_id: &str,
    ) -> Result<Arc<dyn InstanceSet>> {
        check_set_id(set_id)?;
        let config: StubConfig = parse_config("stub", config)?;
        check_instance_faults("stub", &config.faults)?;
        if config.ssh && self.dir.is_none() {
            return Err(DriverError::InvalidConfig {
                message: "stub: this stub driver has no directory for instances that serve SSH"
                    .into(),
            });
        }
        Ok(Arc::new(StubSet {
            driver: self.clone(),
            set_id: set_id.to_owned(),
            config,
            created: AtomicU64::new(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked() {
        let clock = crate::runtime::system_clock();
        let driver = StubDriver::new(clock.clone());
        assert!(driver.instance_set(&serde_json::Value::Null, "a").is_ok());
        let refused = [
            serde_json::json!({"ssh": true}),
            serde_json::json!({"boot_delay": "soon"}),
            serde_json::json!({"faults": [{"kind": "disappear", "every": 2}]}),
            serde_json::json!({"serve": true}),
        ];
        for config in refused {
            assert!(
                matches!(
                    driver.instance_set(&config, "a"),
                    Err(DriverError::InvalidConfig { .. })
                ),
                "{config}"
            );
        }
        let serving = StubDriver::new(clock).serving_from(std::env::temp_dir());
        assert!(
            serving
                .instance_set(&serde_json::json!({"ssh": true}), "a")
                .is_ok()
        );
        assert!(serving.instance_set(&serde_json::json!({}), "").is_err());
    }
}
