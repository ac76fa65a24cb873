//! The loopback driver: each instance is a real OpenSSH `sshd` on 127.0.0.1, with its own
//! host key and directory, run through the process backend. It boots after a configured delay,
//! runs the init command it was given (as a cloud's cloud-init would), and lets in the one
//! public key it was created with. Faults are injected by configuration, on every n-th
//! instance a set creates: a slow boot, no boot at all, an instance that disappears, one that
//! presents another host key than it was made with, and an impostor that never ran the init
//! command (so it does not have the instance secret).
//!
//! On disk, an instance is a process-backend owner (kind `cloud-instance`, id the instance id):
//! `record.json` (its type and tags, written before anything runs, so a crash mid-create
//! leaves a tagged instance to adopt, never an untagged one), and the step `sshd`, whose
//! directory is the instance's own (`host_key`, `host_key.pub`, `sshd_config`, what the init
//! command writes). Tags live in `record.json`; `set_tags` rewrites it atomically.
//!
//! Configuration (JSON, from the pool's `driver_config`):
//! `{"boot_delay": "1s", "verify_host_key": true, "faults": [{"kind": "no_boot", "every": 3}]}`;
//! fault kinds: `slow_boot` (with `delay`), `no_boot`, `disappear` (with `after`),
//! `wrong_host_key`, `impostor`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::driver::{Driver, DriverError, Instance, InstanceSet, InstanceSpec, Result};
use super::faults::{
    InstanceFault, InstanceFaultKind as FaultKind, check_instance_faults, instance_faults_of,
};
use crate::backend::StepKey;
use crate::backend::process::{ProcessBackend, ProcessSpec, ProcessState};

/// The process-backend kind of loopback instances.
const KIND: &str = "cloud-instance";
/// The step that is the instance.
const STEP: &str = "sshd";
/// The instance's record, in its owner directory.
const RECORD: &str = "record.json";

/// Boots (after a delay), runs the init command, then serves SSH until stopped.
const INSTANCE: &str = r#"set -e
sleep "$SWITCHYARD_BOOT_DELAY"
if [ -n "$SWITCHYARD_NO_BOOT" ]; then exec sleep 2147483647; fi
SWITCHYARD_HOME="$PWD"
export SWITCHYARD_HOME
if [ -z "$SWITCHYARD_IMPOSTOR" ]; then /bin/sh -c "$SWITCHYARD_INIT"; fi
[ -f host_key ] || ssh-keygen -q -t ed25519 -N '' -C "$SWITCHYARD_INSTANCE" -f host_key
key=host_key
if [ -n "$SWITCHYARD_WRONG_HOST_KEY" ]; then
  [ -f other_key ] || ssh-keygen -q -t ed25519 -N '' -C impostor -f other_key
  key=other_key
fi
printf '%s\n' "$SWITCHYARD_PUBLIC_KEY" > authorized_keys
cat > sshd_config <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $PWD/$key
AuthorizedKeysFile $PWD/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
SetEnv SWITCHYARD_HOME=$PWD
EOF
if [ -n "$SWITCHYARD_DISAPPEAR_AFTER" ]; then
  "$SWITCHYARD_SSHD" -D -e -f "$PWD/sshd_config" &
  sleep "$SWITCHYARD_DISAPPEAR_AFTER"
  rm -rf "$(dirname "$PWD")"
  kill $!
  exit 0
fi
exec "$SWITCHYARD_SSHD" -D -e -f "$PWD/sshd_config"
"#;

/// A set's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopbackConfig {
    /// How long an instance takes to boot before its sshd answers.
    #[serde(default = "default_boot_delay", with = "humantime_serde")]
    pub boot_delay: Duration,
    /// `false`: the driver cannot verify host keys (the instance secret is checked instead).
    #[serde(default = "yes")]
    pub verify_host_key: bool,
    #[serde(default)]
    pub faults: Vec<InstanceFault>,
}

fn default_boot_delay() -> Duration {
    Duration::from_secs(1)
}

fn yes() -> bool {
    true
}

impl LoopbackConfig {
    pub fn parse(config: &serde_json::Value) -> Result<Self> {
        let parsed: Self = super::driver::parse_config("loopback", config)?;
        check_instance_faults("loopback", &parsed.faults)?;
        Ok(parsed)
    }
}

/// What `record.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    instance_type: String,
    tags: BTreeMap<String, String>,
}

/// Makes loopback instance sets; every set shares the machine's process backend.
#[derive(Clone)]
pub struct LoopbackDriver {
    processes: ProcessBackend,
}

