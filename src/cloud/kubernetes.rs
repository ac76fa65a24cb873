//! The `kubernetes` driver: an instance is a pod that runs an OpenSSH server, made through the
//! Kubernetes backends' client ([`crate::kubernetes::Kube`]: a span per call, API errors
//! typed, throttling waited out). Each instance is two objects of one name, in
//! `driver_config.namespace` (else `kubernetes.namespace`):
//!
//! - a Secret, made first: the instance's tags (`tags`, JSON), its type, the init command and
//!   the public key that may log in. The tags hold the instance secret, so they are never in
//!   a pod spec or an annotation; a Secret without its pod (a crash between the two) is an
//!   instance that never boots, shut down and deleted after `timeout_booting`.
//! - a pod (never restarted, no service-account token, `driver_config.node_selector`) from the
//!   pool's `image`, which must have `/bin/sh` and OpenSSH's `sshd`: its command writes the
//!   key to `/root/.ssh/authorized_keys`, runs the init command, makes host keys and serves
//!   SSH on `ssh_port` (22) with `SWITCHYARD_HOME` set for every login. The init command and
//!   the key come from the Secret (`secretKeyRef`).
//!
//! Both carry `app.kubernetes.io/managed-by`, `switchyard.dev/instance` and
//! `switchyard.dev/instance-set`; listing reads both by those labels (a set's own, or all this
//! Switchyard made when no set is asked for). A pod's address is its
//! IP and `ssh_port` once it runs. Destroying deletes the pod, then the Secret. The driver
//! cannot verify host keys: the instance secret is checked. A 403 "exceeded quota" (a
//! ResourceQuota) is a quota error; other API errors are failures.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::Deserialize;

use super::driver::{
    Driver, DriverError, Instance, InstanceSet, InstanceSpec, Result, check_set_id, parse_config,
};
use crate::config::KubernetesConfig;
use crate::kubernetes::{
    Call, INSTANCE, Kube, KubeError, MANAGED_BY, SWITCHYARD, label, label_value,
};

/// The label naming an object's instance set.
pub const SET: &str = "switchyard.dev/instance-set";

/// Where an instance serves, as its pod's command does it.
const HOME: &str = "/var/lib/switchyard";

/// The pod's command: the key, the init command, host keys, then sshd in the foreground.
const BOOT: &str = r#"set -e
mkdir -p /root/.ssh "$SWITCHYARD_HOME" /run/sshd
chmod 700 /root/.ssh
printf '%s\n' "$SWITCHYARD_PUBLIC_KEY" > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
/bin/sh -c "$SWITCHYARD_INIT"
ssh-keygen -A
exec /usr/sbin/sshd -D -e -p "$SWITCHYARD_SSH_PORT" -o PasswordAuthentication=no \
  -o KbdInteractiveAuthentication=no -o PermitRootLogin=prohibit-password \
  -o "SetEnv=SWITCHYARD_HOME=$SWITCHYARD_HOME"
"#;

/// A set's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDriverConfig {
    /// Where the instances are; none: `kubernetes.namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default = "ssh_port")]
    pub ssh_port: u16,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

fn ssh_port() -> u16 {
    22
}

/// Makes `kubernetes` instance sets on the cluster `[kubernetes]` names.
#[derive(Clone)]
pub struct KubernetesDriver {
    kube: std::result::Result<Kube, String>,
    /// This Switchyard's instance (its stream prefix, lower-cased), as a label value.
    instance: String,
}

impl KubernetesDriver {
    pub fn new(config: &KubernetesConfig, instance: &str) -> Self {
        Self {
            kube: Kube::new(config.clone()).map_err(|e| e.to_string()),
            instance: label_value(instance),
        }
    }
}

impl Driver for KubernetesDriver {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn instance_set(
        &self,
        config: &serde_json::Value,
        set_id: &str,
    ) -> Result<Arc<dyn InstanceSet>> {
        check_set_id(set_id)?;
        let parsed: KubernetesDriverConfig = parse_config("kubernetes", config)?;
        let kube = self.kube.clone().map_err(|e| DriverError::InvalidConfig {
            message: format!("kubernetes: {e}"),
        })?;
        let namespace = parsed
            .namespace
            .clone()
            .unwrap_or_else(|| kube.config().namespace.clone());
        if !crate::domain::ids::dns_label(&namespace) {
            return Err(DriverError::InvalidConfig {
                message: format!("kubernetes: namespace {namespace:?} is not a DNS label"),
            });
        }
        Ok(Arc::new(PodSet {
            kube,
            set_id: set_id.to_owned(),
            selector: format!("{MANAGED_BY}={SWITCHYARD},{INSTANCE}={}", self.instance),
            instance: self.instance.clone(),
            namespace,
            config: parsed,
        }))
    }
}

struct PodSet {
    kube: Kube,
    set_id: String,
    /// What this Switchyard made, of every set.
    selector: String,
    instance: String,
    namespace: String,
    config: KubernetesDriverConfig,
}

