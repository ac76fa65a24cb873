//! When an instance set may call its driver, and when it may create an instance: arvados's
//! throttles (`lib/dispatchcloud/worker/{pool,throttle}.go`), as pure state.
//!
//! - A rate-limit error suspends every call until its earliest retry.
//! - A quota error holds creation until fewer instances exist than when it was raised, or for
//!   `quota_ttl` (1 min), whichever comes first: a busy pool may never shrink, and a quota
//!   raised meanwhile lets it grow again.
//! - A capacity error holds one instance type, one quota group, or every type for
//!   `capacity_ttl` (1 min).
//! - `max_instances` counts instances and creates in flight; `max_concurrent_creates` counts
//!   creates in flight.
//! - `max_cloud_ops_per_second` spaces every call ([`OpsPacer`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;

/// The errors a driver reports, as their kinds (the message stays with the caller).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DriverErrorKind {
    /// Too many calls: none before `earliest_retry`.
    RateLimited { earliest_retry: Timestamp },
    /// The account holds as many instances as it may.
    Quota,
    /// The provider has no capacity for `scope`.
    Capacity { scope: CapacityScope },
    /// The driver cannot do this (verifying a host key, for one).
    NotImplemented,
    /// Anything else: retried at the next sync.
    Other,
}

/// What a capacity error holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "of", content = "name", rename_all = "snake_case")]
pub enum CapacityScope {
    /// One instance type.
    Type(String),
    /// Every type of one quota group (a family of types sharing a limit).
    QuotaGroup(String),
    /// Every type.
    All,
}

/// The limits configuration sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_instances: u32,
    pub max_concurrent_creates: u32,
    pub quota_ttl: Duration,
    pub capacity_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances: 64,
            max_concurrent_creates: 1,
            quota_ttl: Duration::from_secs(60),
            capacity_ttl: Duration::from_secs(60),
        }
    }
}

/// How many instances there are, and how many are being created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub instances: u32,
    pub creating: u32,
}

/// Why a call or a create must wait, and until when (if that is known).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "hold", rename_all = "snake_case")]
pub enum Hold {
    /// Every call is suspended until then (a rate-limit error).
    RateLimited { until: Timestamp },
    /// At quota, with no instance to wait for: until then.
    AtQuota { until: Timestamp },
    /// At quota until fewer than this many instances exist, or until then.
    AtQuotaUntilFewer { instances: u32, until: Timestamp },
    /// `max_instances` instances and creates exist.
    MaxInstances { max: u32 },
    /// `max_concurrent_creates` creates are in flight.
    ConcurrentCreates { max: u32 },
    /// No capacity for this scope until then.
    AtCapacity {
        scope: CapacityScope,
        until: Timestamp,
    },
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::RateLimited { until } => write!(f, "rate limited until {until}"),
            Hold::AtQuota { until } => write!(f, "at quota until {until}"),
            Hold::AtQuotaUntilFewer { instances, until } => write!(
                f,
                "at quota until fewer than {instances} instances exist, or until {until}"
            ),
            Hold::MaxInstances { max } => write!(f, "at max_instances ({max})"),
            Hold::ConcurrentCreates { max } => {
                write!(f, "{max} creates in flight (max_concurrent_creates)")
            }
            Hold::AtCapacity { scope, until } => {
                let scope = match scope {
                    CapacityScope::Type(t) => format!("instance type {t}"),
                    CapacityScope::QuotaGroup(g) => format!("quota group {g}"),
                    CapacityScope::All => "every instance type".to_owned(),
                };
                write!(f, "no capacity for {scope} until {until}")
            }
        }
    }
}

/// The throttles in force for one instance set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttles {
    suspended_until: Option<Timestamp>,
    at_quota_until: Option<Timestamp>,
    at_quota_until_fewer: Option<u32>,
    at_capacity: BTreeMap<CapacityScope, Timestamp>,
}

