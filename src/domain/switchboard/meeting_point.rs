//! A meeting point: where one machine can be reached, as (pod, port, username). One per
//! machine; reserving again replaces it. It names the port lease it stands on.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LeaseId, MISSED_KEEPALIVES, MachineId, PodName, SshPublicKey, Username, millis};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum MeetingPoint {
    #[default]
    Absent,
    Present(Reserved),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reserved {
    pub place: Place,
    pub username: Username,
    /// The key the machine logs in to its pod with.
    pub public_key: Option<SshPublicKey>,
    pub keepalive: Duration,
    pub reserved_at: Timestamp,
    pub last_seen: Timestamp,
    /// The place this reservation replaced, whose port must be given back.
    pub replaced: Option<Place>,
}

/// A port on a pod, held by one lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Place {
    pub pod: PodName,
    pub port: u16,
    pub lease: LeaseId,
}

/// Which meeting point a command means; each field given must match. Lets a caller act on
/// "the meeting point I reserved" without touching one that replaced it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    pub pod: Option<PodName>,
    pub port: Option<u16>,
    pub lease: Option<LeaseId>,
}

impl Expect {
    pub fn lease(lease: LeaseId) -> Self {
        Self {
            lease: Some(lease),
            ..Self::default()
        }
    }

    fn matches(&self, place: &Place) -> bool {
        self.pod.as_ref().is_none_or(|pod| pod == &place.pod)
            && self.port.is_none_or(|port| port == place.port)
            && self
                .lease
                .as_ref()
                .is_none_or(|lease| lease == &place.lease)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MeetingPointCommand {
    /// Record the machine at `place`, replacing its previous meeting point.
    Reserve {
        place: Place,
        username: Username,
        public_key: Option<SshPublicKey>,
        keepalive: Duration,
    },
    KeepAlive {
        expect: Expect,
    },
    /// Idempotent: clearing a missing or different meeting point changes nothing.
    Clear {
        expect: Expect,
        reason: ClearReason,
    },
    /// Sent by the reaper; clears only if the keep-alives really stopped.
    Expire,
}

event_set! {
    pub enum MeetingPointEvent {
        Reserved(ReservedEvent) = "meeting_point.reserved" @ 2 older { 1 => ReservedEventV1 },
        KeptAlive(KeptAlive) = "meeting_point.kept_alive" @ 1,
        Cleared(Cleared) = "meeting_point.cleared" @ 1,
    }
}

/// A machine's meeting point, at a leased port on a pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservedEvent {
    pub place: Place,
    pub username: Username,
    /// The SSH public key the machine logs in to its pod with (OpenSSH one-line form); a pod
    /// forwards the meeting point's port only to a machine holding it.
    pub public_key: Option<SshPublicKey>,
    pub keepalive_ms: u64,
    /// The meeting point this one replaces.
    pub replaced: Option<Place>,
    pub at: Timestamp,
}

/// `meeting_point.reserved` as written before meeting points named the machine's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReservedEventV1 {
    pub place: Place,
    pub username: Username,
    pub keepalive_ms: u64,
    /// The meeting point this one replaces.
    pub replaced: Option<Place>,
    pub at: Timestamp,
}

