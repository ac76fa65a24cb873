//! The cloud pools' routes: `worker.get`, `list`, `hold`, `drain`, `run`, `kill`, and
//! `instance_set.get` and `list`.

use super::protocol::{DrainWorker, HoldWorker, KillWorker, RunWorker};
use crate::api::routes::{self, RouteSpec};
use crate::domain::cloud::instance_set::InstanceSet;
use crate::domain::cloud::worker::Worker;

/// Every cloud route.
pub fn specs() -> Vec<RouteSpec> {
    vec![
        routes::get::<Worker>(
            "Read one worker (a cloud instance): its state, idle behaviour, and why it was shut down",
        ),
        routes::list::<Worker>("List workers in id order, gone ones included"),
        routes::command::<HoldWorker>(
            "Hold a worker: nothing new starts on it and it is never shut down (conflict once it is being shut down)",
        ),
        routes::command::<DrainWorker>(
            "Drain a worker: nothing new starts on it, and it is shut down once idle",
        ),
        routes::command::<RunWorker>("Let work run on a held or drained worker again"),
        routes::command::<KillWorker>(
            "Shut a worker down now, whatever runs on it; its instance is destroyed",
        ),
        routes::get::<InstanceSet>(
            "Read one instance set: its driver, instance type, max_instances, and the throttles in force",
        ),
        routes::list::<InstanceSet>("List the instance sets"),
    ]
}
