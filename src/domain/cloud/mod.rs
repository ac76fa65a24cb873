//! Cloud worker pools (seed 003, arvados `lib/cloud`): the pure rules. In progress (issue 14):
//! [`throttle`] holds when an instance set may call its driver and create instances;
//! [`worker`] is an instance's life as a worker and when it is shut down. The entities, the
//! drivers and the sync reaction that use them come next.

pub mod throttle;
pub mod worker;