impl Throttles {
    /// Whether any call may be made now.
    pub fn may_call(&self, now: Timestamp) -> Result<(), Hold> {
        match self.suspended_until {
            Some(until) if now < until => Err(Hold::RateLimited { until }),
            _ => Ok(()),
        }
    }

    /// Whether an instance of `instance_type` (in `quota_group`) may be created now.
    pub fn may_create(
        &self,
        instance_type: &str,
        quota_group: &str,
        counts: Counts,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<(), Hold> {
        self.may_call(now)?;
        if let Some(hold) = self.quota_hold(now) {
            return Err(hold);
        }
        if counts.instances + counts.creating >= limits.max_instances {
            return Err(Hold::MaxInstances {
                max: limits.max_instances,
            });
        }
        if counts.creating >= limits.max_concurrent_creates {
            return Err(Hold::ConcurrentCreates {
                max: limits.max_concurrent_creates,
            });
        }
        for scope in [
            CapacityScope::Type(instance_type.to_owned()),
            CapacityScope::QuotaGroup(quota_group.to_owned()),
            CapacityScope::All,
        ] {
            if let Some(until) = self.at_capacity.get(&scope)
                && now < *until
            {
                return Err(Hold::AtCapacity {
                    scope,
                    until: *until,
                });
            }
        }
        Ok(())
    }

    /// What an error of a call made at `now` puts in force. `counts` are those when the call
    /// was made, the failed create included in `creating`.
    pub fn on_error(
        &mut self,
        error: &DriverErrorKind,
        counts: Counts,
        limits: &Limits,
        now: Timestamp,
    ) {
        match error {
            DriverErrorKind::RateLimited { earliest_retry } => {
                if *earliest_retry > now {
                    self.suspended_until = Some(
                        self.suspended_until
                            .map_or(*earliest_retry, |u| u.max(*earliest_retry)),
                    );
                }
            }
            DriverErrorKind::Quota => {
                // The others: every instance and create but the one that failed.
                let others = (counts.instances + counts.creating).saturating_sub(1);
                self.at_quota_until = Some(now.saturating_add(limits.quota_ttl));
                self.at_quota_until_fewer = (others > 0).then_some(others);
            }
            DriverErrorKind::Capacity { scope } => {
                self.at_capacity
                    .insert(scope.clone(), now.saturating_add(limits.capacity_ttl));
            }
            DriverErrorKind::NotImplemented | DriverErrorKind::Other => {}
        }
    }

    /// A sync found `instances`: a quota hold waiting for fewer ends once there are; expired
    /// holds are forgotten.
    pub fn on_sync(&mut self, instances: u32, now: Timestamp) {
        if self.at_quota_until_fewer.is_some_and(|n| instances < n) {
            self.at_quota_until_fewer = None;
            self.at_quota_until = None;
        }
        if self.at_quota_until.is_some_and(|u| u <= now) {
            self.at_quota_until = None;
            self.at_quota_until_fewer = None;
        }
        if self.suspended_until.is_some_and(|u| u <= now) {
            self.suspended_until = None;
        }
        self.at_capacity.retain(|_, until| *until > now);
    }

    /// Every hold in force now, for operators.
    pub fn in_force(&self, counts: Counts, limits: &Limits, now: Timestamp) -> Vec<Hold> {
        let mut holds = Vec::new();
        if let Err(hold) = self.may_call(now) {
            holds.push(hold);
        }
        holds.extend(self.quota_hold(now));
        if counts.instances + counts.creating >= limits.max_instances {
            holds.push(Hold::MaxInstances {
                max: limits.max_instances,
            });
        }
        for (scope, until) in &self.at_capacity {
            if now < *until {
                holds.push(Hold::AtCapacity {
                    scope: scope.clone(),
                    until: *until,
                });
            }
        }
        holds
    }

    /// The quota hold in force now, if any.
    fn quota_hold(&self, now: Timestamp) -> Option<Hold> {
        let until = self.at_quota_until.filter(|u| now < *u)?;
        Some(match self.at_quota_until_fewer {
            Some(instances) => Hold::AtQuotaUntilFewer { instances, until },
            None => Hold::AtQuota { until },
        })
    }

    /// The next moment a hold ends by itself, if any: when to look again.
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        [self.suspended_until, self.at_quota_until]
            .into_iter()
            .flatten()
            .chain(self.at_capacity.values().copied())
            .filter(|t| *t > now)
            .min()
    }
}

