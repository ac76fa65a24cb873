//! The `static` driver: existing SSH hosts, listed in configuration. Creating an instance
//! claims a free host; destroying it releases the host (its components' process groups are
//! killed and their directories deleted; the host itself stays). The claim lives on the host,
//! as a cloud keeps tags on its instances: `$SWITCHYARD_HOME/claim` (a JSON object with the
//! instance type and tags), created exclusively (`set -C`), so two instance sets, or two
//! replicas, can never both claim one host, and whichever replica syncs the set next sees
//! the same claims. Listing reads every host's claim over one SSH connection per host.
//!
//! Each host names its host key (an OpenSSH public key line, as in `known_hosts`): the driver
//! verifies every connection against it, its own and the executor's. The hosts must let in
//! Switchyard's instance key (`<cloud.dir>/id_ed25519.pub`) for their `user`.
//!
//! Configuration (JSON, from the pool's `driver_config`):
//! `{"hosts": [{"name": "rack1-a", "address": "10.0.0.5:22", "user": "root",
//!   "host_key": "ssh-ed25519 AAAA..."}]}`; `user` is `root` unless given, and a host with an
//! `instance_type` is claimed for that type only. With every host claimed, a create fails
//! with a quota error: creation waits until a host is released (or `quota_hold` passes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use russh::keys::PrivateKey;
use serde::{Deserialize, Serialize};

use super::driver::{
    Driver, DriverError, Instance, InstanceSet, InstanceSpec, Result, check_set_id, parse_config,
};
use super::loopback::same_key;
use super::remote::{END_ALL, quote};
use super::ssh::{Executor, Target};

/// One host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticHost {
    /// The instance id it has while claimed (a worker's id): a DNS label.
    pub name: String,
    /// `host:port` of its SSH server.
    pub address: String,
    #[serde(default = "root")]
    pub user: String,
    /// Its host key, an OpenSSH public key line.
    pub host_key: String,
    /// Claimed for this instance type only; none: any.
    #[serde(default)]
    pub instance_type: Option<String>,
}

fn root() -> String {
    "root".to_owned()
}

/// A static set's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub hosts: Vec<StaticHost>,
}

impl StaticConfig {
    pub fn parse(config: &serde_json::Value) -> Result<Self> {
        let parsed: Self = parse_config("static", config)?;
        let invalid = |message: String| DriverError::InvalidConfig {
            message: format!("static: {message}"),
        };
        if parsed.hosts.is_empty() {
            return Err(invalid("no hosts".into()));
        }
        let mut names = BTreeSet::new();
        for host in &parsed.hosts {
            if !crate::domain::ids::dns_label(&host.name) || host.name.len() > 63 {
                return Err(invalid(format!(
                    "host name {:?}: lowercase letters, digits and '-', at most 63",
                    host.name
                )));
            }
            if !names.insert(host.name.as_str()) {
                return Err(invalid(format!("host {:?} is listed twice", host.name)));
            }
            if host
                .address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(format!(
                    "host {:?}: address {:?} is not host:port",
                    host.name, host.address
                )));
            }
            crate::tunnel::keys::parse_public(&host.host_key)
                .map_err(|e| invalid(format!("host {:?}: host_key: {e}", host.name)))?;
        }
        Ok(parsed)
    }
}

/// What a host's claim file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Claim {
    instance_type: String,
    tags: BTreeMap<String, String>,
}

/// The claim file, as a shell expression.
const CLAIM: &str = "\"${SWITCHYARD_HOME:=/var/lib/switchyard}/claim\"";

/// Claims the host unless it is claimed: the claim on stdin, written exclusively.
const TAKE: &str = r#"mkdir -p "${SWITCHYARD_HOME:=/var/lib/switchyard}" || exit 2
(set -C; cat > "$SWITCHYARD_HOME/claim") 2>/dev/null || exit 3
"#;

/// Rewrites the claim (stdin), if the host is claimed.
const RETAG: &str = r#"[ -f "${SWITCHYARD_HOME:=/var/lib/switchyard}/claim" ] || exit 3
cat > "$SWITCHYARD_HOME/claim.tmp" && mv "$SWITCHYARD_HOME/claim.tmp" "$SWITCHYARD_HOME/claim"
"#;

/// Lets the claim go, once [`END_ALL`] has ended what ran on the host for Switchyard.
const RELEASE: &str = r#"rm -f "$home/instance-secret" "$home/claim"
"#;

/// [`END_ALL`], then [`RELEASE`].
fn release() -> String {
    format!("{END_ALL}{RELEASE}")
}

