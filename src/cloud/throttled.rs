//! An instance set behind its throttles (`domain::cloud::throttle`): no call while a rate
//! limit holds, calls spaced by `max_cloud_ops_per_second`, no create while quota, capacity,
//! `max_instances` or `max_concurrent_creates` hold; and what each error puts in force.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::driver::{DriverError, Instance, InstanceSet, InstanceSpec};
use crate::domain::cloud::throttle::{Counts, DriverErrorKind, Hold, Limits, OpsPacer, Throttles};
use crate::metrics::{DriverCallLabels, Metrics};
use crate::runtime::Clock;

/// Why a call was not made, or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not made: a throttle holds.
    #[error("held: {0}")]
    Held(Hold),
    /// Made, and the driver failed it (the throttles have taken note).
    #[error(transparent)]
    Driver(#[from] DriverError),
}

pub struct Throttled {
    inner: Arc<dyn InstanceSet>,
    /// Where calls are counted, and the set's id they are counted under.
    metrics: Option<(Metrics, String)>,
    limits: Limits,
    clock: Clock,
    throttles: Mutex<Throttles>,
    pacer: Mutex<OpsPacer>,
}

impl Throttled {
    pub fn new(
        inner: Arc<dyn InstanceSet>,
        limits: Limits,
        ops_per_second: u32,
        clock: Clock,
    ) -> Self {
        Self {
            inner,
            metrics: None,
            limits,
            clock,
            throttles: Mutex::new(Throttles::default()),
            pacer: Mutex::new(OpsPacer::new(ops_per_second)),
        }
    }

    /// Counts every driver call by operation and outcome (`switchyard_cloud_driver_calls`).
    pub fn with_metrics(mut self, metrics: Metrics, set: &str) -> Self {
        self.metrics = Some((metrics, set.to_owned()));
        self
    }

    fn count<T>(&self, operation: &str, result: &Result<T, DriverError>) {
        let Some((metrics, set)) = &self.metrics else {
            return;
        };
        let outcome = match result {
            Ok(_) => "ok",
            Err(err) => match err.kind() {
                DriverErrorKind::RateLimited { .. } => "rate_limited",
                DriverErrorKind::Quota => "quota",
                DriverErrorKind::Capacity { .. } => "capacity",
                DriverErrorKind::NotImplemented => "not_implemented",
                DriverErrorKind::Other => "error",
            },
        };
        metrics
            .cloud_driver_calls
            .get_or_create(&DriverCallLabels {
                set: set.clone(),
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    fn throttles(&self) -> std::sync::MutexGuard<'_, Throttles> {
        self.throttles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a call slot; refuses while a rate limit holds.
    async fn slot(&self) -> Result<(), Refusal> {
        loop {
            let now = (self.clock)();
            self.throttles().may_call(now).map_err(Refusal::Held)?;
            let taken = self
                .pacer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(now);
            match taken {
                Ok(()) => return Ok(()),
                Err(at) => tokio::time::sleep(at.since(now)).await,
            }
        }
    }

    fn finished(&self) {
        self.pacer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finished((self.clock)());
    }

    fn noted<T>(&self, result: Result<T, DriverError>, counts: Counts) -> Result<T, Refusal> {
        result.map_err(|err| {
            let now = (self.clock)();
            self.throttles()
                .on_error(&err.kind(), counts, &self.limits, now);
            Refusal::Driver(err)
        })
    }

    /// Creates an instance unless a throttle holds; `counts` include this create.
    pub async fn create(
        &self,
        spec: &InstanceSpec,
        quota_group: &str,
        counts: Counts,
    ) -> Result<Instance, Refusal> {
        let before = Counts {
            creating: counts.creating.saturating_sub(1),
            ..counts
        };
        self.throttles()
            .may_create(
                &spec.instance_type,
                quota_group,
                before,
                &self.limits,
                (self.clock)(),
            )
            .map_err(Refusal::Held)?;
        self.slot().await?;
        let result = self.inner.create(spec).await;
        self.finished();
        self.count("create", &result);
        self.noted(result, counts)
    }

    /// The instances with every one of `tags`; a successful list ends the holds it can.
    pub async fn instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, Refusal> {
        self.slot().await?;
        let result = self.inner.instances(tags).await;
        self.finished();
        self.count("instances", &result);
        let found = self.noted(result, Counts::default())?;
        let count = u32::try_from(found.len()).unwrap_or(u32::MAX);
        self.throttles().on_sync(count, (self.clock)());
        Ok(found)
    }

    pub async fn destroy(&self, id: &str) -> Result<(), Refusal> {
        self.slot().await?;
        let result = self.inner.destroy(id).await;
        self.finished();
        self.count("destroy", &result);
        self.noted(result, Counts::default())
    }

    pub async fn set_tags(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Refusal> {
        self.slot().await?;
        let result = self.inner.set_tags(id, tags).await;
        self.finished();
        self.count("set_tags", &result);
        self.noted(result, Counts::default())
    }

    /// The holds in force, for operators.
    pub fn holds(&self, counts: Counts) -> Vec<Hold> {
        self.throttles()
            .in_force(counts, &self.limits, (self.clock)())
    }
}