fn failed(err: KubeError) -> DriverError {
    match err {
        KubeError::Forbidden { message, .. } if message.contains("exceeded quota") => {
            DriverError::Quota { message }
        }
        other => DriverError::Failed {
            message: other.to_string(),
        },
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

impl PodSet {
    async fn client(&self) -> Result<kube::Client> {
        self.kube.client().await.map_err(failed)
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), SWITCHYARD.to_owned()),
            (INSTANCE.to_owned(), self.instance.clone()),
            (SET.to_owned(), label_value(&self.set_id)),
        ])
    }

    fn secret(&self, name: &str, spec: &InstanceSpec, tags: &str) -> Secret {
        let data = [
            ("tags", tags),
            ("instance_type", spec.instance_type.as_str()),
            ("init", spec.init_command.as_str()),
            ("public_key", spec.public_key.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    fn pod(&self, name: &str, spec: &InstanceSpec) -> Result<Pod> {
        let from_secret = |variable: &str, key: &str| {
            serde_json::json!({"name": variable,
                "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
        };
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": self.labels()},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "nodeSelector": self.config.node_selector,
                "containers": [{
                    "name": "sshd",
                    "image": spec.image,
                    "command": ["/bin/sh", "-c", BOOT],
                    "env": [
                        from_secret("SWITCHYARD_INIT", "init"),
                        from_secret("SWITCHYARD_PUBLIC_KEY", "public_key"),
                        {"name": "SWITCHYARD_HOME", "value": HOME},
                        {"name": "SWITCHYARD_SSH_PORT", "value": self.config.ssh_port.to_string()},
                    ],
                    "ports": [{"name": "ssh", "containerPort": self.config.ssh_port}],
                }],
            },
        });
        serde_json::from_value(pod).map_err(|e| DriverError::Failed {
            message: format!("cannot build the pod: {e}"),
        })
    }

    fn instance(&self, secret: &Secret, pod: Option<&Pod>) -> Option<Instance> {
        let name = secret.metadata.name.clone()?;
        let tags = text(secret, "tags")
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let address = pod
            .and_then(|p| p.status.as_ref())
            .filter(|s| s.phase.as_deref() == Some("Running"))
            .and_then(|s| s.pod_ip.clone())
            .map(|ip| format!("{ip}:{}", self.config.ssh_port));
        Some(Instance {
            id: name,
            instance_type: text(secret, "instance_type").unwrap_or_default(),
            tags,
            address,
            remote_user: "root".to_owned(),
        })
    }
}

impl InstanceSet for PodSet {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            if spec.image.is_empty() {
                return Err(DriverError::InvalidConfig {
                    message: "kubernetes: the pool has no image (one with /bin/sh and sshd)".into(),
                });
            }
            let client = self.client().await?;
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
            let name = format!("{}-{suffix}", label(&self.set_id, 54));
            let tags = serde_json::to_string(&spec.tags).map_err(|e| DriverError::Failed {
                message: e.to_string(),
            })?;
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
            let secret = self.secret(&name, spec, &tags);
            // Tagged before anything runs: a crash now leaves an instance to adopt.
            self.kube.create(&secrets, &secret).await.map_err(failed)?;
            let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
            self.kube
                .create(&pods, &self.pod(&name, spec)?)
                .await
                .map_err(failed)?;
            Ok(Instance {
                id: name,
                instance_type: spec.instance_type.clone(),
                tags: spec.tags.clone(),
                address: None,
                remote_user: "root".to_owned(),
            })
        })
    }

    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let client = self.client().await?;
            let ns = Some(self.namespace.as_str());
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
            let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
            // Asked for one set's (the usual case): the API picks them by its label.
            let selector = match tags.get(super::driver::tag::INSTANCE_SET) {
                Some(set) => format!("{},{SET}={}", self.selector, label_value(set)),
                None => self.selector.clone(),
            };
            let secrets = self
                .kube
                .list(&secrets, ns, &selector)
                .await
                .map_err(failed)?;
            let pods: BTreeMap<String, Pod> = self
                .kube
                .list(&pods, ns, &selector)
                .await
                .map_err(failed)?
                .into_iter()
                .filter_map(|p| Some((p.metadata.name.clone()?, p)))
                .collect();
            Ok(secrets
                .iter()
                .filter_map(|secret| {
                    let name = secret.metadata.name.as_deref()?;
                    self.instance(secret, pods.get(name))
                })
                .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
                .collect())
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let client = self.client().await?;
            let ns = Some(self.namespace.as_str());
            let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
            self.kube.delete(&pods, ns, id).await.map_err(failed)?;
            let secrets: Api<Secret> = Api::namespaced(client, &self.namespace);
            self.kube.delete(&secrets, ns, id).await.map_err(failed)
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let client = self.client().await?;
            let secrets: Api<Secret> = Api::namespaced(client, &self.namespace);
            let tags = serde_json::to_string(tags).map_err(|e| DriverError::Failed {
                message: e.to_string(),
            })?;
            let patch = serde_json::json!({"data": {"tags": ByteString(tags.into_bytes())}});
            let call = Call::on::<Secret>("patch", Some(&self.namespace), Some(id));
            self.kube
                .call(call, |_| {
                    let secrets = secrets.clone();
                    let patch = patch.clone();
                    async move {
                        secrets
                            .patch(id, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .map(|_| ())
                    }
                })
                .await
                .map_err(failed)
        })
    }

    fn verify_host_key<'a>(
        &'a self,
        _id: &'a str,
        _host_key: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Err(DriverError::NotImplemented) })
    }

    fn stop(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked() {
        let driver = KubernetesDriver::new(&KubernetesConfig::default(), "Switchyard");
        let set = driver.instance_set(&serde_json::json!({"ssh_port": 2222}), "pool_A");
        assert!(set.is_ok());
        for bad in [
            serde_json::json!({"ssh_port": 70000}),
            serde_json::json!({"namespace": "Not A Label"}),
            serde_json::json!({"image": "x"}),
        ] {
            assert!(
                matches!(
                    driver.instance_set(&bad, "a"),
                    Err(DriverError::InvalidConfig { .. })
                ),
                "{bad}"
            );
        }
    }
}
