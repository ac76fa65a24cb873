//! What the Kubernetes lesson backend makes of a live lesson: pure functions from the lesson to
//! the objects, and from what the API reports back to what the scheduler sees. No I/O.
//!
//! A live lesson is one namespace (`<instance>-<live lesson>`), labelled with the Switchyard
//! instance, the live lesson, the live session and the lesson. In it:
//!
//! - Secret `credentials`: the lesson's ed25519 key pair and a host key per endpoint. Pods
//!   mount only `authorized_keys` and their own host key, read-only, at `/etc/switchyard`.
//! - A Pod per endpoint, named after it: the endpoint's image; its `command` if it has one,
//!   else, when it has an ssh presentation, an OpenSSH `sshd` started with the mounted keys
//!   (the image provides `sh` and `/usr/sbin/sshd`), else the image's own entrypoint. No
//!   service account token, no service links.
//! - A ClusterIP Service per presentation (`<endpoint>-<presentation>`), whose address is the
//!   presentation's.
//! - NetworkPolicies: everything isolated; DNS allowed out; traffic in allowed from namespaces
//!   that are not live lessons (the control plane, people's gateways); and, per connection of
//!   the lesson, traffic both ways between its two endpoints. Nothing else between lessons, or
//!   between endpoints the lesson does not connect.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, KeyToPath, Namespace, Pod, PodSpec, Secret, SecretVolumeSource,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::domain::lessons::catalog::{Endpoint, Lesson, PresentationKind};
use crate::domain::lessons::plan::Seen;
use crate::domain::lessons::{EndpointName, LiveLessonId, LiveSessionId};
use crate::kubernetes::{
    INSTANCE, MANAGED_BY, SWITCHYARD, fatal_wait, label, label_value, reason_and_message,
};

pub const LIVE_LESSON: &str = "switchyard.dev/live-lesson";
pub const LIVE_SESSION: &str = "switchyard.dev/live-session";
pub const LESSON: &str = "switchyard.dev/lesson";
pub const ENDPOINT: &str = "switchyard.dev/endpoint";
pub const PRESENTATION: &str = "switchyard.dev/presentation";
/// The Secret with the lesson's keys.
pub const SECRET: &str = "credentials";
/// Where pods find their keys.
pub const MOUNT: &str = "/etc/switchyard";
/// The Secret's keys: the lesson's private key and its `authorized_keys` line.
pub const PRIVATE_KEY: &str = "id_ed25519";
pub const AUTHORIZED_KEYS: &str = "authorized_keys";

/// The Secret key of an endpoint's private host key (`.pub` appended: its public key).
pub fn host_key_name(endpoint: &EndpointName) -> String {
    format!("host-{endpoint}")
}

/// Who a lesson's objects belong to.
#[derive(Clone, Debug)]
pub struct Owner<'a> {
    pub instance: &'a str,
    pub id: &'a LiveLessonId,
    pub session: &'a LiveSessionId,
    pub lesson: &'a Lesson,
}

/// The namespace of a live lesson: a DNS label made of the instance and the lesson's id.
pub fn namespace_name(instance: &str, id: &LiveLessonId) -> String {
    label(&format!("{instance}-{id}"), 63)
}