impl From<ReservedEventV1> for ReservedEvent {
    fn from(old: ReservedEventV1) -> Self {
        ReservedEvent {
            place: old.place,
            username: old.username,
            public_key: None,
            keepalive_ms: old.keepalive_ms,
            replaced: old.replaced,
            at: old.at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeptAlive {
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClearReason {
    /// Its machine (or an operator) cleared it.
    Requested,
    /// Its keep-alives stopped.
    Expired,
    /// Its port lease is gone (its pod expired, or the reservation never completed).
    LeaseLost,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cleared {
    pub place: Place,
    pub reason: ClearReason,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeetingPointError {
    #[error("machine {machine:?} has no meeting point")]
    NotFound { machine: String },
    #[error(
        "machine {machine:?} has its meeting point on pod {pod:?} port {port}, not the one named"
    )]
    Moved {
        machine: String,
        pod: String,
        port: u16,
    },
}

impl Rejection for MeetingPointError {
    fn kind(&self) -> ErrorKind {
        match self {
            MeetingPointError::NotFound { .. } | MeetingPointError::Moved { .. } => {
                ErrorKind::NotFound
            }
        }
    }
}

/// What readers see of a meeting point: how to reach the machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeetingPointView {
    pub machine: MachineId,
    pub pod: PodName,
    pub port: u16,
    pub username: Username,
    /// The SSH public key the machine logs in to its pod with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<SshPublicKey>,
    /// The reservation that leased the port.
    pub lease: LeaseId,
    pub keepalive_ms: u64,
    pub reserved_at: Timestamp,
    pub last_seen: Timestamp,
    /// When the meeting point expires unless kept alive before.
    pub expires_at: Timestamp,
}

/// The reply to every meeting point command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeetingPointReply {
    /// The meeting point afterwards; `null` once cleared.
    pub meeting_point: Option<MeetingPointView>,
    /// For a reservation: the meeting point it replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<Place>,
}

impl Reserved {
    pub fn expires_at(&self) -> Timestamp {
        self.last_seen
            .saturating_add(self.keepalive.saturating_mul(MISSED_KEEPALIVES))
    }
}

impl Aggregate for MeetingPoint {
    const KIND: &'static str = "meeting_point";
    const SNAPSHOT_VERSION: u16 = 2;

    type Id = MachineId;
    type Command = MeetingPointCommand;
    type Event = MeetingPointEvent;
    type Reply = MeetingPointReply;
    type View = MeetingPointView;
    type Error = MeetingPointError;

    fn decide(
        &self,
        id: &MachineId,
        command: &MeetingPointCommand,
        cx: &Context,
    ) -> Result<Vec<MeetingPointEvent>, MeetingPointError> {
        let at = cx.now;
        match (self, command) {
            (
                _,
                MeetingPointCommand::Reserve {
                    place,
                    username,
                    public_key,
                    keepalive,
                },
            ) => {
                let replaced = match self {
                    // The same reservation again: already recorded.
                    MeetingPoint::Present(r) if r.place.lease == place.lease => return Ok(vec![]),
                    MeetingPoint::Present(r) => Some(r.place.clone()),
                    MeetingPoint::Absent => None,
                };
                Ok(vec![MeetingPointEvent::Reserved(ReservedEvent {
                    place: place.clone(),
                    username: username.clone(),
                    public_key: public_key.clone(),
                    keepalive_ms: millis(*keepalive),
                    replaced,
                    at,
                })])
            }
            (MeetingPoint::Absent, MeetingPointCommand::KeepAlive { .. }) => {
                Err(MeetingPointError::NotFound {
                    machine: id.to_string(),
                })
            }
            (MeetingPoint::Present(r), MeetingPointCommand::KeepAlive { expect }) => {
                if expect.matches(&r.place) {
                    Ok(vec![MeetingPointEvent::KeptAlive(KeptAlive { at })])
                } else {
                    Err(MeetingPointError::Moved {
                        machine: id.to_string(),
                        pod: r.place.pod.to_string(),
                        port: r.place.port,
                    })
                }
            }
            (
                MeetingPoint::Absent,
                MeetingPointCommand::Clear { .. } | MeetingPointCommand::Expire,
            ) => Ok(vec![]),
            (MeetingPoint::Present(r), MeetingPointCommand::Clear { expect, reason }) => {
                Ok(if expect.matches(&r.place) {
                    vec![MeetingPointEvent::Cleared(Cleared {
                        place: r.place.clone(),
                        reason: *reason,
                        at,
                    })]
                } else {
                    vec![]
                })
            }
            (MeetingPoint::Present(r), MeetingPointCommand::Expire) => {
                Ok(if at >= r.expires_at() {
                    vec![MeetingPointEvent::Cleared(Cleared {
                        place: r.place.clone(),
                        reason: ClearReason::Expired,
                        at,
                    })]
                } else {
                    vec![]
                })
            }
        }
    }

    fn apply(&mut self, event: &MeetingPointEvent) {
        match (&mut *self, event) {
            (_, MeetingPointEvent::Reserved(reserved)) => {
                *self = MeetingPoint::Present(Reserved {
                    place: reserved.place.clone(),
                    username: reserved.username.clone(),
                    public_key: reserved.public_key.clone(),
                    keepalive: Duration::from_millis(reserved.keepalive_ms),
                    reserved_at: reserved.at,
                    last_seen: reserved.at,
                    replaced: reserved.replaced.clone(),
                });
            }
            (MeetingPoint::Present(r), MeetingPointEvent::KeptAlive(kept)) => {
                r.last_seen = kept.at;
            }
            (MeetingPoint::Present(_), MeetingPointEvent::Cleared(_)) => {
                *self = MeetingPoint::Absent;
            }
            (MeetingPoint::Absent, _) => {}
        }
    }

    fn reply(&self, id: &MachineId, command: &MeetingPointCommand) -> MeetingPointReply {
        let replaced = match (self, command) {
            (MeetingPoint::Present(r), MeetingPointCommand::Reserve { .. }) => r.replaced.clone(),
            _ => None,
        };
        MeetingPointReply {
            meeting_point: self.view(id),
            replaced,
        }
    }

    fn view(&self, id: &MachineId) -> Option<MeetingPointView> {
        let MeetingPoint::Present(r) = self else {
            return None;
        };
        Some(MeetingPointView {
            machine: id.clone(),
            pod: r.place.pod.clone(),
            port: r.place.port,
            username: r.username.clone(),
            public_key: r.public_key.clone(),
            lease: r.place.lease.clone(),
            keepalive_ms: millis(r.keepalive),
            reserved_at: r.reserved_at,
            last_seen: r.last_seen,
            expires_at: r.expires_at(),
        })
    }

    fn due(&self, _id: &MachineId, now: Timestamp) -> Option<MeetingPointCommand> {
        match self {
            MeetingPoint::Present(r) if now >= r.expires_at() => Some(MeetingPointCommand::Expire),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CommandId;

    fn id() -> MachineId {
        MachineId::new("skia-rpi-001.example.com").unwrap()
    }

    fn at(secs: i64) -> Context {
        Context {
            now: Timestamp::from_unix_nanos(secs * 1_000_000_000),
        }
    }

    fn place(pod: &str, port: u16, lease: &str) -> Place {
        Place {
            pod: PodName::new(pod).unwrap(),
            port,
            lease: CommandId::new(lease).unwrap(),
        }
    }

    fn reserve(place: Place) -> MeetingPointCommand {
        MeetingPointCommand::Reserve {
            place,
            username: Username::new("chrome-bot").unwrap(),
            public_key: None,
            keepalive: Duration::from_secs(10),
        }
    }

    fn run(
        mp: &mut MeetingPoint,
        command: MeetingPointCommand,
        cx: Context,
    ) -> Result<Vec<MeetingPointEvent>, MeetingPointError> {
        let events = mp.decide(&id(), &command, &cx)?;
        for event in &events {
            mp.apply(event);
        }
        Ok(events)
    }

    #[test]
    fn reserving_again_replaces_and_names_the_old_place() {
        let mut mp = MeetingPoint::default();
        run(&mut mp, reserve(place("p1", 10000, "l1")), at(0)).unwrap();
        let command = reserve(place("p2", 10005, "l2"));
        run(&mut mp, command.clone(), at(1)).unwrap();
        let reply = mp.reply(&id(), &command);
        assert_eq!(reply.replaced, Some(place("p1", 10000, "l1")));
        let view = reply.meeting_point.unwrap();
        assert_eq!((view.pod.as_str(), view.port), ("p2", 10005));
        // The same reservation again writes nothing.
        assert!(run(&mut mp, command, at(2)).unwrap().is_empty());
    }

    #[test]
    fn keep_alive_needs_the_named_meeting_point() {
        let mut mp = MeetingPoint::default();
        let err = run(
            &mut mp,
            MeetingPointCommand::KeepAlive {
                expect: Expect::default(),
            },
            at(0),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        run(&mut mp, reserve(place("p1", 10000, "l1")), at(0)).unwrap();
        let stale = Expect {
            pod: Some(PodName::new("p0").unwrap()),
            ..Expect::default()
        };
        let err = run(
            &mut mp,
            MeetingPointCommand::KeepAlive { expect: stale },
            at(1),
        )
        .unwrap_err();
        assert!(matches!(err, MeetingPointError::Moved { .. }));
        run(
            &mut mp,
            MeetingPointCommand::KeepAlive {
                expect: Expect::lease(CommandId::new("l1").unwrap()),
            },
            at(5),
        )
        .unwrap();
        assert_eq!(mp.due(&id(), at(24).now), None);
        assert_eq!(mp.due(&id(), at(25).now), Some(MeetingPointCommand::Expire));
    }

    #[test]
    fn clear_is_idempotent_and_spares_a_newer_meeting_point() {
        let mut mp = MeetingPoint::default();
        let clear = |lease: &str| MeetingPointCommand::Clear {
            expect: Expect::lease(CommandId::new(lease).unwrap()),
            reason: ClearReason::Requested,
        };
        assert!(run(&mut mp, clear("l1"), at(0)).unwrap().is_empty());
        run(&mut mp, reserve(place("p1", 10000, "l2")), at(0)).unwrap();
        assert!(run(&mut mp, clear("l1"), at(1)).unwrap().is_empty());
        assert!(matches!(mp, MeetingPoint::Present(_)));
        run(&mut mp, clear("l2"), at(1)).unwrap();
        assert_eq!(mp, MeetingPoint::Absent);
    }

    #[test]
    fn expiry_clears_only_past_the_deadline() {
        let mut mp = MeetingPoint::default();
        run(&mut mp, reserve(place("p1", 10000, "l1")), at(0)).unwrap();
        assert!(
            run(&mut mp, MeetingPointCommand::Expire, at(19))
                .unwrap()
                .is_empty()
        );
        let events = run(&mut mp, MeetingPointCommand::Expire, at(20)).unwrap();
        assert!(matches!(
            &events[..],
            [MeetingPointEvent::Cleared(Cleared {
                reason: ClearReason::Expired,
                ..
            })]
        ));
    }
}
