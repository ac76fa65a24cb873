//! A switch pod: registered by its pod-agent, kept alive, drained on removal, expired when its
//! keep-alives stop. It is the only writer of its port leases, so a port is leased to at most
//! one meeting point at a time, by construction.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LeaseId, MISSED_KEEPALIVES, MachineId, PodName, PortRange, millis};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Pod {
    #[default]
    Absent,
    Present(Registered),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub status: PodStatus,
    pub keepalive: Duration,
    pub ports: PortRange,
    pub ssh_address: Option<String>,
    pub host_key_fingerprint: Option<String>,
    /// By port.
    pub leases: BTreeMap<u16, Lease>,
    /// Where the search for a free port starts: just after the last port leased, so a port
    /// just released is the last to be reused.
    pub next_port: u16,
    pub added_at: Timestamp,
    pub last_seen: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PodStatus {
    /// Takes new meeting points.
    Active,
    /// Removed: takes no new meeting points, and is gone once its last one clears.
    Draining,
}

/// One port held for one machine's meeting point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    pub machine: MachineId,
    pub lease: LeaseId,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PodCommand {
    Add {
        keepalive: Duration,
        ports: PortRange,
        ssh_address: Option<String>,
        host_key_fingerprint: Option<String>,
    },
    KeepAlive,
    /// Stop taking meeting points; gone once the last one clears. Idempotent.
    Remove,
    /// Sent by the reaper; removes the pod only if its keep-alives really stopped.
    Expire,
    /// Take a free port for `machine`. Taking the same `lease` again changes nothing.
    Lease {
        machine: MachineId,
        lease: LeaseId,
    },
    /// Give `port` back, if it is still held by `lease` (any lease when `None`). Idempotent.
    Release {
        port: u16,
        lease: Option<LeaseId>,
        reason: ReleaseReason,
    },
}

event_set! {
    pub enum PodEvent {
        Added(Added) = "pod.added" @ 1,
        KeptAlive(KeptAlive) = "pod.kept_alive" @ 1,
        Draining(Draining) = "pod.draining" @ 1,
        Removed(Removed) = "pod.removed" @ 1,
        PortLeased(PortLeased) = "pod.port_leased" @ 1,
        PortReleased(PortReleased) = "pod.port_released" @ 1,
    }
}

/// A pod registered, or came back while draining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Added {
    pub keepalive_ms: u64,
    pub ports: PortRange,
    /// Where machines reach the pod's SSH server, `host:port`.
    pub ssh_address: Option<String>,
    /// The SHA-256 fingerprint of the pod's SSH host key, `SHA256:<base64>`.
    pub host_key_fingerprint: Option<String>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeptAlive {
    pub at: Timestamp,
}

/// Removal was asked while meeting points remain: the pod drains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Draining {
    pub meeting_points: u64,
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RemoveReason {
    /// Removed with no meeting points left.
    Removed,
    /// The last meeting point of a draining pod cleared.
    Drained,
    /// Keep-alives stopped; its leases are dropped with it.
    Expired,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Removed {
    pub reason: RemoveReason,
    /// Leases still held when the pod went (only when it expired).
    pub dropped_leases: u64,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortLeased {
    pub port: u16,
    pub machine: MachineId,
    pub lease: LeaseId,
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// Its meeting point was cleared.
    Cleared,
    /// Its machine reserved a new meeting point.
    Replaced,
    /// The reservation that took it did not complete (found by the reconciler).
    Orphaned,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortReleased {
    pub port: u16,
    pub machine: MachineId,
    pub lease: LeaseId,
    pub reason: ReleaseReason,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("pod {pod:?} is already registered and active")]
    AlreadyExists { pod: String },
    #[error("pod {pod:?} is not registered")]
    NotFound { pod: String },
    #[error("pod {pod:?} is draining and takes no new meeting points")]
    Draining { pod: String },
    #[error("pod {pod:?} has no free port in {ports}")]
    Full { pod: String, ports: PortRange },
    #[error(
        "lease {lease} on pod {pod:?} belongs to machine {holder:?}: its command id was used again for another machine"
    )]
    LeaseOfAnotherMachine {
        pod: String,
        lease: String,
        holder: String,
    },
    #[error(
        "ssh address {address:?} must be HOST:PORT (at most 256 bytes, no white space or control characters)"
    )]
    SshAddress { address: String },
    #[error("host key fingerprint {fingerprint:?} must be SHA256:<unpadded base64 of 32 bytes>")]
    Fingerprint { fingerprint: String },
    #[error(transparent)]
    KeepAlive(#[from] super::KeepAliveError),
    #[error(transparent)]
    Ports(#[from] super::PortRangeError),
}

impl Rejection for PodError {
    fn kind(&self) -> ErrorKind {
        match self {
            PodError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            PodError::NotFound { .. } => ErrorKind::NotFound,
            PodError::Draining { .. } => ErrorKind::Unavailable,
            PodError::Full { .. } => ErrorKind::Capacity,
            PodError::LeaseOfAnotherMachine { .. } => ErrorKind::Conflict,
            PodError::SshAddress { .. }
            | PodError::Fingerprint { .. }
            | PodError::KeepAlive(_)
            | PodError::Ports(_) => ErrorKind::Invalid,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            PodError::LeaseOfAnotherMachine { .. } => Some(crate::domain::COMMAND_ID_REUSED),
            _ => None,
        }
    }
}

/// What readers see of a pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PodView {
    pub name: PodName,
    pub status: PodStatus,
    /// Ports leased to meeting points.
    pub meeting_points: usize,
    pub ports: PortRange,
    pub keepalive_ms: u64,
    pub ssh_address: Option<String>,
    pub host_key_fingerprint: Option<String>,
    pub added_at: Timestamp,
    pub last_seen: Timestamp,
    /// When the pod expires unless kept alive before.
    pub expires_at: Timestamp,
}

