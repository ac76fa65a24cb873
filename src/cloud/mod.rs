//! Cloud worker pools (seed 003, arvados dispatch-cloud). In progress (issue 14): the driver
//! contract with its registry and the stub driver ([`driver`]), an instance set behind its
//! throttles ([`throttled`]), the loopback driver whose instances are real local sshd
//! processes ([`loopback`]), and the SSH executor that verifies an instance before it runs
//! anything on it ([`ssh`]). The static and Kubernetes drivers, the worker entities and the
//! sync reaction come next.

pub mod driver;
pub mod loopback;
pub mod ssh;
pub mod throttled;
