//! Driver errors on demand, for any driver: `driver_config.errors` makes every n-th call of an
//! operation fail with a typed error before it reaches the driver, as a cloud's API would
//! (arvados's test drivers do the same). For drills and benchmarks; a pool without `errors`
//! is not wrapped.
//!
//! Instance faults (`faults`, for drivers whose instances are made here: loopback and stub)
//! fall on every n-th instance a set creates: a slow boot, no boot at all, an instance that
//! disappears, one that presents another host key than it was made with, and an impostor that
//! never ran the init command (so it does not have the instance secret).
//!
//! `{"errors": [{"operation": "create", "kind": "quota", "every": 5},
//!              {"operation": "instances", "kind": "rate_limited", "every": 7, "retry_after": "1s"},
//!              {"operation": "create", "kind": "capacity", "scope": "type", "every": 6}]}`;
//! kinds: `rate_limited` (with `retry_after`), `quota`, `capacity` (scope `type`,
//! `quota_group` or `all`), `failed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::driver::{DriverError, Instance, InstanceSet, InstanceSpec, Operation, Result};
use crate::domain::cloud::throttle::CapacityScope;
use crate::runtime::Clock;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFault {
    pub operation: FaultOperation,
    pub kind: ErrorKind,
    pub every: u64,
    #[serde(default, with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    #[serde(default)]
    pub scope: Option<Scope>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultOperation {
    Create,
    Instances,
    Destroy,
    SetTags,
}

impl FaultOperation {
    fn of(operation: Operation) -> Option<Self> {
        match operation {
            Operation::Create => Some(Self::Create),
            Operation::Instances => Some(Self::Instances),
            Operation::Destroy => Some(Self::Destroy),
            Operation::SetTags => Some(Self::SetTags),
            Operation::VerifyHostKey => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    RateLimited,
    Quota,
    Capacity,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Type,
    QuotaGroup,
    All,
}

/// The `errors` of a pool's driver configuration, checked; none when it has none.
pub fn parse(config: &serde_json::Value) -> Result<Vec<ErrorFault>> {
    let Some(errors) = config.get("errors") else {
        return Ok(Vec::new());
    };
    let faults: Vec<ErrorFault> =
        serde_json::from_value(errors.clone()).map_err(|e| DriverError::InvalidConfig {
            message: format!("errors: {e}"),
        })?;
    for fault in &faults {
        if fault.every == 0 {
            return Err(DriverError::InvalidConfig {
                message: "errors: \"every\" is at least 1".into(),
            });
        }
        if fault.kind == ErrorKind::RateLimited && fault.retry_after.is_none() {
            return Err(DriverError::InvalidConfig {
                message: "errors: a rate_limited error needs retry_after".into(),
            });
        }
    }
    Ok(faults)
}

/// The configuration without `errors`: what the wrapped driver is given.
pub fn without_errors(config: &serde_json::Value) -> serde_json::Value {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        map.remove("errors");
    }
    config
}

/// An instance fault, on every `every`-th instance the set creates (1: every instance).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFault {
    pub kind: InstanceFaultKind,
    pub every: u64,
    /// `slow_boot`: the boot delay instead of the configured one.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// `disappear`: how long after booting it vanishes.
    #[serde(default, with = "humantime_serde")]
    pub after: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceFaultKind {
    SlowBoot,
    NoBoot,
    Disappear,
    WrongHostKey,
    Impostor,
}

/// Checks what each kind of instance fault needs (`driver` names the driver in errors).
pub fn check_instance_faults(driver: &str, faults: &[InstanceFault]) -> Result<()> {
    for fault in faults {
        let missing = match fault.kind {
            InstanceFaultKind::SlowBoot if fault.delay.is_none() => Some("delay"),
            InstanceFaultKind::Disappear if fault.after.is_none() => Some("after"),
            _ => None,
        };
        if let Some(field) = missing {
            return Err(DriverError::InvalidConfig {
                message: format!("{driver}: a {:?} fault needs {field:?}", fault.kind),
            });
        }
        if fault.every == 0 {
            return Err(DriverError::InvalidConfig {
                message: format!("{driver}: a fault's \"every\" is at least 1"),
            });
        }
    }
    Ok(())
}

/// The faults of the `ordinal`-th instance (from 1).
pub fn instance_faults_of(
    faults: &[InstanceFault],
    ordinal: u64,
) -> impl Iterator<Item = &InstanceFault> {
    faults
        .iter()
        .filter(move |f| ordinal.is_multiple_of(f.every))
}

/// A set whose calls fail as its faults say.
pub struct Faulty {
    inner: Arc<dyn InstanceSet>,
    faults: Vec<ErrorFault>,
    calls: BTreeMap<Operation, AtomicU64>,
    clock: Clock,
}

impl Faulty {
    pub fn new(inner: Arc<dyn InstanceSet>, faults: Vec<ErrorFault>, clock: Clock) -> Self {
        let calls = [
            Operation::Create,
            Operation::Instances,
            Operation::Destroy,
            Operation::SetTags,
        ]
        .into_iter()
        .map(|op| (op, AtomicU64::new(0)))
        .collect();
        Self {
            inner,
            faults,
            calls,
            clock,
        }
    }

    /// The error this call of `operation` fails with, if any.
    fn fault(&self, operation: Operation, instance_type: &str) -> Result<()> {
        let Some(counter) = self.calls.get(&operation) else {
            return Ok(());
        };
        let call = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(fault) = self.faults.iter().find(|f| {
            Some(f.operation) == FaultOperation::of(operation) && call.is_multiple_of(f.every)
        }) else {
            return Ok(());
        };
        let message = format!("injected on call {call} of {operation:?}");
        Err(match fault.kind {
            ErrorKind::RateLimited => DriverError::RateLimited {
                earliest_retry: (self.clock)()
                    .saturating_add(fault.retry_after.unwrap_or_default()),
                message,
            },
            ErrorKind::Quota => DriverError::Quota { message },
            ErrorKind::Capacity => DriverError::Capacity {
                scope: match fault.scope.unwrap_or(Scope::Type) {
                    Scope::Type => CapacityScope::Type(instance_type.to_owned()),
                    Scope::QuotaGroup => CapacityScope::QuotaGroup(instance_type.to_owned()),
                    Scope::All => CapacityScope::All,
                },
                message,
            },
            ErrorKind::Failed => DriverError::Failed { message },
        })
    }
}

impl InstanceSet for Faulty {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            self.fault(Operation::Create, &spec.instance_type)?;
            self.inner.create(spec).await
        })
    }

    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            self.fault(Operation::Instances, "")?;
            self.inner.instances(tags).await
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.fault(Operation::Destroy, "")?;
            self.inner.destroy(id).await
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.fault(Operation::SetTags, "")?;
            self.inner.set_tags(id, tags).await
        })
    }

    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.verify_host_key(id, host_key)
    }

    fn stop(&self) {
        self.inner.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_checked_and_taken_out_of_the_drivers_configuration() {
        let config = serde_json::json!({"boot_delay": "1s", "errors": [
            {"operation": "create", "kind": "quota", "every": 2}]});
        assert_eq!(parse(&config).unwrap().len(), 1);
        assert_eq!(
            without_errors(&config),
            serde_json::json!({"boot_delay": "1s"})
        );
        for bad in [
            serde_json::json!({"errors": [{"operation": "create", "kind": "quota", "every": 0}]}),
            serde_json::json!({"errors": [{"operation": "create", "kind": "rate_limited", "every": 1}]}),
            serde_json::json!({"errors": [{"operation": "boot", "kind": "quota", "every": 1}]}),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        assert!(parse(&serde_json::Value::Null).unwrap().is_empty());
    }
}