/// Makes `static` instance sets; it logs in to the hosts with `key`.
#[derive(Clone)]
pub struct StaticDriver {
    key: Option<Arc<PrivateKey>>,
    timeout: Duration,
}

impl StaticDriver {
    /// A driver that logs in with `key` (none: every set it makes is refused), each command
    /// within `timeout`.
    pub fn new(key: Option<Arc<PrivateKey>>, timeout: Duration) -> Self {
        Self { key, timeout }
    }
}

impl Driver for StaticDriver {
    fn name(&self) -> &'static str {
        "static"
    }

    fn instance_set(
        &self,
        config: &serde_json::Value,
        set_id: &str,
    ) -> Result<Arc<dyn InstanceSet>> {
        check_set_id(set_id)?;
        let config = StaticConfig::parse(config)?;
        let Some(key) = self.key.clone() else {
            return Err(DriverError::InvalidConfig {
                message: "static: no key to log in to the hosts with".into(),
            });
        };
        let hosts = config
            .hosts
            .into_iter()
            .map(|host| {
                let known = Arc::new(KnownHost {
                    name: host.name.clone(),
                    host_key: host.host_key.clone(),
                });
                let executor = Executor::new(
                    Target {
                        instance: host.name.clone(),
                        address: host.address.clone(),
                        user: host.user.clone(),
                        secret: None,
                    },
                    key.clone(),
                    known,
                    self.timeout,
                );
                (host.name.clone(), (host, Arc::new(executor)))
            })
            .collect();
        Ok(Arc::new(StaticSet {
            hosts,
            seen: Mutex::new(BTreeMap::new()),
        }))
    }
}

/// A host's known key, as the executor's verifier: the one thing it is asked.
struct KnownHost {
    name: String,
    host_key: String,
}

fn not_implemented<T: Send + 'static>() -> BoxFuture<'static, Result<T>> {
    Box::pin(async { Err(DriverError::NotImplemented) })
}

impl InstanceSet for KnownHost {
    fn create<'a>(&'a self, _spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        not_implemented()
    }

    fn instances<'a>(
        &'a self,
        _tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        not_implemented()
    }

    fn destroy<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<()>> {
        not_implemented()
    }

    fn set_tags<'a>(
        &'a self,
        _id: &'a str,
        _tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        not_implemented()
    }

    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if id == self.name && same_key(&self.host_key, host_key) {
                Ok(())
            } else {
                Err(DriverError::Failed {
                    message: format!("{id} presented a host key that is not the configured one"),
                })
            }
        })
    }

    fn stop(&self) {}
}

struct StaticSet {
    hosts: BTreeMap<String, (StaticHost, Arc<Executor>)>,
    /// Each host's claim as last read: a host that does not answer now is listed as it was
    /// (without an address), not as gone.
    seen: Mutex<BTreeMap<String, Claim>>,
}

fn failed(message: impl Into<String>) -> DriverError {
    DriverError::Failed {
        message: message.into(),
    }
}

impl StaticSet {
    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Claim>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn host(&self, id: &str) -> Result<&(StaticHost, Arc<Executor>)> {
        self.hosts
            .get(id)
            .ok_or_else(|| failed(format!("no host {id} in this set")))
    }

    /// Runs `script` on the host with `stdin`; its exit status.
    async fn run(&self, id: &str, script: &str, stdin: &[u8]) -> Result<(Option<u32>, Vec<u8>)> {
        let (_, executor) = self.host(id)?;
        let output = executor
            .execute(&format!("sh -c {} sh", quote(script)), stdin)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok((output.status, output.stdout))
    }

    /// The host's claim now: `Ok(None)` when unclaimed, `Err` when it does not answer.
    async fn read_claim(&self, id: &str) -> Result<Option<Claim>> {
        let (status, out) = self
            .run(id, &format!("cat {CLAIM} 2>/dev/null || true"), b"")
            .await?;
        if status != Some(0) {
            return Err(failed(format!("{id}: reading its claim failed")));
        }
        if out.trim_ascii().is_empty() {
            return Ok(None);
        }
        // A claim that is not ours to read (another tool's, or half written) holds the host
        // all the same: it carries no tags anyone filters on.
        Ok(Some(serde_json::from_slice(&out).unwrap_or(Claim {
            instance_type: String::new(),
            tags: BTreeMap::new(),
        })))
    }