impl PodView {
    /// Takes new meeting points at `now`: active, and not past its keep-alive deadline.
    pub fn is_valid(&self, now: Timestamp) -> bool {
        self.status == PodStatus::Active && now < self.expires_at
    }
}

/// The reply to every pod command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PodReply {
    /// The pod afterwards; `null` once it is gone.
    pub pod: Option<PodView>,
    /// For a lease: the port it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Registered {
    pub fn expires_at(&self) -> Timestamp {
        self.last_seen
            .saturating_add(self.keepalive.saturating_mul(MISSED_KEEPALIVES))
    }

    pub fn is_valid(&self, now: Timestamp) -> bool {
        self.status == PodStatus::Active && now < self.expires_at()
    }

    /// The port `lease` holds, if any.
    pub fn port_of(&self, lease: &LeaseId) -> Option<u16> {
        self.leases
            .iter()
            .find(|(_, held)| &held.lease == lease)
            .map(|(port, _)| *port)
    }

    /// The first free port from `next_port` on, wrapping around the range.
    fn free_port(&self) -> Option<u16> {
        let ports = self.ports;
        let start = if ports.contains(self.next_port) {
            self.next_port
        } else {
            ports.first
        };
        (start..=ports.last)
            .chain(ports.first..start)
            .find(|port| !self.leases.contains_key(port))
    }
}

impl Aggregate for Pod {
    const KIND: &'static str = "pod";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = PodName;
    type Command = PodCommand;
    type Event = PodEvent;
    type Reply = PodReply;
    type View = PodView;
    type Error = PodError;

