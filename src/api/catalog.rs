//! The catalog: every entity kind the control plane runs and every route it serves. Adding an
//! entity kind is a domain module plus a few lines here.

use std::sync::Arc;

use super::routes::{self, RouteSpec};
use crate::config::RuntimeConfig;
use crate::domain::Aggregate;
use crate::domain::counter::{AddToCounter, Counter, CreateCounter, DeleteCounter};
use crate::metrics::Metrics;
use crate::runtime::{Clock, Entities, EntityTable, ProjectionHandle, Reaper, Settings};
use crate::store::EventStore;

/// The running actors the routes are bound to.
#[derive(Clone)]
pub struct Services {
    pub counters: Entities<Counter>,
    pub counter_table: ProjectionHandle<EntityTable<Counter>>,
}

/// An aggregate the API serves: where its actors and read model are.
pub trait Served: Aggregate {
    fn entities(services: &Services) -> &Entities<Self>;
    fn table(services: &Services) -> &ProjectionHandle<EntityTable<Self>>;
}

impl Served for Counter {
    fn entities(services: &Services) -> &Entities<Self> {
        &services.counters
    }
    fn table(services: &Services) -> &ProjectionHandle<EntityTable<Self>> {
        &services.counter_table
    }
}

/// Every route the API serves.
pub fn routes() -> Vec<RouteSpec> {
    vec![
        routes::command::<CreateCounter>(
            "Create a counter at zero, with an optional limit and idle TTL",
        ),
        routes::command::<AddToCounter>("Add a positive amount to a counter, within its limit"),
        routes::command::<DeleteCounter>("Delete a counter; deleting a missing one succeeds"),
        routes::get::<Counter>("Read one counter"),
        routes::list::<Counter>("List counters in id order, a page at a time"),
    ]
}

impl Services {
    /// Starts every registry, read model and reaper on the current arbiter.
    pub fn start(
        store: &EventStore,
        runtime: &RuntimeConfig,
        clock: Clock,
        metrics: &Metrics,
    ) -> Self {
        let settings = Arc::new(Settings {
            mailbox_capacity: runtime.mailbox_capacity,
            passivate_after: runtime.passivate_after,
            conflict_retries: runtime.conflict_retries,
            snapshot_every: store.config().snapshot_every,
            clock: clock.clone(),
        });
        let counters = Entities::<Counter>::start(store.clone(), settings, metrics.clone());
        let counter_table = ProjectionHandle::start(
            EntityTable::<Counter>::default(),
            store.clone(),
            metrics.clone(),
        );
        actix::Actor::start(Reaper::new(
            counter_table.clone(),
            counters.clone(),
            clock,
            runtime.reaper_interval,
            metrics.clone(),
        ));
        Self {
            counters,
            counter_table,
        }
    }

    /// The read models, by name, and whether each has caught up: for `/readyz`.
    pub fn readiness(&self) -> Vec<(String, tokio::sync::watch::Receiver<bool>)> {
        vec![(
            self.counter_table.name().to_owned(),
            self.counter_table.readiness(),
        )]
    }
}
