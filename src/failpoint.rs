//! Fault points for tests, armed by `SWITCHYARD_FAILPOINTS` (comma-separated names). Unset
//! (always, outside tests), a check is one load of a cached, empty list.
//!
//! - [`hit`]: `reserve.after_lease` makes the process abort the moment it reaches that point,
//!   as a `kill -9` there would.
//! - [`armed`]: `append.lose_ack.meeting_point` makes the event store report a meeting point's
//!   commit as unacknowledged after the server stored it, as a lost acknowledgement would.

use std::sync::OnceLock;

/// The variable that names the points, comma-separated.
pub const VARIABLE: &str = "SWITCHYARD_FAILPOINTS";

fn points() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(VARIABLE)
            .map(|points| points.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if points().iter().any(|point| point == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Whether `<name>.<detail>` is armed; the caller then injects its fault.
pub fn armed(name: &str, detail: &str) -> bool {
    points().iter().any(|point| {
        point
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('.'))
            == Some(detail)
    })
}
