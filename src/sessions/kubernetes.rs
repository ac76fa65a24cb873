//! The Kubernetes session backend (`sessions.backend = "kubernetes"`): each component is a pod
//! in `kubernetes.namespace`, and pools are the cluster's nodes.
//!
//! - A component's pod (`<session>-<component>`) runs its image with its command, arguments
//!   and environment, `PORT` = `kubernetes.component_port`, on a node of its pool (node
//!   selector `<pool_label>=<pool>`), one session component per node (required pod
//!   anti-affinity, as orch had), never restarted. Its address is `<pod IP>:<port>`, so the
//!   driver's `QPS_WORKERS` lists the workers' pod IPs.
//! - Health comes from a kube-runtime watcher over this instance's pods, kept in a reflector
//!   store: what the executor observes is the store's current state, so no terminal state can
//!   be dropped (orch's watcher dropped events when its buffer was full, and never came back
//!   after a watch error). After a watch error the watcher lists again and the store is
//!   replaced by what the list says. A pod maps to orch's health: terminated with exit 0 is
//!   Succeeded, otherwise Failed with the reason; waiting in `CrashLoopBackOff`,
//!   `ImagePullBackOff` and the like is Failed; running is Ready (once its readiness check,
//!   if any, passes); anything else is pending.
//! - Logs are read from the pod; cleanup deletes the session's pods by label.
//! - Pools: nodes labelled `<pool_label>=<pool>` make up the pool, one machine per node. A
//!   watcher over them records the pools on the scheduler (`scheduler.configured`) whenever a
//!   node joins, leaves or changes pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EnvVar, Node, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, Pod, PodAffinityTerm, PodAntiAffinity, PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::backend::{Chunk, SessionBackend};
use crate::backend::{BackendError, Result};
use crate::domain::sessions::plan::Observed;
use crate::domain::sessions::scheduler::PoolSpec;
use crate::domain::sessions::spec::{ComponentSpec, ReadinessCheck};
use crate::domain::sessions::{ComponentName, MachineName, PoolName, SessionId};
use crate::kubernetes::{INSTANCE, Kube, MANAGED_BY, SWITCHYARD, label, label_value};

pub const SESSION: &str = "switchyard.dev/session";
pub const COMPONENT: &str = "switchyard.dev/component";
pub const COMPONENT_KIND: &str = "switchyard.dev/component-kind";
pub const POOL: &str = "switchyard.dev/pool";

/// The pod of a session's component: both names and a digest of the pair, so that no two
/// pairs share a pod (`a-b` + `c` and `a` + `b-c` would).
pub fn pod_name(session: &SessionId, component: &ComponentName) -> String {
    let hex = crate::kubernetes::digest(&format!("{session}\n{component}"), 4);
    let name = label(&format!("{session}-{component}"), 63 - hex.len() - 1);
    format!("{name}-{hex}")
}

/// The labels that pick this instance's session pods (and one session's, with `session`).
pub fn selector(instance: &str, session: Option<&SessionId>) -> String {
    let mut selector = crate::kubernetes::instance_selector(instance);
    match session {
        Some(session) => {
            selector.push_str(&format!(",{SESSION}={}", label_value(session.as_str())));
        }
        None => selector.push_str(&format!(",{SESSION}")),
    }
    selector
}

/// What a component's pod is made of.
#[derive(Clone, Debug)]
pub struct PodPlan<'a> {
    pub instance: &'a str,
    pub namespace: &'a str,
    pub session: &'a SessionId,
    pub component: &'a ComponentSpec,
    pub env: &'a BTreeMap<String, String>,
    pub port: u16,
    pub pool_label: &'a str,
    /// The node it must run on (the scheduler's placement, when pools are nodes).
    pub node: Option<&'a MachineName>,
}

