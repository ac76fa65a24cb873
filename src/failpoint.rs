//! Crash points for tests: `SWITCHYARD_FAILPOINTS=reserve.after_lease` makes the process abort
//! the moment it reaches that point, as a `kill -9` there would. Unset (always, outside tests),
//! a check is one load of a cached, empty list.

use std::sync::OnceLock;

/// The variable that names the points, comma-separated.
pub const VARIABLE: &str = "SWITCHYARD_FAILPOINTS";

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var(VARIABLE)
            .map(|points| points.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default()
    });
    if armed.iter().any(|point| point == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