    fn decide(
        &self,
        id: &PodName,
        command: &PodCommand,
        cx: &Context,
    ) -> Result<Vec<PodEvent>, PodError> {
        let at = cx.now;
        let pod = || id.to_string();
        let registered = match (self, command) {
            (
                _,
                PodCommand::Add {
                    keepalive,
                    ports,
                    ssh_address,
                    host_key_fingerprint,
                },
            ) => {
                if let Pod::Present(r) = self
                    && r.status == PodStatus::Active
                {
                    return Err(PodError::AlreadyExists { pod: pod() });
                }
                super::keepalive(Some(millis(*keepalive)), *keepalive)?;
                PortRange::new(ports.first, ports.last)?;
                if let Some(address) = ssh_address {
                    check_ssh_address(address)?;
                }
                if let Some(fingerprint) = host_key_fingerprint {
                    check_fingerprint(fingerprint)?;
                }
                return Ok(vec![PodEvent::Added(Added {
                    keepalive_ms: millis(*keepalive),
                    ports: *ports,
                    ssh_address: ssh_address.clone(),
                    host_key_fingerprint: host_key_fingerprint.clone(),
                    at,
                })]);
            }
            // Removing, expiring or releasing on a missing pod: already what was asked.
            (Pod::Absent, PodCommand::Remove | PodCommand::Expire | PodCommand::Release { .. }) => {
                return Ok(vec![]);
            }
            (Pod::Absent, PodCommand::KeepAlive | PodCommand::Lease { .. }) => {
                return Err(PodError::NotFound { pod: pod() });
            }
            (Pod::Present(registered), _) => registered,
        };
        match command {
            PodCommand::Add { .. } => unreachable!("handled above"),
            PodCommand::KeepAlive => Ok(vec![PodEvent::KeptAlive(KeptAlive { at })]),
            PodCommand::Remove => Ok(match (registered.status, registered.leases.len()) {
                (PodStatus::Draining, _) => vec![],
                (PodStatus::Active, 0) => vec![PodEvent::Removed(Removed {
                    reason: RemoveReason::Removed,
                    dropped_leases: 0,
                    at,
                })],
                (PodStatus::Active, n) => vec![PodEvent::Draining(Draining {
                    meeting_points: n as u64,
                    at,
                })],
            }),
            PodCommand::Expire => Ok(if at >= registered.expires_at() {
                vec![PodEvent::Removed(Removed {
                    reason: RemoveReason::Expired,
                    dropped_leases: registered.leases.len() as u64,
                    at,
                })]
            } else {
                vec![]
            }),
            PodCommand::Lease { machine, lease } => {
                // The same lease again is a retry only for the same machine: a lease id is
                // idempotent per (lease id, machine), never shared between two machines.
                if let Some(held) = registered.leases.values().find(|held| &held.lease == lease) {
                    if &held.machine != machine {
                        return Err(PodError::LeaseOfAnotherMachine {
                            pod: pod(),
                            lease: lease.to_string(),
                            holder: held.machine.to_string(),
                        });
                    }
                    return Ok(vec![]);
                }
                if registered.status == PodStatus::Draining {
                    return Err(PodError::Draining { pod: pod() });
                }
                let port = registered.free_port().ok_or(PodError::Full {
                    pod: pod(),
                    ports: registered.ports,
                })?;
                Ok(vec![PodEvent::PortLeased(PortLeased {
                    port,
                    machine: machine.clone(),
                    lease: lease.clone(),
                    at,
                })])
            }
            PodCommand::Release {
                port,
                lease,
                reason,
            } => {
                let Some(held) = registered.leases.get(port) else {
                    return Ok(vec![]);
                };
                if lease.as_ref().is_some_and(|lease| lease != &held.lease) {
                    return Ok(vec![]);
                }
                let mut events = vec![PodEvent::PortReleased(PortReleased {
                    port: *port,
                    machine: held.machine.clone(),
                    lease: held.lease.clone(),
                    reason: *reason,
                    at,
                })];
                if registered.status == PodStatus::Draining && registered.leases.len() == 1 {
                    events.push(PodEvent::Removed(Removed {
                        reason: RemoveReason::Drained,
                        dropped_leases: 0,
                        at,
                    }));
                }
                Ok(events)
            }
        }
    }

    fn apply(&mut self, event: &PodEvent) {
        match (&mut *self, event) {
            (_, PodEvent::Added(added)) => {
                let keepalive = Duration::from_millis(added.keepalive_ms);
                match self {
                    // Back while draining: active again, its meeting points kept.
                    Pod::Present(r) => {
                        r.status = PodStatus::Active;
                        r.keepalive = keepalive;
                        r.ssh_address = added.ssh_address.clone();
                        r.host_key_fingerprint = added.host_key_fingerprint.clone();
                        r.last_seen = added.at;
                    }
                    Pod::Absent => {
                        *self = Pod::Present(Registered {
                            status: PodStatus::Active,
                            keepalive,
                            ports: added.ports,
                            ssh_address: added.ssh_address.clone(),
                            host_key_fingerprint: added.host_key_fingerprint.clone(),
                            leases: BTreeMap::new(),
                            next_port: added.ports.first,
                            added_at: added.at,
                            last_seen: added.at,
                        })
                    }
                }
            }
            (Pod::Present(r), PodEvent::KeptAlive(kept)) => r.last_seen = kept.at,
            (Pod::Present(r), PodEvent::Draining(_)) => r.status = PodStatus::Draining,
            (Pod::Present(_), PodEvent::Removed(_)) => *self = Pod::Absent,
            (Pod::Present(r), PodEvent::PortLeased(leased)) => {
                r.leases.insert(
                    leased.port,
                    Lease {
                        machine: leased.machine.clone(),
                        lease: leased.lease.clone(),
                        at: leased.at,
                    },
                );
                r.next_port = if leased.port >= r.ports.last {
                    r.ports.first
                } else {
                    leased.port + 1
                };
            }
            (Pod::Present(r), PodEvent::PortReleased(released)) => {
                r.leases.remove(&released.port);
            }
            // Events of an absent pod cannot have been decided; a stored event is a fact, so
            // ignore rather than guess.
            (Pod::Absent, _) => {}
        }
    }