impl PodPlan<'_> {
    /// The pod; a component without an image, or with a readiness command, cannot run here.
    pub fn pod(&self) -> std::result::Result<Pod, String> {
        let component = self.component;
        let Some(image) = &component.image else {
            return Err(format!(
                "component {} has no image: the Kubernetes backend runs images",
                component.name
            ));
        };
        if let Some(ReadinessCheck::Command { .. }) = &component.readiness {
            return Err(format!(
                "component {}: a readiness command runs on the process backend only; use a tcp \
                 readiness check on Kubernetes",
                component.name
            ));
        }
        let labels = BTreeMap::from([
            (MANAGED_BY.to_owned(), SWITCHYARD.to_owned()),
            (INSTANCE.to_owned(), label_value(self.instance)),
            (SESSION.to_owned(), label_value(self.session.as_str())),
            (COMPONENT.to_owned(), label_value(component.name.as_str())),
            (COMPONENT_KIND.to_owned(), component.kind.to_string()),
            (POOL.to_owned(), label_value(component.pool.as_str())),
        ]);
        // The whole ids, which labels may have had to shorten.
        let annotations = BTreeMap::from([
            (SESSION.to_owned(), self.session.to_string()),
            (COMPONENT.to_owned(), component.name.to_string()),
        ]);
        let mut env: Vec<EnvVar> = self
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                ..EnvVar::default()
            })
            .collect();
        env.push(EnvVar {
            name: "PORT".to_owned(),
            value: Some(self.port.to_string()),
            ..EnvVar::default()
        });
        Ok(Pod {
            metadata: ObjectMeta {
                name: Some(pod_name(self.session, &component.name)),
                namespace: Some(self.namespace.to_owned()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some("Never".to_owned()),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                node_selector: Some(BTreeMap::from([(
                    self.pool_label.to_owned(),
                    component.pool.to_string(),
                )])),
                // One session component per node: a pool's machine is a node.
                affinity: Some(Affinity {
                    node_affinity: self.node.map(|node| NodeAffinity {
                        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                            node_selector_terms: vec![NodeSelectorTerm {
                                match_fields: Some(vec![NodeSelectorRequirement {
                                    key: "metadata.name".to_owned(),
                                    operator: "In".to_owned(),
                                    values: Some(vec![node.to_string()]),
                                }]),
                                ..NodeSelectorTerm::default()
                            }],
                        }),
                        ..NodeAffinity::default()
                    }),
                    pod_anti_affinity: Some(PodAntiAffinity {
                        required_during_scheduling_ignored_during_execution: Some(vec![
                            PodAffinityTerm {
                                label_selector: Some(LabelSelector {
                                    match_expressions: Some(vec![LabelSelectorRequirement {
                                        key: SESSION.to_owned(),
                                        operator: "Exists".to_owned(),
                                        values: None,
                                    }]),
                                    ..LabelSelector::default()
                                }),
                                topology_key: "kubernetes.io/hostname".to_owned(),
                                ..PodAffinityTerm::default()
                            },
                        ]),
                        ..PodAntiAffinity::default()
                    }),
                    ..Affinity::default()
                }),
                containers: vec![Container {
                    name: "main".to_owned(),
                    image: Some(image.clone()),
                    command: Some(vec![component.command.clone()]),
                    args: Some(component.args.clone()),
                    env: Some(env),
                    ports: Some(vec![ContainerPort {
                        name: Some("component".to_owned()),
                        container_port: i32::from(self.port),
                        protocol: Some("TCP".to_owned()),
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        })
    }
}

/// What a pod says of its component (orch's `diagnose`, with the reasons kept).
pub fn observe_pod(pod: &Pod, port: u16) -> Observed {
    let status = pod.status.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return Observed::Vanished {
            address: status.pod_ip.map(|ip| format!("{ip}:{port}")),
            why: "its pod is being deleted".to_owned(),
        };
    }
    let address = status
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .map(|ip| format!("{ip}:{port}"));
    if let Some(container) = status.container_statuses.iter().flatten().next() {
        let terminated = container
            .state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .or_else(|| {
                container
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.clone())
            });
        if let Some(terminated) = terminated {
            return Observed::Exited {
                address: address.unwrap_or_default(),
                code: terminated.exit_code,
            };
        }
        if let Some(why) = crate::kubernetes::fatal_wait(container) {
            return Observed::Failed {
                address,
                why: format!("its container is waiting: {why}"),
            };
        }
        if container
            .state
            .as_ref()
            .is_some_and(|s| s.running.is_some())
            && let Some(address) = address.clone()
        {
            return Observed::Running { address };
        }
    }
    match status.phase.as_deref() {
        Some("Failed") => Observed::Failed {
            address,
            why: format!(
                "its pod failed: {}",
                crate::kubernetes::reason_and_message(
                    status.reason.as_deref(),
                    status.message.as_deref()
                )
            ),
        },
        Some("Succeeded") => Observed::Exited {
            address: address.unwrap_or_default(),
            code: 0,
        },
        Some("Running") if status.container_statuses.is_none() => match address {
            Some(address) => Observed::Running { address },
            None => Observed::Pending,
        },
        _ => Observed::Pending,
    }
}

/// The pools that `nodes` make: each node labelled `<pool_label>=<pool>` is one machine of it.
pub fn pools_of(nodes: &[Arc<Node>], pool_label: &str) -> Vec<PoolSpec> {
    let mut pools: BTreeMap<PoolName, Vec<MachineName>> = BTreeMap::new();
    for node in nodes {
        let Some(pool) = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(pool_label))
            .and_then(|p| PoolName::new(p.clone()).ok())
        else {
            continue;
        };
        let Some(machine) = node
            .metadata
            .name
            .clone()
            .and_then(|n| MachineName::new(n).ok())
        else {
            continue;
        };
        pools.entry(pool).or_default().push(machine);
    }
    pools
        .into_iter()
        .map(|(name, mut machines)| {
            machines.sort();
            PoolSpec {
                name,
                machines,
                labels: BTreeMap::new(),
                max_machines: 0,
            }
        })
        .collect()
}

