//! The operators' commands on workers: `worker.hold`, `drain`, `run` and `kill`. Each names
//! one worker (its instance id) and is idempotent; a worker that is being shut down can no
//! longer change its idle behaviour (`conflict`), and one that is gone is `not_found`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::CommandRequest;
use crate::domain::cloud::WorkerId;
use crate::domain::cloud::worker::{IdleBehavior, ShutdownReason, Worker, WorkerCommand};

/// Names one worker.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerRequest {
    pub id: WorkerId,
}

macro_rules! idle_behavior_route {
    ($name:ident, $verb:literal, $behavior:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub id: WorkerId,
        }

        impl CommandRequest for $name {
            type Aggregate = Worker;
            const VERB: &'static str = $verb;

            fn into_command(self) -> (WorkerId, WorkerCommand) {
                (
                    self.id,
                    WorkerCommand::SetIdleBehavior {
                        idle_behavior: $behavior,
                    },
                )
            }
        }
    };
}

idle_behavior_route!(
    HoldWorker,
    "hold",
    IdleBehavior::Hold,
    "`worker.hold`: nothing new starts on it, and it is never shut down (not even when idle)."
);
idle_behavior_route!(
    DrainWorker,
    "drain",
    IdleBehavior::Drain,
    "`worker.drain`: nothing new starts on it, and it is shut down once nothing runs on it."
);
idle_behavior_route!(
    RunWorker,
    "run",
    IdleBehavior::Run,
    "`worker.run`: work runs on it again, and it is shut down when idle too long."
);

/// `worker.kill`: shut it down now, whatever runs on it; the sync destroys the instance.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillWorker {
    pub id: WorkerId,
}

impl CommandRequest for KillWorker {
    type Aggregate = Worker;
    const VERB: &'static str = "kill";

    fn into_command(self) -> (WorkerId, WorkerCommand) {
        (
            self.id,
            WorkerCommand::Shutdown {
                reason: ShutdownReason::Killed,
            },
        )
    }
}