    fn reply(&self, id: &PodName, command: &PodCommand) -> PodReply {
        let port = match (self, command) {
            (Pod::Present(r), PodCommand::Lease { lease, .. }) => r.port_of(lease),
            _ => None,
        };
        PodReply {
            pod: self.view(id),
            port,
        }
    }

    fn view(&self, id: &PodName) -> Option<PodView> {
        let Pod::Present(r) = self else { return None };
        Some(PodView {
            name: id.clone(),
            status: r.status,
            meeting_points: r.leases.len(),
            ports: r.ports,
            keepalive_ms: millis(r.keepalive),
            ssh_address: r.ssh_address.clone(),
            host_key_fingerprint: r.host_key_fingerprint.clone(),
            added_at: r.added_at,
            last_seen: r.last_seen,
            expires_at: r.expires_at(),
        })
    }

    fn due(&self, _id: &PodName, now: Timestamp) -> Option<PodCommand> {
        match self {
            Pod::Present(r) if now >= r.expires_at() => Some(PodCommand::Expire),
            _ => None,
        }
    }
}

fn check_ssh_address(address: &str) -> Result<(), PodError> {
    let bad = || PodError::SshAddress {
        address: address.to_owned(),
    };
    if address.len() > 256 || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

fn check_fingerprint(fingerprint: &str) -> Result<(), PodError> {
    let ok = fingerprint.strip_prefix("SHA256:").is_some_and(|b64| {
        b64.len() == 43
            && b64
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
    });
    if ok {
        Ok(())
    } else {
        Err(PodError::Fingerprint {
            fingerprint: fingerprint.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CommandId;

    fn id() -> PodName {
        PodName::new("switch-pod-0").unwrap()
    }

    fn at(secs: i64) -> Context {
        Context {
            now: Timestamp::from_unix_nanos(secs * 1_000_000_000),
        }
    }

    fn run(pod: &mut Pod, command: PodCommand, cx: Context) -> Result<Vec<PodEvent>, PodError> {
        let events = pod.decide(&id(), &command, &cx)?;
        for event in &events {
            pod.apply(event);
        }
        Ok(events)
    }

    fn add(ports: PortRange) -> PodCommand {
        PodCommand::Add {
            keepalive: Duration::from_secs(10),
            ports,
            ssh_address: Some("10.0.0.1:2222".into()),
            host_key_fingerprint: Some(format!("SHA256:{}", "A".repeat(43))),
        }
    }

    fn lease(machine: &str, lease: &str) -> PodCommand {
        PodCommand::Lease {
            machine: MachineId::new(machine).unwrap(),
            lease: CommandId::new(lease).unwrap(),
        }
    }

    fn added(ports: PortRange) -> Pod {
        let mut pod = Pod::default();
        run(&mut pod, add(ports), at(0)).unwrap();
        pod
    }

    fn port(pod: &Pod, l: &str) -> u16 {
        let Pod::Present(r) = pod else {
            panic!("absent")
        };
        r.port_of(&CommandId::new(l).unwrap()).unwrap()
    }

    #[test]
    fn adding_an_active_pod_again_is_already_exists() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        let err = run(&mut pod, add(super::super::DEFAULT_PORTS), at(1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn keep_alive_of_an_unknown_pod_is_not_found() {
        let err = run(&mut Pod::default(), PodCommand::KeepAlive, at(0)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn bad_addresses_and_fingerprints_are_invalid() {
        for (address, fingerprint) in [
            ("no-port", None),
            (":22", None),
            ("h:0", None),
            ("h:99999", None),
            ("a b:22", None),
            ("h:22", Some("MD5:aa")),
            ("h:22", Some("SHA256:short")),
        ] {
            let command = PodCommand::Add {
                keepalive: Duration::from_secs(1),
                ports: super::super::DEFAULT_PORTS,
                ssh_address: Some(address.into()),
                host_key_fingerprint: fingerprint.map(str::to_owned),
            };
            let err = Pod::default().decide(&id(), &command, &at(0)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{address} {fingerprint:?}");
        }
    }

    #[test]
    fn leases_take_distinct_ports_and_do_not_reuse_a_released_one_first() {
        let mut pod = added(PortRange::new(100, 102).unwrap());
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        run(&mut pod, lease("m2", "l2"), at(1)).unwrap();
        assert_eq!((port(&pod, "l1"), port(&pod, "l2")), (100, 101));
        let release = PodCommand::Release {
            port: 100,
            lease: None,
            reason: ReleaseReason::Cleared,
        };
        run(&mut pod, release, at(2)).unwrap();
        run(&mut pod, lease("m3", "l3"), at(3)).unwrap();
        assert_eq!(port(&pod, "l3"), 102);
        run(&mut pod, lease("m4", "l4"), at(3)).unwrap();
        assert_eq!(port(&pod, "l4"), 100, "wraps around to the freed port");
        let err = run(&mut pod, lease("m5", "l5"), at(4)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Capacity);
    }

    #[test]
    fn the_same_lease_twice_takes_one_port() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        assert!(run(&mut pod, lease("m1", "l1"), at(2)).unwrap().is_empty());
        let reply = pod.reply(&id(), &lease("m1", "l1"));
        assert_eq!(reply.port, Some(10000));
        assert_eq!(reply.pod.unwrap().meeting_points, 1);
    }

    #[test]
    fn a_lease_id_is_never_shared_by_two_machines() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        let err = run(&mut pod, lease("m2", "l1"), at(2)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(err.reason(), Some(crate::domain::COMMAND_ID_REUSED));
        let Pod::Present(registered) = &pod else {
            panic!("absent")
        };
        assert_eq!(registered.leases.len(), 1, "m2 got no port");
    }

    #[test]
    fn release_only_frees_the_named_lease() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        let stale = PodCommand::Release {
            port: 10000,
            lease: Some(CommandId::new("other").unwrap()),
            reason: ReleaseReason::Orphaned,
        };
        assert!(run(&mut pod, stale, at(2)).unwrap().is_empty());
        assert_eq!(port(&pod, "l1"), 10000);
    }

    #[test]
    fn removal_drains_then_the_pod_is_gone() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        run(&mut pod, PodCommand::Remove, at(2)).unwrap();
        let view = pod.view(&id()).unwrap();
        assert_eq!(view.status, PodStatus::Draining);
        assert!(!view.is_valid(at(2).now));
        let err = run(&mut pod, lease("m2", "l2"), at(2)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(run(&mut pod, PodCommand::Remove, at(3)).unwrap().is_empty());
        let release = PodCommand::Release {
            port: 10000,
            lease: None,
            reason: ReleaseReason::Cleared,
        };
        let events = run(&mut pod, release, at(4)).unwrap();
        assert!(matches!(
            events.last(),
            Some(PodEvent::Removed(Removed {
                reason: RemoveReason::Drained,
                ..
            }))
        ));
        assert_eq!(pod, Pod::Absent);
        assert!(run(&mut pod, PodCommand::Remove, at(5)).unwrap().is_empty());
    }

    #[test]
    fn a_pod_without_meeting_points_is_removed_at_once() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, PodCommand::Remove, at(1)).unwrap();
        assert_eq!(pod, Pod::Absent);
    }

    #[test]
    fn pods_expire_after_two_missed_keep_alives() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        run(&mut pod, PodCommand::KeepAlive, at(5)).unwrap();
        assert_eq!(pod.due(&id(), at(24).now), None);
        assert!(pod.view(&id()).unwrap().is_valid(at(24).now));
        assert_eq!(pod.due(&id(), at(25).now), Some(PodCommand::Expire));
        assert!(!pod.view(&id()).unwrap().is_valid(at(25).now));
        // A stale Expire (the pod was kept alive meanwhile) changes nothing.
        assert!(
            pod.decide(&id(), &PodCommand::Expire, &at(24))
                .unwrap()
                .is_empty()
        );
        run(&mut pod, PodCommand::Expire, at(25)).unwrap();
        assert_eq!(pod, Pod::Absent);
    }

    #[test]
    fn a_draining_pod_added_again_is_active_with_its_leases() {
        let mut pod = added(super::super::DEFAULT_PORTS);
        run(&mut pod, lease("m1", "l1"), at(1)).unwrap();
        run(&mut pod, PodCommand::Remove, at(2)).unwrap();
        run(&mut pod, add(super::super::DEFAULT_PORTS), at(3)).unwrap();
        let view = pod.view(&id()).unwrap();
        assert_eq!((view.status, view.meeting_points), (PodStatus::Active, 1));
    }
}
