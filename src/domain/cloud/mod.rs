//! Cloud worker pools (seed 003, arvados `lib/cloud`): the pure rules. [`throttle`] holds when
//! an instance set may call its driver and create instances; [`worker`] is an instance's life
//! as a worker (an entity) and when it is shut down; [`instance_set`] is a set's
//! configuration and the throttles in force (an entity); [`plan`] is what one sync of an instance
//! set does, from what the driver lists, what the log knows and what waits for machines.

pub mod instance_set;
pub mod plan;
pub mod throttle;
pub mod worker;

use crate::entity_id;

entity_id!(
    /// Names an instance set: its cloud pool's name. Every instance it creates carries it.
    InstanceSetId,
    "instance set id"
);

entity_id!(
    /// Names a worker: its instance's id, as the driver gave it.
    WorkerId,
    "worker id"
);