/// Spaces calls `1 / ops_per_second` apart (`max_cloud_ops_per_second`; 0: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpsPacer {
    interval: Duration,
    next: Option<Timestamp>,
}

impl OpsPacer {
    pub fn new(ops_per_second: u32) -> Self {
        let interval = if ops_per_second == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / ops_per_second
        };
        Self {
            interval,
            next: None,
        }
    }

    /// Takes a slot for a call at `now`: `Ok` to call now, or the moment to ask again.
    pub fn take(&mut self, now: Timestamp) -> Result<(), Timestamp> {
        match self.next {
            Some(next) if now < next => Err(next),
            _ => {
                self.next = Some(now.saturating_add(self.interval));
                Ok(())
            }
        }
    }

    /// A call that took its slot ended at `now`: the next starts no sooner than an interval
    /// after, so however late a call reached the driver after its slot, two calls are never
    /// closer there than the interval.
    pub fn finished(&mut self, now: Timestamp) {
        let after = now.saturating_add(self.interval);
        if self.next.is_none_or(|next| next < after) {
            self.next = Some(after);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::EPOCH.saturating_add(Duration::from_secs(s))
    }

    const NONE: Counts = Counts {
        instances: 0,
        creating: 0,
    };

    #[test]
    fn a_rate_limit_suspends_every_call_until_its_earliest_retry() {
        let limits = Limits::default();
        let mut t = Throttles::default();
        t.on_error(
            &DriverErrorKind::RateLimited {
                earliest_retry: at(30),
            },
            NONE,
            &limits,
            at(10),
        );
        assert_eq!(t.may_call(at(29)), Err(Hold::RateLimited { until: at(30) }));
        assert!(t.may_create("a1", "a", NONE, &limits, at(20)).is_err());
        assert_eq!(t.may_call(at(30)), Ok(()));
        // An earlier hint never shortens a suspension.
        t.on_error(
            &DriverErrorKind::RateLimited {
                earliest_retry: at(40),
            },
            NONE,
            &limits,
            at(31),
        );
        t.on_error(
            &DriverErrorKind::RateLimited {
                earliest_retry: at(35),
            },
            NONE,
            &limits,
            at(32),
        );
        assert_eq!(t.may_call(at(39)), Err(Hold::RateLimited { until: at(40) }));
    }

    #[test]
    fn quota_holds_until_fewer_instances_or_for_a_minute_whichever_comes_first() {
        let limits = Limits::default();
        let mut t = Throttles::default();
        // Three instances and the failed create.
        let counts = Counts {
            instances: 3,
            creating: 1,
        };
        t.on_error(&DriverErrorKind::Quota, counts, &limits, at(0));
        assert_eq!(
            t.may_create("a1", "a", counts, &limits, at(30)),
            Err(Hold::AtQuotaUntilFewer {
                instances: 3,
                until: at(60)
            })
        );
        t.on_sync(3, at(50));
        assert!(t.may_create("a1", "a", NONE, &limits, at(50)).is_err());
        t.on_sync(2, at(51));
        assert_eq!(t.may_create("a1", "a", NONE, &limits, at(51)), Ok(()));
        // A pool that stays busy: the hold ends after the minute all the same.
        let mut t = Throttles::default();
        t.on_error(&DriverErrorKind::Quota, counts, &limits, at(0));
        t.on_sync(3, at(59));
        assert!(t.may_create("a1", "a", NONE, &limits, at(59)).is_err());
        assert_eq!(t.may_create("a1", "a", NONE, &limits, at(60)), Ok(()));
        t.on_sync(3, at(60));
        assert_eq!(t.in_force(NONE, &limits, at(60)), []);

        let mut t = Throttles::default();
        let alone = Counts {
            instances: 0,
            creating: 1,
        };
        t.on_error(&DriverErrorKind::Quota, alone, &limits, at(0));
        assert_eq!(
            t.may_create("a1", "a", NONE, &limits, at(59)),
            Err(Hold::AtQuota { until: at(60) })
        );
        assert_eq!(t.may_create("a1", "a", NONE, &limits, at(60)), Ok(()));
    }

    #[test]
    fn capacity_holds_its_type_its_group_or_everything_for_a_minute() {
        let limits = Limits::default();
        let mut t = Throttles::default();
        t.on_error(
            &DriverErrorKind::Capacity {
                scope: CapacityScope::Type("m5.large".into()),
            },
            NONE,
            &limits,
            at(0),
        );
        assert!(
            t.may_create("m5.large", "m", NONE, &limits, at(10))
                .is_err()
        );
        assert_eq!(t.may_create("c5.large", "c", NONE, &limits, at(10)), Ok(()));
        t.on_error(
            &DriverErrorKind::Capacity {
                scope: CapacityScope::QuotaGroup("c".into()),
            },
            NONE,
            &limits,
            at(10),
        );
        assert!(
            t.may_create("c5.xlarge", "c", NONE, &limits, at(20))
                .is_err()
        );
        assert_eq!(t.may_create("m5.large", "m", NONE, &limits, at(60)), Ok(()));
        t.on_error(
            &DriverErrorKind::Capacity {
                scope: CapacityScope::All,
            },
            NONE,
            &limits,
            at(61),
        );
        assert!(matches!(
            t.may_create("x1", "x", NONE, &limits, at(62)),
            Err(Hold::AtCapacity {
                scope: CapacityScope::All,
                ..
            })
        ));
        assert_eq!(t.next_change(at(62)), Some(at(70)));
        t.on_sync(0, at(121));
        assert!(t.in_force(NONE, &limits, at(121)).is_empty());
    }

    #[test]
    fn max_instances_and_concurrent_creates_count_what_is_in_flight() {
        let limits = Limits {
            max_instances: 3,
            max_concurrent_creates: 1,
            ..Limits::default()
        };
        let t = Throttles::default();
        let creating = Counts {
            instances: 1,
            creating: 1,
        };
        assert_eq!(
            t.may_create("a1", "a", creating, &limits, at(0)),
            Err(Hold::ConcurrentCreates { max: 1 })
        );
        let full = Counts {
            instances: 3,
            creating: 0,
        };
        assert_eq!(
            t.may_create("a1", "a", full, &limits, at(0)),
            Err(Hold::MaxInstances { max: 3 })
        );
    }

    #[test]
    fn the_pacer_spaces_calls() {
        let mut pacer = OpsPacer::new(10);
        let start = at(1);
        assert_eq!(pacer.take(start), Ok(()));
        let next = start.saturating_add(Duration::from_millis(100));
        assert_eq!(pacer.take(start), Err(next));
        assert_eq!(pacer.take(next), Ok(()));
        // That call ended late: the next waits an interval from its end.
        let ended = next.saturating_add(Duration::from_millis(30));
        pacer.finished(ended);
        let after = ended.saturating_add(Duration::from_millis(100));
        assert_eq!(
            pacer.take(next.saturating_add(Duration::from_millis(100))),
            Err(after)
        );
        let mut free = OpsPacer::new(0);
        assert_eq!(free.take(start), Ok(()));
        assert_eq!(free.take(start), Ok(()));
    }
}
