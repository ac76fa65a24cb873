//! `switchboard`: machine connectivity through SSH meeting points on switch pods.
//!
//! A **pod** runs an SSH server machines connect to; it owns a range of ports and leases each to
//! at most one meeting point, so no two meeting points ever share a (pod, port): the pod's actor
//! is the only writer of its leases. A **meeting point** says where one machine can be reached:
//! (pod, port, username). Reserving one is two steps on two entities (lease a port, then record
//! the meeting point); [`reconcile`] finds what a crash between them left behind.

pub mod meeting_point;
pub mod pod;
pub mod reconcile;

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{entity_id, text_id};

pub use meeting_point::{MeetingPoint, MeetingPointCommand, MeetingPointEvent, MeetingPointView};
pub use pod::{Pod, PodCommand, PodEvent, PodView};

/// How often a pod-agent calls `pod.keep_alive`, unless it registers another period.
pub const POD_KEEPALIVE: Duration = Duration::from_secs(5 * 60);
/// How often a machine-agent calls `meeting_point.keep_alive`, unless it reserves with another.
pub const MEETING_POINT_KEEPALIVE: Duration = Duration::from_secs(5 * 60);
/// A pod or meeting point expires after this many keep-alive periods without one.
pub const MISSED_KEEPALIVES: u32 = 2;
/// The ports a pod leases unless it registers another range.
pub const DEFAULT_PORTS: PortRange = PortRange {
    first: 10000,
    last: 19999,
};
/// The shortest keep-alive period accepted: shorter ones would flood the log.
pub const MIN_KEEPALIVE: Duration = Duration::from_millis(100);
/// The longest keep-alive period accepted.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(24 * 60 * 60);

entity_id!(
    /// Names a switch pod: any printable text, usually the Kubernetes pod name.
    PodName,
    "pod name"
);

entity_id!(
    /// Names a test machine: any printable text, e.g. `skia-rpi-001.example.com`.
    MachineId,
    "machine id"
);

/// The longest user name accepted (Linux's limit).
pub const MAX_USERNAME: usize = 32;

text_id!(
    /// The account a client logs in as on a machine: a portable POSIX user name.
    Username,
    "user name on the machine",
    MAX_USERNAME,
    shape = portable_user_name,
    rule = "a letter or '_', then letters, digits, '_', '-' or '.'",
    pattern = "^[A-Za-z_][A-Za-z0-9_.-]*$"
);

fn portable_user_name(value: &str) -> bool {
    let mut chars = value.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The longest public key accepted (a 16384-bit RSA key is about 2.8 KB).
pub const MAX_PUBLIC_KEY: usize = 8192;

text_id!(
    /// A machine's SSH public key in canonical OpenSSH one-line form, `<type> <base64>` (no
    /// comment). The API adapter parses what callers send and canonicalizes it; this type
    /// checks only the shape, so the domain needs no cryptography.
    SshPublicKey,
    "machine's SSH public key",
    MAX_PUBLIC_KEY,
    shape = openssh_key_shape,
    rule = "`<type> <base64>`, as in an authorized_keys line without its comment",
    pattern = "^[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+$"
);

fn openssh_key_shape(value: &str) -> bool {
    value.split_once(' ').is_some_and(|(kind, blob)| {
        !kind.is_empty()
            && kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '@' | '.'))
            && !blob.is_empty()
            && blob
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
    })
}

/// Identifies one port lease: the id of the reservation that took it. A meeting point names
/// its lease, so a lease and a meeting point match only if they come from the same reservation.
pub type LeaseId = super::CommandId;

/// An inclusive range of TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, PortRangeError> {
        if first == 0 || first > last {
            return Err(PortRangeError { first, last });
        }
        Ok(Self { first, last })
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn len(self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    pub fn is_empty(self) -> bool {
        false
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = PortRangeError;
    /// `FIRST-LAST`, inclusive.
    fn from_str(text: &str) -> Result<Self, PortRangeError> {
        let bad = PortRangeError { first: 0, last: 0 };
        let (first, last) = text.split_once('-').ok_or(bad)?;
        let first = first.trim().parse().map_err(|_| bad)?;
        let last = last.trim().parse().map_err(|_| bad)?;
        Self::new(first, last)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a port range is FIRST-LAST with 1 <= FIRST <= LAST <= 65535, not {first}-{last}")]
pub struct PortRangeError {
    pub first: u16,
    pub last: u16,
}

/// Checks a keep-alive period given by a caller.
pub fn keepalive(ms: Option<u64>, default: Duration) -> Result<Duration, KeepAliveError> {
    let Some(ms) = ms else { return Ok(default) };
    let period = Duration::from_millis(ms);
    if (MIN_KEEPALIVE..=MAX_KEEPALIVE).contains(&period) {
        Ok(period)
    } else {
        Err(KeepAliveError { ms })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "keep-alive period must be {} ms to {} ms, not {ms} ms",
    MIN_KEEPALIVE.as_millis(),
    MAX_KEEPALIVE.as_millis()
)]
pub struct KeepAliveError {
    pub ms: u64,
}

/// Milliseconds, saturating, for events and views.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_portable() {
        for ok in ["chrome-bot", "root", "_svc", "a.b", "X1"] {
            assert!(Username::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "1abc", "a b", "a/b", "ü", &"a".repeat(33)] {
            assert!(Username::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn public_keys_are_checked_for_shape() {
        let ok = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0";
        assert_eq!(SshPublicKey::new(ok).unwrap().as_str(), ok);
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 ",
            " ssh-ed25519 AAAA",
            "ssh-ed25519 AA AA",
            "a b!",
            "ssh-ed25519 AAAA comment",
        ] {
            assert!(SshPublicKey::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_ranges_parse_and_check() {
        let range: PortRange = "10000-19999".parse().unwrap();
        assert_eq!(range, DEFAULT_PORTS);
        assert_eq!(range.len(), 10000);
        assert!(range.contains(10000) && range.contains(19999) && !range.contains(20000));
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keepalive_periods_are_bounded() {
        assert_eq!(keepalive(None, POD_KEEPALIVE), Ok(POD_KEEPALIVE));
        assert_eq!(
            keepalive(Some(1000), POD_KEEPALIVE),
            Ok(Duration::from_secs(1))
        );
        assert!(keepalive(Some(1), POD_KEEPALIVE).is_err());
        assert!(keepalive(Some(u64::MAX), POD_KEEPALIVE).is_err());
    }
}
