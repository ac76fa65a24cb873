//! What a crash between the two steps of a reservation leaves behind, and the repair.
//!
//! A reservation leases a port on a pod, then records the meeting point. Between the two, or
//! when a meeting point expires, or when a pod expires, one side can exist without the other:
//! - a **lease without its meeting point** holds a port nobody uses: release it;
//! - a **meeting point without its lease** points at a port that is not held: clear it.
//!
//! Both sides are read from read models, which trail the log by a little; `grace` keeps the
//! reconciler off anything younger than that, so it never races a reservation in progress.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::meeting_point::Place;
use super::pod::Lease;
use super::{LeaseId, MachineId, PodName};
use crate::domain::Timestamp;

/// A port lease as a pod holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRow {
    pub pod: PodName,
    pub port: u16,
    pub lease: Lease,
    /// The stream sequence of the pod's last message when the lease was read: what the repair
    /// saw, so a repair of a later lease with the same id is a new command.
    pub observed: u64,
}

/// A meeting point as its machine holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlaceRow {
    pub machine: MachineId,
    pub place: Place,
    pub reserved_at: Timestamp,
    /// The stream sequence of the meeting point's last message when it was read.
    pub observed: u64,
}

/// One repair; each is a conditional command, harmless if the state moved on meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Release `port` on `pod` if `lease` still holds it.
    ReleaseLease {
        pod: PodName,
        port: u16,
        lease: LeaseId,
        observed: u64,
    },
    /// Clear `machine`'s meeting point if it still stands on `lease`.
    ClearMeetingPoint {
        machine: MachineId,
        lease: LeaseId,
        observed: u64,
    },
}

/// The repairs that make leases and meeting points agree, for rows older than `grace`.
pub fn repairs(
    leases: &[LeaseRow],
    places: &[PlaceRow],
    now: Timestamp,
    grace: Duration,
) -> Vec<Repair> {
    let settled = |at: Timestamp| now >= at.saturating_add(grace);
    // A lease is in use only by the meeting point standing on exactly it: the same pod, port
    // and lease id. The lease id alone is not enough: a reservation retried after a crash
    // keeps its id but may land on another pod, leaving the first pod's lease behind.
    let place_of: HashMap<&MachineId, &Place> = places
        .iter()
        .map(|row| (&row.machine, &row.place))
        .collect();
    let held: HashSet<(&PodName, u16, &LeaseId)> = leases
        .iter()
        .map(|row| (&row.pod, row.port, &row.lease.lease))
        .collect();
    let orphan_leases = leases
        .iter()
        .filter(|row| settled(row.lease.at))
        .filter(|row| {
            !place_of.get(&row.lease.machine).is_some_and(|place| {
                place.pod == row.pod && place.port == row.port && place.lease == row.lease.lease
            })
        })
        .map(|row| Repair::ReleaseLease {
            pod: row.pod.clone(),
            port: row.port,
            lease: row.lease.lease.clone(),
            observed: row.observed,
        });
    let orphan_places = places
        .iter()
        .filter(|row| settled(row.reserved_at))
        .filter(|row| !held.contains(&(&row.place.pod, row.place.port, &row.place.lease)))
        .map(|row| Repair::ClearMeetingPoint {
            machine: row.machine.clone(),
            lease: row.place.lease.clone(),
            observed: row.observed,
        });
    orphan_leases.chain(orphan_places).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CommandId;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_unix_nanos(secs * 1_000_000_000)
    }

    fn lease(pod: &str, port: u16, machine: &str, lease: &str, at: i64) -> LeaseRow {
        LeaseRow {
            pod: PodName::new(pod).unwrap(),
            port,
            lease: Lease {
                machine: MachineId::new(machine).unwrap(),
                lease: CommandId::new(lease).unwrap(),
                at: t(at),
            },
            observed: 1,
        }
    }

    fn place(machine: &str, pod: &str, port: u16, lease: &str, at: i64) -> PlaceRow {
        PlaceRow {
            machine: MachineId::new(machine).unwrap(),
            place: Place {
                pod: PodName::new(pod).unwrap(),
                port,
                lease: CommandId::new(lease).unwrap(),
            },
            reserved_at: t(at),
            observed: 2,
        }
    }

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn matching_pairs_need_nothing() {
        let leases = [lease("p", 1, "m", "l", 0)];
        let places = [place("m", "p", 1, "l", 0)];
        assert!(repairs(&leases, &places, t(100), GRACE).is_empty());
    }

    #[test]
    fn a_lease_without_its_meeting_point_is_released_after_the_grace() {
        // A crash after the lease: no meeting point. A replaced lease: the machine moved on.
        let leases = [lease("p", 1, "m1", "l1", 0), lease("p", 2, "m2", "old", 0)];
        let places = [place("m2", "q", 9, "new", 0)];
        let held = [lease("q", 9, "m2", "new", 0)];
        let all: Vec<LeaseRow> = leases.iter().chain(&held).cloned().collect();
        assert!(repairs(&all, &places, t(9), GRACE).is_empty());
        let found = repairs(&all, &places, t(10), GRACE);
        assert_eq!(
            found,
            vec![
                Repair::ReleaseLease {
                    pod: PodName::new("p").unwrap(),
                    port: 1,
                    lease: CommandId::new("l1").unwrap(),
                    observed: 1,
                },
                Repair::ReleaseLease {
                    pod: PodName::new("p").unwrap(),
                    port: 2,
                    lease: CommandId::new("old").unwrap(),
                    observed: 1,
                },
            ]
        );
    }

    #[test]
    fn a_lease_left_behind_by_a_retry_on_another_pod_is_released() {
        // A crash after leasing on p; the retry (same command id, so the same lease id)
        // leased on q and recorded the meeting point there.
        let leases = [lease("p", 1, "m", "r1", 0), lease("q", 7, "m", "r1", 0)];
        let places = [place("m", "q", 7, "r1", 0)];
        assert_eq!(
            repairs(&leases, &places, t(10), GRACE),
            vec![Repair::ReleaseLease {
                pod: PodName::new("p").unwrap(),
                port: 1,
                lease: CommandId::new("r1").unwrap(),
                observed: 1,
            }]
        );
    }

    #[test]
    fn a_meeting_point_without_its_lease_is_cleared() {
        // Its pod expired and took its leases with it.
        let places = [place("m", "gone", 1, "l", 0)];
        assert_eq!(
            repairs(&[], &places, t(10), GRACE),
            vec![Repair::ClearMeetingPoint {
                machine: MachineId::new("m").unwrap(),
                lease: CommandId::new("l").unwrap(),
                observed: 2,
            }]
        );
        // A lease on the same port from another reservation is not its lease.
        let leases = [lease("gone", 1, "m", "other", 0)];
        assert_eq!(repairs(&leases, &places, t(10), GRACE).len(), 2);
    }
}