impl Owner<'_> {
    pub fn namespace_name(&self) -> String {
        namespace_name(self.instance, self.id)
    }

    /// The labels every object of the lesson carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), SWITCHYARD.to_owned()),
            (INSTANCE.to_owned(), label_value(self.instance)),
            (LIVE_LESSON.to_owned(), label_value(self.id.as_str())),
            (LIVE_SESSION.to_owned(), label_value(self.session.as_str())),
            (LESSON.to_owned(), label_value(self.lesson.slug.as_str())),
        ])
    }

    fn meta(&self, name: &str, extra: &[(&str, &str)]) -> ObjectMeta {
        let mut labels = self.labels();
        for (k, v) in extra {
            labels.insert((*k).to_owned(), label_value(v));
        }
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace_name()),
            labels: Some(labels),
            ..ObjectMeta::default()
        }
    }

    /// The lesson's namespace; the annotation keeps the whole id (labels are cut at 63).
    pub fn namespace(&self) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(self.namespace_name()),
                labels: Some(self.labels()),
                annotations: Some(BTreeMap::from([(
                    LIVE_LESSON.to_owned(),
                    self.id.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    /// The Secret holding `keys` (name to content).
    pub fn secret(&self, keys: BTreeMap<String, Vec<u8>>) -> Secret {
        Secret {
            metadata: self.meta(SECRET, &[]),
            type_: Some("Opaque".to_owned()),
            data: Some(keys.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
            ..Secret::default()
        }
    }

    /// The pod of `endpoint`; an endpoint without an image cannot run here.
    pub fn pod(&self, endpoint: &Endpoint) -> Result<Pod, String> {
        let Some(image) = &endpoint.image else {
            return Err(format!(
                "endpoint {} has no image: the Kubernetes backend runs images",
                endpoint.name
            ));
        };
        let mut ports: Vec<u16> = endpoint
            .presentations
            .iter()
            .map(|p| p.port)
            .chain(endpoint.additional_ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let (command, args) = if !endpoint.command.is_empty() {
            (Some(endpoint.command.clone()), None)
        } else if endpoint.ssh().is_some() {
            (
                Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]),
                Some(vec![sshd_script(endpoint)]),
            )
        } else {
            (None, None)
        };
        let host_key = host_key_name(&endpoint.name);
        Ok(Pod {
            metadata: self.meta(
                endpoint.name.as_str(),
                &[(ENDPOINT, endpoint.name.as_str())],
            ),
            spec: Some(PodSpec {
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                containers: vec![Container {
                    name: endpoint.name.to_string(),
                    image: Some(image.clone()),
                    command,
                    args,
                    env: Some(vec![
                        env("SWITCHYARD_LESSON", self.id.as_str()),
                        env("SWITCHYARD_ENDPOINT", endpoint.name.as_str()),
                    ]),
                    ports: Some(
                        ports
                            .iter()
                            .map(|p| ContainerPort {
                                container_port: i32::from(*p),
                                protocol: Some("TCP".to_owned()),
                                ..ContainerPort::default()
                            })
                            .collect(),
                    ),
                    volume_mounts: Some(vec![VolumeMount {
                        name: SECRET.to_owned(),
                        mount_path: MOUNT.to_owned(),
                        read_only: Some(true),
                        ..VolumeMount::default()
                    }]),
                    ..Container::default()
                }],
                volumes: Some(vec![Volume {
                    name: SECRET.to_owned(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(SECRET.to_owned()),
                        default_mode: Some(0o400),
                        items: Some(vec![
                            KeyToPath {
                                key: AUTHORIZED_KEYS.to_owned(),
                                path: AUTHORIZED_KEYS.to_owned(),
                                ..KeyToPath::default()
                            },
                            KeyToPath {
                                key: host_key,
                                path: "ssh_host_ed25519_key".to_owned(),
                                ..KeyToPath::default()
                            },
                        ]),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                }]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        })
    }

    /// A ClusterIP Service per presentation of `endpoint`.
    pub fn services(&self, endpoint: &Endpoint) -> Vec<Service> {
        endpoint
            .presentations
            .iter()
            .map(|p| {
                let name = service_name(&endpoint.name, &p.name);
                Service {
                    metadata: self.meta(
                        &name,
                        &[
                            (ENDPOINT, endpoint.name.as_str()),
                            (PRESENTATION, p.name.as_str()),
                        ],
                    ),
                    spec: Some(ServiceSpec {
                        type_: Some("ClusterIP".to_owned()),
                        selector: Some(BTreeMap::from([
                            (LIVE_LESSON.to_owned(), label_value(self.id.as_str())),
                            (ENDPOINT.to_owned(), label_value(endpoint.name.as_str())),
                        ])),
                        // One port: it needs no name (and a presentation's name may not
                        // be a valid port name).
                        ports: Some(vec![ServicePort {
                            port: i32::from(p.port),
                            target_port: Some(IntOrString::Int(i32::from(p.port))),
                            protocol: Some("TCP".to_owned()),
                            ..ServicePort::default()
                        }]),
                        ..ServiceSpec::default()
                    }),
                    ..Service::default()
                }
            })
            .collect()
    }

    /// The lesson's network policies (see the module's documentation).
    pub fn network_policies(&self) -> Vec<NetworkPolicy> {
        let all = LabelSelector::default();
        let policy = |name: &str, pods: LabelSelector, spec: NetworkPolicySpec| NetworkPolicy {
            metadata: self.meta(name, &[]),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(pods),
                ..spec
            }),
        };
        let mut policies = vec![
            policy(
                "isolate",
                all.clone(),
                NetworkPolicySpec {
                    policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
                    ..NetworkPolicySpec::default()
                },
            ),
            policy(
                "dns",
                all.clone(),
                NetworkPolicySpec {
                    policy_types: Some(vec!["Egress".to_owned()]),
                    egress: Some(vec![NetworkPolicyEgressRule {
                        to: Some(vec![NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector::default()),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: Some(
                            ["UDP", "TCP"]
                                .into_iter()
                                .map(|protocol| NetworkPolicyPort {
                                    protocol: Some(protocol.to_owned()),
                                    port: Some(IntOrString::Int(53)),
                                    ..NetworkPolicyPort::default()
                                })
                                .collect(),
                        ),
                    }]),
                    ..NetworkPolicySpec::default()
                },
            ),
            policy(
                "from-outside-lessons",
                all,
                NetworkPolicySpec {
                    policy_types: Some(vec!["Ingress".to_owned()]),
                    ingress: Some(vec![NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector {
                                match_expressions: Some(vec![LabelSelectorRequirement {
                                    key: LIVE_LESSON.to_owned(),
                                    operator: "DoesNotExist".to_owned(),
                                    values: None,
                                }]),
                                ..LabelSelector::default()
                            }),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: None,
                    }]),
                    ..NetworkPolicySpec::default()
                },
            ),
        ];
        for endpoint in &self.lesson.endpoints {
            let peers: Vec<String> = self
                .lesson
                .connections
                .iter()
                .filter_map(|c| {
                    if c.a == endpoint.name {
                        Some(label_value(c.b.as_str()))
                    } else if c.b == endpoint.name {
                        Some(label_value(c.a.as_str()))
                    } else {
                        None
                    }
                })
                .collect();
            if peers.is_empty() {
                continue;
            }
            let peers = NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: ENDPOINT.to_owned(),
                        operator: "In".to_owned(),
                        values: Some(peers),
                    }]),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            };
            policies.push(policy(
                &label(&format!("connections-{}", endpoint.name), 63),
                LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        ENDPOINT.to_owned(),
                        label_value(endpoint.name.as_str()),
                    )])),
                    ..LabelSelector::default()
                },
                NetworkPolicySpec {
                    policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
                    ingress: Some(vec![NetworkPolicyIngressRule {
                        from: Some(vec![peers.clone()]),
                        ports: None,
                    }]),
                    egress: Some(vec![NetworkPolicyEgressRule {
                        to: Some(vec![peers]),
                        ports: None,
                    }]),
                    ..NetworkPolicySpec::default()
                },
            ));
        }
        policies
    }
}

