//! The catalog: every entity kind the control plane runs and every route it serves. Adding an
//! entity kind is a domain module plus a few lines here.

use std::sync::Arc;

use futures::future::BoxFuture;
use schemars::{Schema, SchemaGenerator};
use serde_json::Value;

use super::routes::{self, RouteSpec};
use crate::codec::{self, StoredEvent};
use crate::config::{RuntimeConfig, SwitchboardConfig};
use crate::domain::counter::{AddToCounter, Counter, CreateCounter, DeleteCounter};
use crate::domain::switchboard::{MeetingPoint, Pod};
use crate::domain::{Aggregate, DomainEvent, EntityId, EventType, IdError};
use crate::metrics::Metrics;
use crate::runtime::feed::Feed;
use crate::runtime::{Clock, Entities, EntityTable, ProjectionHandle, Reaper, Settings, Stop};
use crate::store::provenance::{self, Provenance, Record};
use crate::store::{EventStore, StoreError, StoredMessage};
use crate::switchboard::{self, Switchboard};

/// The running actors the routes are bound to.
#[derive(Clone)]
pub struct Services {
    indexer: crate::runtime::indexer::Indexer,
    pub counters: Entities<Counter>,
    pub counter_table: ProjectionHandle<EntityTable<Counter>>,
    counter_reaper: actix::Addr<Reaper<Counter>>,
    pub switchboard: Switchboard,
    switchboard_timers: switchboard::Timers,
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

impl Served for Pod {
    fn entities(services: &Services) -> &Entities<Self> {
        &services.switchboard.pods
    }
    fn table(services: &Services) -> &ProjectionHandle<EntityTable<Self>> {
        &services.switchboard.pod_table
    }
}

impl Served for MeetingPoint {
    fn entities(services: &Services) -> &Entities<Self> {
        &services.switchboard.meeting_points
    }
    fn table(services: &Services) -> &ProjectionHandle<EntityTable<Self>> {
        &services.switchboard.meeting_point_table
    }
}

/// Every route the API serves.
pub fn routes() -> Vec<RouteSpec> {
    let mut routes = vec![
        routes::command::<CreateCounter>(
            "Create a counter at zero, with an optional limit and idle TTL",
        ),
        routes::command::<AddToCounter>("Add a positive amount to a counter, within its limit"),
        routes::command::<DeleteCounter>("Delete a counter; deleting a missing one succeeds"),
        routes::get::<Counter>("Read one counter"),
        routes::list::<Counter>("List counters in id order, a page at a time"),
    ];
    routes.extend(switchboard::routes::specs());
    routes.extend([
        routes::acknowledge_foreign::<Counter>(),
        routes::acknowledge_foreign::<Pod>(),
        routes::acknowledge_foreign::<MeetingPoint>(),
    ]);
    routes
}

impl Services {
    /// Starts every registry, read model and reaper on the current arbiter.
    pub fn start(
        store: &EventStore,
        runtime: &RuntimeConfig,
        switchboard: &SwitchboardConfig,
        clock: Clock,
        metrics: &Metrics,
        ownership: &crate::cluster::Ownership,
    ) -> Self {
        let settings = Arc::new(Settings {
            ownership: ownership.clone(),
            mailbox_capacity: runtime.mailbox_capacity,
            passivate_after: runtime.passivate_after,
            conflict_retries: runtime.conflict_retries,
            snapshot_every: store.config().snapshot_every,
            clock: clock.clone(),
        });
        // Every read model subscribes first; the feed then reads the stream once for all.
        let mut feed = Feed::new(store.clone());
        let (switchboard, switchboard_timers) = Switchboard::start(
            store,
            &mut feed,
            &settings,
            runtime.reaper_interval,
            switchboard,
            metrics,
        );
        let counters = Entities::<Counter>::start(store.clone(), settings, metrics.clone());
        let counter_table = ProjectionHandle::start_on(
            EntityTable::<Counter>::default(),
            &mut feed,
            store.clone(),
            metrics.clone(),
        );
        let indexer = crate::runtime::indexer::Indexer::start(
            store.clone(),
            &mut feed,
            clock.clone(),
            metrics.clone(),
        );
        // It ends by itself once every read model has stopped.
        feed.start();
        let counter_reaper = actix::Actor::start(Reaper::new(
            counter_table.clone(),
            counters.clone(),
            clock,
            runtime.reaper_interval,
            metrics.clone(),
        ));
        Self {
            indexer,
            counters,
            counter_table,
            counter_reaper,
            switchboard,
            switchboard_timers,
        }
    }

