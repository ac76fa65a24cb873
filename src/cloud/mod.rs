//! Cloud worker pools (seed 003, arvados dispatch-cloud). In progress (issue 14): the driver
//! contract with its registry and the stub driver ([`driver`]), and an instance set behind its
//! throttles ([`throttled`]). The loopback, static and Kubernetes drivers, the SSH executor,
//! the worker entities and the sync reaction come next.

pub mod driver;
pub mod throttled;