    fn instance(&self, host: &StaticHost, claim: &Claim, reachable: bool) -> Instance {
        Instance {
            id: host.name.clone(),
            instance_type: claim.instance_type.clone(),
            tags: claim.tags.clone(),
            address: reachable.then(|| host.address.clone()),
            remote_user: host.user.clone(),
        }
    }
}

impl InstanceSet for StaticSet {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            let claim = Claim {
                instance_type: spec.instance_type.clone(),
                tags: spec.tags.clone(),
            };
            let body = serde_json::to_vec(&claim).map_err(|e| failed(e.to_string()))?;
            let known = self.seen().clone();
            let candidates = self.hosts.values().filter(|(host, _)| {
                !known.contains_key(&host.name)
                    && host
                        .instance_type
                        .as_ref()
                        .is_none_or(|t| *t == spec.instance_type)
            });
            for (host, _) in candidates {
                match self.run(&host.name, TAKE, &body).await {
                    Ok((Some(0), _)) => {}
                    // Claimed already (by another set, or since it was last read), or down.
                    Ok(_) | Err(_) => continue,
                }
                let (status, _) = self.run(&host.name, &spec.init_command, b"").await?;
                if status != Some(0) {
                    let _ = self.run(&host.name, &release(), b"").await;
                    return Err(failed(format!(
                        "{}: the init command failed ({status:?})",
                        host.name
                    )));
                }
                self.seen().insert(host.name.clone(), claim.clone());
                return Ok(self.instance(host, &claim, true));
            }
            Err(DriverError::Quota {
                message: format!(
                    "every host that can be a {} is claimed or does not answer",
                    spec.instance_type
                ),
            })
        })
    }

    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let read = futures::future::join_all(
                self.hosts
                    .values()
                    .map(|(host, _)| async move { (host, self.read_claim(&host.name).await) }),
            )
            .await;
            let mut found = Vec::new();
            let mut seen = self.seen();
            for (host, claim) in read {
                let (claim, reachable) = match claim {
                    Ok(Some(claim)) => {
                        seen.insert(host.name.clone(), claim.clone());
                        (claim, true)
                    }
                    Ok(None) => {
                        seen.remove(&host.name);
                        continue;
                    }
                    Err(_) => match seen.get(&host.name) {
                        Some(claim) => (claim.clone(), false),
                        None => continue,
                    },
                };
                if tags.iter().all(|(k, v)| claim.tags.get(k) == Some(v)) {
                    found.push(self.instance(host, &claim, reachable));
                }
            }
            Ok(found)
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (status, _) = self.run(id, &release(), b"").await?;
            if status != Some(0) {
                return Err(failed(format!("{id}: releasing it failed ({status:?})")));
            }
            self.seen().remove(id);
            Ok(())
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(mut claim) = self.read_claim(id).await? else {
                return Err(failed(format!("{id} is not claimed")));
            };
            claim.tags = tags.clone();
            let body = serde_json::to_vec(&claim).map_err(|e| failed(e.to_string()))?;
            let (status, _) = self.run(id, RETAG, &body).await?;
            if status != Some(0) {
                return Err(failed(format!("{id}: re-tagging failed ({status:?})")));
            }
            self.seen().insert(id.to_owned(), claim);
            Ok(())
        })
    }

    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (host, _) = self.host(id)?;
            if same_key(&host.host_key, host_key) {
                Ok(())
            } else {
                Err(failed(format!(
                    "{id} presented a host key that is not the configured one"
                )))
            }
        })
    }

    fn stop(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn configuration_is_checked() {
        let host = |name: &str, address: &str, key: &str| serde_json::json!({"name": name, "address": address, "host_key": key});
        let parsed =
            StaticConfig::parse(&serde_json::json!({"hosts": [host("a", "h:22", KEY)]})).unwrap();
        assert_eq!(parsed.hosts[0].user, "root");
        let refused = [
            serde_json::json!({}),
            serde_json::json!({"hosts": []}),
            serde_json::json!({"hosts": [host("a", "h:22", KEY), host("a", "i:22", KEY)]}),
            serde_json::json!({"hosts": [host("a", "h", KEY)]}),
            serde_json::json!({"hosts": [host("a", ":22", KEY)]}),
            serde_json::json!({"hosts": [host("a", "h:22", "not a key")]}),
            serde_json::json!({"hosts": [host("a b", "h:22", KEY)]}),
            serde_json::json!({"hosts": [host("a", "h:22", KEY)], "extra": 1}),
        ];
        for config in refused {
            assert!(
                matches!(
                    StaticConfig::parse(&config),
                    Err(DriverError::InvalidConfig { .. })
                ),
                "{config}"
            );
        }
    }
}