    /// What answers other replicas' requests for entities of this replica's shards: one per
    /// kind.
    pub fn endpoints(&self) -> Vec<Arc<dyn crate::runtime::remote::Endpoint>> {
        vec![
            Arc::new(self.counters.clone()),
            Arc::new(self.switchboard.pods.clone()),
            Arc::new(self.switchboard.meeting_points.clone()),
        ]
    }

    /// Stops reapers and read models, then every entity actor (each snapshots on the way out).
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.counter_reaper.do_send(Stop);
        self.counter_table.stop();
        futures::join!(
            self.counters.shutdown(grace),
            self.switchboard.shutdown(&self.switchboard_timers, grace)
        );
    }

    /// What `/readyz` shows without waiting for it: the command index (lookups read the log
    /// past its position, so a lagging index slows retries of old commands, nothing more).
    pub fn informational(
        &self,
    ) -> Vec<(
        String,
        tokio::sync::watch::Receiver<crate::runtime::Readiness>,
    )> {
        vec![(
            crate::runtime::indexer::Indexer::NAME.to_owned(),
            self.indexer.readiness(),
        )]
    }

    /// The read models, by name, and whether each has caught up: for `/readyz`.
    pub fn readiness(
        &self,
    ) -> Vec<(
        String,
        tokio::sync::watch::Receiver<crate::runtime::Readiness>,
    )> {
        let mut ready = vec![(
            self.counter_table.name().to_owned(),
            self.counter_table.readiness(),
        )];
        ready.extend(self.switchboard.readiness());
        ready
    }
}

/// What readers of the log need to know about one entity kind: its event types and schemas,
/// how to decode its messages to JSON, and how to rebuild an entity as of a point in the log.
pub struct KindSpec {
    pub kind: &'static str,
    pub event_types: fn() -> Vec<EventType>,
    pub event_schema: fn(&str, u16, &mut SchemaGenerator) -> Option<Schema>,
    /// What a message of this kind is: the store's events or record, foreign, or newer.
    pub inspect: fn(&StoredMessage) -> Inspected,
    pub view_as_of:
        for<'a> fn(&'a EventStore, &'a str, u64) -> BoxFuture<'a, Result<ViewAsOf, AsOfError>>,
}

impl std::fmt::Debug for KindSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind)
    }
}

/// One message of a kind, as a reader of the log sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Inspected {
    /// A commit of the store, decoded to JSON.
    Events(Vec<StoredEvent>),
    /// A record of the store (an acknowledgement).
    Record(Record),
    /// Not written by the store, and why.
    Foreign(String),
    /// Written by a newer Switchyard.
    Newer(String),
}

fn inspect<A: Aggregate>(message: &StoredMessage) -> Inspected {
    match provenance::classify::<A::Event>(A::KIND, message) {
        Provenance::Commit { .. } => {
            let events = message
                .encoding()
                .and_then(|encoding| codec::events_to_json::<A::Event>(&message.payload, encoding));
            match events {
                Ok(events) => Inspected::Events(events),
                Err(err) => Inspected::Foreign(crate::runtime::error_chain(&err)),
            }
        }
        Provenance::Record { record, .. } => Inspected::Record(record),
        Provenance::Foreign(reason) => Inspected::Foreign(reason.to_string()),
        Provenance::Newer(event) => Inspected::Newer(event.to_string()),
    }
}

/// An entity as it was at a point in the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ViewAsOf {
    /// `None` if the entity did not exist then.
    pub view: Option<Value>,
    pub version: u64,
    /// Stream sequence of the entity's last message at that point (0: none).
    pub sequence: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AsOfError {
    #[error("invalid {kind} id")]
    Id {
        kind: &'static str,
        #[source]
        source: IdError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode the view as JSON")]
    Json(#[from] serde_json::Error),
}

impl KindSpec {
    pub fn of<A: Aggregate>() -> Self {
        Self {
            kind: A::KIND,
            event_types: A::Event::known_types,
            event_schema: A::Event::schema,
            inspect: inspect::<A>,
            view_as_of: |store, id, seq| {
                Box::pin(async move {
                    let id = A::Id::parse(id).map_err(|source| AsOfError::Id {
                        kind: A::KIND,
                        source,
                    })?;
                    let entity = store.load_as_of::<A>(&id, seq).await?;
                    let view = entity
                        .state
                        .view(&id)
                        .map(serde_json::to_value)
                        .transpose()?;
                    Ok(ViewAsOf {
                        view,
                        version: entity.version,
                        sequence: entity.last_seq,
                    })
                })
            },
        }
    }
}

/// Every entity kind, for readers of the log.
pub fn kinds() -> Vec<KindSpec> {
    vec![
        KindSpec::of::<Counter>(),
        KindSpec::of::<Pod>(),
        KindSpec::of::<MeetingPoint>(),
    ]
}