/// Each component a pod; health from a watcher's store.
pub struct KubernetesSessions {
    kube: Kube,
    instance: String,
    pods: Store<Pod>,
    /// Pools are nodes: a component runs on the node it was placed on.
    pin: bool,
}

impl KubernetesSessions {
    /// Starts the pod watcher (it runs until `stopped`). With `pin`, the pools are the nodes
    /// and each component is placed on its machine's node.
    pub fn start(kube: Kube, instance: &str, pin: bool, stopped: watch::Receiver<bool>) -> Self {
        let (pods, writer) = reflector::store::<Pod>();
        let watched = kube.clone();
        let selector = selector(instance, None);
        tokio::spawn(async move {
            let client = loop {
                match watched.client().await {
                    Ok(client) => break client,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot reach Kubernetes to watch session pods; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            };
            let api: Api<Pod> = Api::namespaced(client, &watched.config().namespace);
            let stream = watcher(api, watcher::Config::default().labels(&selector))
                .default_backoff()
                .reflect(writer);
            follow(stream, "session pods", stopped).await;
        });
        Self {
            kube,
            instance: instance.to_owned(),
            pods,
            pin,
        }
    }

    fn namespace(&self) -> &str {
        &self.kube.config().namespace
    }

    async fn api(&self) -> Result<Api<Pod>> {
        Ok(Api::namespaced(self.kube.client().await?, self.namespace()))
    }

    /// The store once it holds a first full list (a few seconds at most, else what it has).
    async fn synced(&self) -> Result<()> {
        match tokio::time::timeout(
            self.kube.config().call_timeout,
            self.pods.wait_until_ready(),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            _ => Err(BackendError::Unavailable {
                what: "the session pod watcher".into(),
                reason: "it has not listed the pods yet".into(),
            }),
        }
    }
}

/// Drives a watcher stream until `stopped`, logging its errors (it retries them itself).
async fn follow<S, T>(stream: S, what: &'static str, mut stopped: watch::Receiver<bool>)
where
    S: futures::Stream<Item = std::result::Result<T, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(_)) => {}
                Some(Err(err)) => tracing::warn!(error = %err, "the watch of {what} failed; it lists and watches again"),
                None => return,
            },
            _ = stopped.changed() => return,
        }
    }
}