impl LoopbackDriver {
    pub fn new(processes: ProcessBackend) -> Self {
        Self { processes }
    }
}

impl Driver for LoopbackDriver {
    fn name(&self) -> &'static str {
        "loopback"
    }

    fn instance_set(
        &self,
        config: &serde_json::Value,
        set_id: &str,
    ) -> Result<Arc<dyn InstanceSet>> {
        super::driver::check_set_id(set_id)?;
        Ok(Arc::new(LoopbackSet {
            processes: self.processes.clone(),
            config: LoopbackConfig::parse(config)?,
            created: AtomicU64::new(0),
        }))
    }
}

struct LoopbackSet {
    processes: ProcessBackend,
    config: LoopbackConfig,
    /// Instances created by this set in this process: the ordinal faults count with.
    created: AtomicU64,
}

fn failed(what: &str, err: impl std::fmt::Display) -> DriverError {
    DriverError::Failed {
        message: format!("{what}: {err}"),
    }
}

impl LoopbackSet {
    fn key(&self, id: &str) -> StepKey {
        StepKey {
            owner: self.processes.owner(KIND, id),
            name: STEP.to_owned(),
        }
    }

    /// The instance's own directory (its sshd's).
    fn instance_dir(&self, id: &str) -> PathBuf {
        self.processes.resource_dir(&self.key(id))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        let dir = self.instance_dir(id);
        dir.parent().unwrap_or(&dir).join(RECORD)
    }

    async fn read_record(&self, id: &str) -> Option<Record> {
        let bytes = tokio::fs::read(self.record_path(id)).await.ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    async fn write_record(&self, id: &str, record: &Record) -> Result<()> {
        let path = self.record_path(id);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| failed("cannot create the instance's directory", e))?;
        }
        let temporary = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(record).map_err(|e| failed("cannot encode tags", e))?;
        tokio::fs::write(&temporary, bytes)
            .await
            .map_err(|e| failed("cannot write the instance's record", e))?;
        tokio::fs::rename(&temporary, &path)
            .await
            .map_err(|e| failed("cannot write the instance's record", e))
    }

    async fn instance(&self, id: &str) -> Option<Instance> {
        let record = self.read_record(id).await?;
        let owner = self.processes.owner(KIND, id);
        let process = self
            .processes
            .observe(&owner)
            .await
            .ok()
            .and_then(|found| found.into_iter().find(|p| p.name == STEP));
        let address = process
            .filter(|p| p.state == ProcessState::Running)
            .and_then(|p| p.address);
        Some(Instance {
            id: id.to_owned(),
            instance_type: record.instance_type,
            tags: record.tags,
            address,
            remote_user: current_user(),
        })
    }
}

/// The user this process runs as: the one a loopback sshd lets in.
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".to_owned())
}

fn seconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64())
}

