//! The switchboard's requests and replies, as callers send and receive them: shared by the
//! routes, the agents and the CLI. Nothing here imports the server.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::CommandRequest;
use crate::domain::switchboard::meeting_point::Expect;
use crate::domain::switchboard::pod::PodStatus;
use crate::domain::switchboard::{
    DEFAULT_PORTS, LeaseId, MachineId, MeetingPoint, MeetingPointCommand, MeetingPointView,
    POD_KEEPALIVE, Pod, PodCommand, PodName, PortRange, Username,
};

/// `pod.add`: register a pod; adding an active pod again is `already_exists`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPod {
    pub pod: PodName,
    /// How often the pod will call `pod.keep_alive`; it expires after two missed periods.
    /// 300000 (5 minutes) by default.
    pub keepalive_ms: Option<u64>,
    /// The ports it leases to meeting points; 10000-19999 by default.
    pub ports: Option<PortRange>,
    /// Where machines reach its SSH server, `host:port`.
    pub ssh_address: Option<String>,
    /// Its SSH host key's fingerprint, `SHA256:<base64>`, for machines to verify.
    pub host_key_fingerprint: Option<String>,
}

impl CommandRequest for AddPod {
    type Aggregate = Pod;
    const VERB: &'static str = "add";

    fn into_command(self) -> (PodName, PodCommand) {
        let keepalive = self
            .keepalive_ms
            .map_or(POD_KEEPALIVE, Duration::from_millis);
        let command = PodCommand::Add {
            keepalive,
            ports: self.ports.unwrap_or(DEFAULT_PORTS),
            ssh_address: self.ssh_address,
            host_key_fingerprint: self.host_key_fingerprint,
        };
        (self.pod, command)
    }
}

/// `pod.keep_alive`: the pod is still there; `not_found` if it is not registered.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepAlivePod {
    pub pod: PodName,
}

impl CommandRequest for KeepAlivePod {
    type Aggregate = Pod;
    const VERB: &'static str = "keep_alive";

    fn into_command(self) -> (PodName, PodCommand) {
        (self.pod, PodCommand::KeepAlive)
    }
}

/// `pod.remove`: stop giving the pod new meeting points; it is gone once its last one clears.
/// Removing a missing pod succeeds.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovePod {
    pub pod: PodName,
}

impl CommandRequest for RemovePod {
    type Aggregate = Pod;
    const VERB: &'static str = "remove";

    fn into_command(self) -> (PodName, PodCommand) {
        (self.pod, PodCommand::Remove)
    }
}

/// Names one pod, for `pod.get`, `pod.is_valid` and `pod.count_meeting_points`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodRequest {
    pub pod: PodName,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PodValidity {
    pub pod: PodName,
    /// Registered, not draining, and kept alive: it takes new meeting points.
    pub valid: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PodMeetingPoints {
    pub pod: PodName,
    /// Meeting points holding a port on the pod; 0 for a pod that is gone.
    pub meeting_points: usize,
    /// `null` once the pod is gone.
    pub status: Option<PodStatus>,
}

/// `pod.list`: pods that take meeting points, in name order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListPods {
    /// Also list draining and expired-but-not-yet-reaped pods.
    #[serde(default)]
    pub all: bool,
    pub after: Option<PodName>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// `meeting_point.reserve`: a meeting point for `machine` on the least loaded valid pod,
/// replacing the machine's previous one.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveMeetingPoint {
    pub machine: MachineId,
    /// The account to log in as on the machine.
    pub username: Username,
    /// How often the machine will call `meeting_point.keep_alive`; 300000 (5 minutes) by
    /// default. The meeting point expires after two missed periods.
    pub keepalive_ms: Option<u64>,
    /// The SSH public key the machine will log in to its pod with, as in an authorized_keys
    /// line (`ssh-ed25519 AAAA... comment`). A pod forwards the meeting point's port only to a
    /// machine holding this key; without one, no machine can open the tunnel.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// Names a machine's meeting point, optionally only if it is still the given one.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MeetingPointRequest {
    pub machine: MachineId,
    /// Only if the meeting point is on this pod.
    pub pod: Option<PodName>,
    /// Only if the meeting point is on this port.
    pub port: Option<u16>,
    /// Only if the meeting point stands on this lease (its reservation's command id).
    pub lease: Option<LeaseId>,
}

impl MeetingPointRequest {
    pub fn expect(&self) -> Expect {
        Expect {
            pod: self.pod.clone(),
            port: self.port,
            lease: self.lease.clone(),
        }
    }
}

/// `meeting_point.keep_alive`: the machine is still connected; `not_found` if it has no
/// meeting point, or not the one named.
impl CommandRequest for MeetingPointRequest {
    type Aggregate = MeetingPoint;
    const VERB: &'static str = "keep_alive";

    fn into_command(self) -> (MachineId, MeetingPointCommand) {
        let expect = self.expect();
        (self.machine, MeetingPointCommand::KeepAlive { expect })
    }
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ClearReply {
    /// The meeting point cleared; `null` if there was none (or not the one named).
    pub cleared: Option<MeetingPointView>,
}

/// Names a machine, for `meeting_point.get`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineRequest {
    pub machine: MachineId,
}

/// `meeting_point.list`: meeting points in machine order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListMeetingPoints {
    /// Only those on this pod.
    pub pod: Option<PodName>,
    pub after: Option<MachineId>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}