/// A presentation's Service: `<endpoint>-<presentation>`, a DNS-1035 label.
pub fn service_name(endpoint: &EndpointName, presentation: &EndpointName) -> String {
    let name = format!("{endpoint}-{presentation}");
    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        label(&name, 63)
    } else {
        label(&format!("s-{name}"), 63)
    }
}

fn env(name: &str, value: &str) -> k8s_openapi::api::core::v1::EnvVar {
    k8s_openapi::api::core::v1::EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..Default::default()
    }
}

/// What starts an endpoint's sshd from the mounted keys: one `Port` per ssh presentation.
pub fn sshd_script(endpoint: &Endpoint) -> String {
    let ports: String = endpoint
        .presentations
        .iter()
        .filter(|p| p.kind == PresentationKind::Ssh)
        .map(|p| format!("Port {}\n", p.port))
        .collect();
    format!(
        "set -e\nmkdir -p /run/sshd\n\
         cp {MOUNT}/ssh_host_ed25519_key /tmp/ssh_host_ed25519_key\n\
         chmod 600 /tmp/ssh_host_ed25519_key\n\
         cat > /tmp/sshd_config <<EOF\n{ports}HostKey /tmp/ssh_host_ed25519_key\n\
         AuthorizedKeysFile {MOUNT}/{AUTHORIZED_KEYS}\nPidFile none\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\nEOF\n\
         exec /usr/sbin/sshd -D -e -f /tmp/sshd_config\n"
    )
}