impl InstanceSet for LoopbackSet {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            let Some(sshd) = crate::lessons::backend::sshd_binary() else {
                return Err(DriverError::Failed {
                    message: "OpenSSH's sshd is not installed (Debian: openssh-server)".into(),
                });
            };
            if nix::unistd::geteuid().is_root() {
                // OpenSSH's privilege separation directory, missing where the service never ran.
                let _ = tokio::fs::create_dir_all("/run/sshd").await;
            }
            let ordinal = self.created.fetch_add(1, Ordering::Relaxed) + 1;
            let id = format!("lo-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            self.write_record(
                &id,
                &Record {
                    instance_type: spec.instance_type.clone(),
                    tags: spec.tags.clone(),
                },
            )
            .await?;
            let mut env = BTreeMap::from([
                ("SWITCHYARD_INSTANCE".to_owned(), id.clone()),
                ("SWITCHYARD_INIT".to_owned(), spec.init_command.clone()),
                ("SWITCHYARD_PUBLIC_KEY".to_owned(), spec.public_key.clone()),
                ("SWITCHYARD_SSHD".to_owned(), sshd.display().to_string()),
                (
                    "SWITCHYARD_BOOT_DELAY".to_owned(),
                    seconds(self.config.boot_delay),
                ),
            ]);
            for fault in instance_faults_of(&self.config.faults, ordinal) {
                match fault.kind {
                    FaultKind::SlowBoot => {
                        let delay = fault.delay.unwrap_or(self.config.boot_delay);
                        env.insert("SWITCHYARD_BOOT_DELAY".into(), seconds(delay));
                    }
                    FaultKind::NoBoot => {
                        env.insert("SWITCHYARD_NO_BOOT".into(), "1".into());
                    }
                    FaultKind::Disappear => {
                        let after = fault.after.unwrap_or_default();
                        env.insert("SWITCHYARD_DISAPPEAR_AFTER".into(), seconds(after));
                    }
                    FaultKind::WrongHostKey => {
                        env.insert("SWITCHYARD_WRONG_HOST_KEY".into(), "1".into());
                    }
                    FaultKind::Impostor => {
                        env.insert("SWITCHYARD_IMPOSTOR".into(), "1".into());
                    }
                }
            }
            let process = ProcessSpec {
                command: "/bin/sh".into(),
                args: vec!["-c".into(), INSTANCE.into()],
                env,
                ports: Vec::new(),
            };
            self.processes
                .start(&self.key(&id), &process)
                .await
                .map_err(|e| failed("cannot start the instance", e))?;
            self.instance(&id).await.ok_or_else(|| DriverError::Failed {
                message: format!("instance {id} vanished as it was created"),
            })
        })
    }

    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let owners = self
                .processes
                .owners(KIND)
                .await
                .map_err(|e| failed("cannot list instances", e))?;
            let mut found = Vec::new();
            for (owner, _) in owners {
                if let Some(instance) = self.instance(&owner.id).await
                    && tags.iter().all(|(k, v)| instance.tags.get(k) == Some(v))
                {
                    found.push(instance);
                }
            }
            Ok(found)
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.processes
                .remove(&self.processes.owner(KIND, id))
                .await
                .map_err(|e| failed(&format!("cannot destroy {id}"), e))
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(mut record) = self.read_record(id).await else {
                return Err(DriverError::Failed {
                    message: format!("no instance {id}"),
                });
            };
            record.tags = tags.clone();
            self.write_record(id, &record).await
        })
    }

    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !self.config.verify_host_key {
                return Err(DriverError::NotImplemented);
            }
            let path = self.instance_dir(id).join("host_key.pub");
            let known = tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| failed(&format!("no host key recorded for {id}"), e))?;
            if same_key(&known, host_key) {
                Ok(())
            } else {
                Err(DriverError::Failed {
                    message: format!("{id} presented a host key that is not its own"),
                })
            }
        })
    }

    fn stop(&self) {}
}

/// Whether two OpenSSH public key lines name one key (type and data; comments aside).
pub fn same_key(a: &str, b: &str) -> bool {
    let fields = |line: &str| {
        line.split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (a, b) = (fields(a), fields(b));
    a.len() == 2 && a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked() {
        let parsed = LoopbackConfig::parse(&serde_json::Value::Null).unwrap();
        assert_eq!(parsed.boot_delay, Duration::from_secs(1));
        assert!(parsed.verify_host_key);
        let refused = [
            serde_json::json!({"boot_delay": "soon"}),
            serde_json::json!({"faults": [{"kind": "slow_boot", "every": 2}]}),
            serde_json::json!({"faults": [{"kind": "disappear", "every": 2}]}),
            serde_json::json!({"faults": [{"kind": "no_boot", "every": 0}]}),
            serde_json::json!({"faults": [{"kind": "melt", "every": 1}]}),
            serde_json::json!({"boot": "1s"}),
        ];
        for config in refused {
            assert!(
                matches!(
                    LoopbackConfig::parse(&config),
                    Err(DriverError::InvalidConfig { .. })
                ),
                "{config}"
            );
        }
    }

    #[test]
    fn faults_fall_on_every_nth_instance() {
        let parsed = LoopbackConfig::parse(&serde_json::json!({"faults": [
            {"kind": "no_boot", "every": 3},
            {"kind": "wrong_host_key", "every": 2}]}))
        .unwrap();
        let kinds = |n| {
            instance_faults_of(&parsed.faults, n)
                .map(|f| f.kind)
                .collect::<Vec<FaultKind>>()
        };
        assert!(kinds(1).is_empty());
        assert_eq!(kinds(2), [FaultKind::WrongHostKey]);
        assert_eq!(kinds(3), [FaultKind::NoBoot]);
        assert_eq!(kinds(6), [FaultKind::NoBoot, FaultKind::WrongHostKey]);
    }

    #[test]
    fn keys_compare_by_type_and_data() {
        assert!(same_key("ssh-ed25519 AAAA one", "ssh-ed25519 AAAA two"));
        assert!(!same_key("ssh-ed25519 AAAA", "ssh-ed25519 AAAB"));
        assert!(!same_key("ssh-ed25519", "ssh-ed25519"));
    }
}