impl SessionBackend for KubernetesSessions {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn observe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<BTreeMap<ComponentName, Observed>>> {
        Box::pin(async move {
            self.synced().await?;
            let port = self.kube.config().component_port;
            Ok(self
                .pods
                .state()
                .iter()
                .filter(|pod| {
                    pod.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(SESSION))
                        .is_some_and(|s| s == session.as_str())
                })
                .filter_map(|pod| {
                    let component = pod
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(COMPONENT))
                        .and_then(|c| ComponentName::new(c.clone()).ok())?;
                    Some((component, observe_pod(pod, port)))
                })
                .collect())
        })
    }

    fn start<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentSpec,
        machine: Option<&'a MachineName>,
        env: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let config = self.kube.config();
            let plan = PodPlan {
                instance: &self.instance,
                namespace: self.namespace(),
                session,
                component,
                env: &env,
                port: config.component_port,
                pool_label: &config.pool_label,
                node: machine.filter(|_| self.pin),
            };
            let pod = plan.pod().map_err(|reason| BackendError::Refused {
                what: format!("cannot start component {}", component.name),
                reason,
            })?;
            let api = self.api().await?;
            self.kube.create(&api, &pod).await?;
            // Its address is its pod's IP, known once it runs: observing reports it.
            Ok(None)
        })
    }

    fn check<'a>(
        &'a self,
        _session: &'a SessionId,
        component: &'a ComponentName,
        _command: &'a str,
        _args: &'a [String],
        _env: &'a BTreeMap<String, String>,
        _timeout: Duration,
    ) -> BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            Err(format!(
                "component {component}: readiness commands run on the process backend only"
            ))
        })
    }

    fn output<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentName,
        offset: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<Chunk>>> {
        Box::pin(async move {
            let api = self.api().await?;
            let name = pod_name(session, component);
            let text = match self.kube.pod_log(&api, self.namespace(), &name, None).await {
                Ok(text) => text,
                Err(crate::kubernetes::KubeError::NotFound { .. }) => return Ok(None),
                Err(err) => return Err(err.into()),
            };
            let bytes = text.into_bytes();
            let length = bytes.len() as u64;
            let start = usize::try_from(offset.min(length)).unwrap_or(usize::MAX);
            let end = start.saturating_add(max).min(bytes.len());
            Ok(Some((bytes[start..end].to_vec(), length)))
        })
    }

    fn remove<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let api = self.api().await?;
            let selector = selector(&self.instance, Some(session));
            self.kube
                .delete_all(&api, Some(self.namespace()), &selector)
                .await?;
            Ok(())
        })
    }

    fn sessions(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            let api = self.api().await?;
            let found = self
                .kube
                .list(
                    &api,
                    Some(self.namespace()),
                    &selector(&self.instance, None),
                )
                .await?;
            let mut sessions: BTreeMap<String, SystemTime> = BTreeMap::new();
            for pod in found {
                let Some(session) = pod
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SESSION).cloned())
                else {
                    continue;
                };
                let at = pod
                    .metadata
                    .creation_timestamp
                    .map(|t| SystemTime::from(t.0))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let slot = sessions.entry(session).or_insert(at);
                *slot = (*slot).max(at);
            }
            Ok(sessions.into_iter().collect())
        })
    }
}