/// What a pod's status says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    Pending,
    Running { ip: String },
    Failed(String),
}

pub fn pod_state(pod: &Pod) -> PodState {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Failed(format!("pod {name} is being deleted"));
    }
    let Some(status) = &pod.status else {
        return PodState::Pending;
    };
    for container in status.container_statuses.iter().flatten() {
        if let Some(why) = fatal_wait(container) {
            return PodState::Failed(format!(
                "pod {name}: container {} is waiting: {why}",
                container.name
            ));
        }
    }
    match status.phase.as_deref() {
        Some("Running") => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => PodState::Running { ip: ip.to_owned() },
            _ => PodState::Pending,
        },
        Some(phase @ ("Failed" | "Succeeded")) => {
            let why = reason_and_message(status.reason.as_deref(), status.message.as_deref());
            PodState::Failed(if why.is_empty() {
                format!("pod {name} ended: {phase}")
            } else {
                format!("pod {name} ended: {phase}: {why}")
            })
        }
        _ => PodState::Pending,
    }
}

/// What the scheduler sees of `endpoint`, from its pod's state and its services: running once
/// the pod runs and every presentation's Service has an address; partial while a Service is
/// missing (starting it again makes it); starting while they come up.
pub fn seen(endpoint: &Endpoint, state: &PodState, services: &[Service]) -> Option<Seen> {
    let service = |name: &str| {
        services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    };
    if endpoint
        .presentations
        .iter()
        .any(|p| service(&service_name(&endpoint.name, &p.name)).is_none())
    {
        return Some(Seen::Partial);
    }
    match state {
        PodState::Pending => Some(Seen::Starting),
        PodState::Failed(why) => Some(Seen::Failed {
            why: why.clone(),
            output: String::new(),
        }),
        PodState::Running { ip } => {
            let mut addresses = BTreeMap::new();
            for p in &endpoint.presentations {
                let name = service_name(&endpoint.name, &p.name);
                let Some(spec) = service(&name).and_then(|s| s.spec.as_ref()) else {
                    return Some(Seen::Starting);
                };
                let ip = spec.cluster_ip.as_deref().unwrap_or_default();
                let port = spec
                    .ports
                    .iter()
                    .flatten()
                    .next()
                    .and_then(|p| u16::try_from(p.port).ok());
                match port {
                    Some(port) if !ip.is_empty() && ip != "None" => {
                        addresses.insert(p.port, format!("{ip}:{port}"));
                    }
                    _ => return Some(Seen::Starting),
                }
            }
            for port in &endpoint.additional_ports {
                addresses
                    .entry(*port)
                    .or_insert_with(|| format!("{ip}:{port}"));
            }
            Some(Seen::Running { addresses })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::EntityId;
    use crate::domain::lessons::catalog::{self, LESSON_FILE, LessonSource};
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};

    fn lesson() -> Lesson {
        let mut files = BTreeMap::new();
        files.insert(
            LESSON_FILE.to_owned(),
            "name: x\nendpoints:\n  - name: a\n    image: img/a\n    presentations: [{name: cli, type: ssh, port: 22}]\n  - name: b\n    image: img/b\n    additional_ports: [8080]\n    command: [serve]\n  - name: c\n    image: img/c\n    presentations: [{name: web, type: http, port: 80}]\nconnections: [{a: a, b: b}]\nstages: [{}]\n".to_owned(),
        );
        files.insert("stage1/guide.md".into(), "guide".into());
        catalog::validate(&[LessonSource {
            dir: "x".into(),
            files,
            unreadable: BTreeMap::new(),
        }])
        .unwrap()
        .remove(0)
    }

    #[test]
    fn every_object_carries_the_owners_labels_and_lives_in_the_lessons_namespace() {
        let lesson = lesson();
        let id = LiveLessonId::parse("demo-x-1").unwrap();
        let session = LiveSessionId::parse("demo").unwrap();
        let owner = Owner {
            instance: "switchyard",
            id: &id,
            session: &session,
            lesson: &lesson,
        };
        assert_eq!(owner.namespace_name(), "switchyard-demo-x-1");
        let labels = owner.labels();
        assert_eq!(labels[LIVE_SESSION], "demo");
        assert_eq!(labels[LESSON], "x");
        let pod = owner.pod(&lesson.endpoints[0]).unwrap();
        assert_eq!(
            pod.metadata.namespace.as_deref(),
            Some("switchyard-demo-x-1")
        );
        assert_eq!(pod.metadata.labels.as_ref().unwrap()[ENDPOINT], "a");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        // The private key never reaches a pod: only authorized_keys and its host key.
        let items = spec.volumes.unwrap()[0]
            .secret
            .clone()
            .unwrap()
            .items
            .unwrap();
        let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["authorized_keys", "host-a"]);
        assert!(spec.containers[0].args.as_ref().unwrap()[0].contains("Port 22\n"));
        // b runs its command; c its image's entrypoint.
        let b = owner.pod(&lesson.endpoints[1]).unwrap().spec.unwrap();
        assert_eq!(b.containers[0].command, Some(vec!["serve".to_owned()]));
        let c = owner.pod(&lesson.endpoints[2]).unwrap().spec.unwrap();
        assert_eq!(c.containers[0].command, None);
        let services = owner.services(&lesson.endpoints[0]);
        assert_eq!(services[0].metadata.name.as_deref(), Some("a-cli"));
    }

    #[test]
    fn policies_isolate_and_allow_only_the_lessons_connections() {
        let lesson = lesson();
        let id = LiveLessonId::parse("demo-x-1").unwrap();
        let session = LiveSessionId::parse("demo").unwrap();
        let owner = Owner {
            instance: "switchyard",
            id: &id,
            session: &session,
            lesson: &lesson,
        };
        let names: Vec<String> = owner
            .network_policies()
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        // c has no connection: it gets no policy of its own.
        assert_eq!(
            names,
            [
                "isolate",
                "dns",
                "from-outside-lessons",
                "connections-a",
                "connections-b"
            ]
        );
    }

    #[test]
    fn an_endpoint_without_an_image_is_refused() {
        let mut lesson = lesson();
        lesson.endpoints[0].image = None;
        let id = LiveLessonId::parse("demo-x-1").unwrap();
        let session = LiveSessionId::parse("demo").unwrap();
        let owner = Owner {
            instance: "switchyard",
            id: &id,
            session: &session,
            lesson: &lesson,
        };
        assert!(
            owner
                .pod(&lesson.endpoints[0])
                .unwrap_err()
                .contains("no image")
        );
    }

    #[test]
    fn pod_states_follow_phase_and_fatal_waits() {
        let mut pod = Pod::default();
        assert_eq!(pod_state(&pod), PodState::Pending);
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.5".into()),
            ..PodStatus::default()
        });
        assert_eq!(
            pod_state(&pod),
            PodState::Running {
                ip: "10.0.0.5".into()
            }
        );
        pod.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: "a".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("no such image".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        assert!(matches!(pod_state(&pod), PodState::Failed(why) if why.contains("no such image")));
        pod.status = Some(PodStatus {
            phase: Some("Failed".into()),
            ..PodStatus::default()
        });
        assert!(matches!(pod_state(&pod), PodState::Failed(_)));
    }
}