/// Follows the nodes labelled with `kubernetes.pool_label` and sends the pools they make
/// whenever they change.
pub fn watch_pools(
    kube: Kube,
    stopped: watch::Receiver<bool>,
) -> watch::Receiver<Option<Vec<PoolSpec>>> {
    let (send, receive) = watch::channel(None);
    tokio::spawn(async move {
        let client = loop {
            match kube.client().await {
                Ok(client) => break client,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach Kubernetes to watch nodes; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let label = kube.config().pool_label.clone();
        let api: Api<Node> = Api::all(client);
        let (nodes, writer) = reflector::store::<Node>();
        let stream = watcher(api, watcher::Config::default().labels(&label))
            .default_backoff()
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut stopped = stopped;
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    // While it lists (again), the store is not complete yet: wait for its end.
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    Some(Ok(_)) => {
                        let pools = pools_of(&nodes.state(), &label);
                        send.send_if_modified(|current| {
                            if current.as_ref() == Some(&pools) {
                                false
                            } else {
                                *current = Some(pools);
                                true
                            }
                        });
                    }
                    Some(Err(err)) => tracing::warn!(error = %err, "the watch of nodes failed; it lists and watches again"),
                    None => return,
                },
                _ = stopped.changed() => return,
            }
        }
    });
    receive
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::sessions::ComponentKind;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, PodStatus,
    };

    fn component() -> ComponentSpec {
        ComponentSpec {
            name: ComponentName::new("driver").unwrap(),
            kind: ComponentKind::Driver,
            pool: PoolName::new("drivers").unwrap(),
            command: "qps_json_driver".into(),
            args: vec!["--scenarios_json".into()],
            env: BTreeMap::new(),
            image: Some("grpc/driver".into()),
            readiness: None,
            keep_log: true,
        }
    }

    #[test]
    fn a_components_pod_runs_on_its_pool_one_per_node_never_restarted() {
        let session = SessionId::new("s1").unwrap();
        let component = component();
        let env = BTreeMap::from([("QPS_WORKERS".to_owned(), "10.0.0.1:10000".to_owned())]);
        let plan = PodPlan {
            instance: "switchyard",
            namespace: "default",
            session: &session,
            component: &component,
            env: &env,
            port: 10000,
            pool_label: "pool",
            node: Some(&MachineName::new("n3").unwrap()),
        };
        let pod = plan.pod().unwrap();
        assert!(pod.metadata.name.unwrap().starts_with("s1-driver-"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["pool"], "drivers");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let env: Vec<(String, String)> = spec.containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        assert!(env.contains(&("QPS_WORKERS".into(), "10.0.0.1:10000".into())));
        assert!(env.contains(&("PORT".into(), "10000".into())));
        let affinity = spec.affinity.unwrap();
        assert!(affinity.pod_anti_affinity.is_some());
        let pinned = serde_json::to_string(&affinity.node_affinity).unwrap();
        assert!(pinned.contains("\"n3\""), "{pinned}");
        // Joined names that read the same get distinct pods.
        let (a, b) = (
            pod_name(
                &SessionId::new("a-b").unwrap(),
                &ComponentName::new("c").unwrap(),
            ),
            pod_name(
                &SessionId::new("a").unwrap(),
                &ComponentName::new("b-c").unwrap(),
            ),
        );
        assert_ne!(a, b);
        assert!(a.len() <= 63 && crate::domain::ids::dns_label(&a));
    }

    #[test]
    fn without_an_image_or_with_a_readiness_command_it_is_refused() {
        let session = SessionId::new("s1").unwrap();
        let mut component = component();
        component.image = None;
        let env = BTreeMap::new();
        let refusal = |component: &ComponentSpec| {
            PodPlan {
                instance: "switchyard",
                namespace: "default",
                session: &session,
                component,
                env: &env,
                port: 10000,
                pool_label: "pool",
                node: None,
            }
            .pod()
            .unwrap_err()
        };
        assert!(refusal(&component).contains("no image"));
        component.image = Some("i".into());
        component.readiness = Some(ReadinessCheck::Command {
            command: "true".into(),
            args: vec![],
        });
        assert!(refusal(&component).contains("readiness command"));
    }

    fn with_container(state: ContainerState) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.7".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "main".into(),
                    state: Some(state),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn pods_map_to_orchs_health() {
        assert_eq!(observe_pod(&Pod::default(), 10000), Observed::Pending);
        let running = with_container(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        });
        assert_eq!(
            observe_pod(&running, 10000),
            Observed::Running {
                address: "10.0.0.7:10000".into()
            }
        );
        let exited = |code| {
            with_container(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            })
        };
        assert_eq!(
            observe_pod(&exited(3), 10000),
            Observed::Exited {
                address: "10.0.0.7:10000".into(),
                code: 3
            }
        );
        let crashing = with_container(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".into()),
                message: None,
            }),
            ..ContainerState::default()
        });
        assert!(
            matches!(observe_pod(&crashing, 10000), Observed::Failed { why, .. } if why.contains("CrashLoopBackOff"))
        );
    }

    #[test]
    fn nodes_labelled_with_a_pool_make_it_up() {
        let node = |name: &str, pool: Option<&str>| {
            let mut labels = BTreeMap::new();
            if let Some(pool) = pool {
                labels.insert("pool".to_owned(), pool.to_owned());
            }
            Arc::new(Node {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            })
        };
        let pools = pools_of(
            &[
                node("n2", Some("workers")),
                node("n1", Some("workers")),
                node("n3", Some("drivers")),
                node("n4", None),
                node("n5", Some("Not A Pool")),
            ],
            "pool",
        );
        let summary: Vec<(String, Vec<String>)> = pools
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    p.machines.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("drivers".to_owned(), vec!["n3".to_owned()]),
                ("workers".to_owned(), vec!["n1".to_owned(), "n2".to_owned()])
            ]
        );
    }
}
