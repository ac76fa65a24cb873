//! The catalog: every capability the control plane runs. A capability (the counter, the
//! switchboard, ...) is one [`Capability`] value: its entity kinds, its routes, and a `start`
//! that registers its actors, read models and timers through a [`Starter`]. Adding one is a
//! module and a line in [`capabilities`]; nothing here names a kind.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;
use tokio::sync::watch;

use super::routes::{self, RouteSpec};
use crate::codec::{self, StoredEvent};
use crate::config::Config;
use crate::domain::{Aggregate, DomainEvent, EntityId, EventType, IdError};
use crate::metrics::Metrics;
use crate::runtime::feed::Feed;
use crate::runtime::remote::Endpoint;
use crate::runtime::{
    Clock, Entities, EntityTable, ProjectionHandle, Readiness, Reaper, Settings, Stop,
};
use crate::store::provenance::{self, Provenance, Record};
use crate::store::{EventStore, StoreError, StoredMessage};

/// One capability: what it adds to the control plane, registered in one place.
pub struct Capability {
    pub name: &'static str,
    /// Its entity kinds: for readers of the log (audit, schemas), and each gets the route
    /// `<kind>.acknowledge_foreign`.
    pub kinds: fn() -> Vec<KindSpec>,
    pub routes: fn() -> Vec<RouteSpec>,
    /// Starts its actors, read models and timers on the current arbiter.
    pub start: fn(&mut Starter<'_>),
}

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every capability, in the order they start.
pub fn capabilities() -> Vec<Capability> {
    vec![
        crate::counter::capability(),
        crate::switchboard::capability(),
        crate::sessions::capability(),
        // After sessions: its pools are sessions pools.
        crate::cloud::capability(),
        crate::lessons::capability(),
    ]
}

/// Every route the API serves: each capability's, then `acknowledge_foreign` for every kind.
pub fn routes() -> Vec<RouteSpec> {
    let capabilities = capabilities();
    let mut routes: Vec<RouteSpec> = capabilities.iter().flat_map(|c| (c.routes)()).collect();
    routes.extend(
        capabilities
            .iter()
            .flat_map(|c| (c.kinds)())
            .map(|kind| (kind.acknowledge)()),
    );
    routes
}

/// Every entity kind, for readers of the log.
pub fn kinds() -> Vec<KindSpec> {
    capabilities().iter().flat_map(|c| (c.kinds)()).collect()
}

type Readinesses = Vec<(String, watch::Receiver<Readiness>)>;

/// What the capabilities found wrong in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {}", .0.join("; "))]
pub struct InvalidConfig(pub Vec<String>);

/// The running actors the routes are bound to, found by type: `Entities<A>`, a read model's
/// `ProjectionHandle`, or whatever a capability provides (the switchboard's handles).
#[derive(Clone)]
pub struct Services {
    inner: Arc<Registered>,
}

#[derive(Default)]
struct Registered {
    provided: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    endpoints: Vec<Arc<dyn Endpoint>>,
    /// Read models: the API waits for them, `/readyz` requires them.
    readiness: Readinesses,
    /// Shown on `/readyz`, not required.
    informational: Readinesses,
    /// Timers and read models, stopped first on shutdown.
    stops: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Entity registries, drained last (each actor snapshots on the way out).
    drains: Vec<Box<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>>,
    /// What a capability found wrong in its configuration: the control plane does not start.
    invalid: Vec<String>,
}

/// What a capability's `start` registers its parts with.
pub struct Starter<'a> {
    pub store: &'a EventStore,
    pub settings: &'a Arc<Settings>,
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    feed: &'a mut Feed,
    registered: &'a mut Registered,
}

impl Starter<'_> {
    pub fn clock(&self) -> Clock {
        self.settings.clock.clone()
    }

    /// Starts the registry of kind `A`: its actors serve this replica's shards, and other
    /// replicas' requests for them.
    pub fn entities<A: Aggregate>(&mut self) -> Entities<A> {
        let entities = Entities::<A>::start(
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
        );
        self.registered.endpoints.push(Arc::new(entities.clone()));
        let drained = entities.clone();
        self.registered.drains.push(Box::new(move |grace| {
            let entities = drained.clone();
            Box::pin(async move { entities.shutdown(grace).await })
        }));
        self.provide(entities.clone());
        entities
    }

    /// Starts the read model of every entity of kind `A` on the shared feed.
    pub fn table<A: Aggregate>(&mut self) -> ProjectionHandle<EntityTable<A>> {
        let table = ProjectionHandle::start_on(
            EntityTable::<A>::default(),
            self.feed,
            self.store.clone(),
            self.metrics.clone(),
        );
        self.registered
            .readiness
            .push((table.name().to_owned(), table.readiness()));
        let stopped = table.clone();
        self.registered.stops.push(Box::new(move || stopped.stop()));
        self.provide(table.clone());
        table
    }

    /// Starts the reaper of kind `A`: it sends what `Aggregate::due` says, for this replica's
    /// shards.
    pub fn reaper<A: Aggregate>(
        &mut self,
        table: &ProjectionHandle<EntityTable<A>>,
        entities: &Entities<A>,
    ) {
        let reaper = actix::Actor::start(Reaper::new(
            table.clone(),
            entities.clone(),
            self.clock(),
            self.config.runtime.reaper_interval,
            self.metrics.clone(),
        ));
        self.stop_on_shutdown(reaper);
    }

    /// Stops `timer` first on shutdown, before read models and actors.
    pub fn stop_on_shutdown<T>(&mut self, timer: actix::Addr<T>)
    where
        T: actix::Actor<Context = actix::Context<T>> + actix::Handler<Stop>,
    {
        self.registered
            .stops
            .push(Box::new(move || timer.do_send(Stop)));
    }

    /// The shared event feed, for read models of a capability's own shape.
    pub fn feed(&mut self) -> &mut Feed {
        self.feed
    }

    /// Something else of the capability that requires catching up before the API serves.
    pub fn require_ready(&mut self, name: String, readiness: watch::Receiver<Readiness>) {
        self.registered.readiness.push((name, readiness));
    }

    /// Starts a reaction: the API waits for it to catch up, `/readyz` requires it, and it
    /// stops (its jobs aborted, its checkpoint written) on shutdown.
    pub fn reaction<R: crate::runtime::reaction::Reaction>(
        &mut self,
        reaction: R,
    ) -> crate::runtime::reaction::ReactionHandle {
        let runtime = &self.config.runtime;
        let settings = crate::runtime::reaction::ReactionSettings {
            interval: runtime.reaction_interval,
            checkpoint_every: runtime.reaction_checkpoint_every,
            max_lag: runtime.reaction_max_lag,
        };
        let handle = crate::runtime::reaction::start(
            reaction,
            self.store.clone(),
            self.settings.ownership.clone(),
            settings,
            self.clock(),
            self.metrics.clone(),
        );
        self.registered
            .readiness
            .push((format!("reaction {}", R::NAME), handle.readiness()));
        let stopped = handle.clone();
        self.registered.stops.push(Box::new(move || stopped.stop()));
        handle
    }

    /// Runs `stop` first on shutdown (a capability's own tasks).
    pub fn on_shutdown(&mut self, stop: impl Fn() + Send + Sync + 'static) {
        self.registered.stops.push(Box::new(stop));
    }

    /// Says the capability's configuration is wrong: the control plane refuses to start,
    /// with this message.
    pub fn invalid(&mut self, message: impl Into<String>) {
        self.registered.invalid.push(message.into());
    }

    pub fn ownership(&self) -> &crate::cluster::Ownership {
        &self.settings.ownership
    }

    /// Makes `value` available to routes (`Services::get`), by its type.
    pub fn provide<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.registered
            .provided
            .insert(TypeId::of::<T>(), Box::new(value));
    }

    /// What a capability started before this one provided, by type.
    pub fn provided<T: Clone + 'static>(&self) -> Option<T> {
        self.registered
            .provided
            .get(&TypeId::of::<T>())
            .and_then(|value| value.downcast_ref::<T>())
            .cloned()
    }
}

impl Services {
    /// Starts every capability on the current arbiter: each registers its parts, then the
    /// shared feed starts reading for all the read models at once.
    pub fn start(
        store: &EventStore,
        config: &Config,
        clock: Clock,
        metrics: &Metrics,
        ownership: &crate::cluster::Ownership,
    ) -> Result<Self, InvalidConfig> {
        let settings = Arc::new(Settings {
            ownership: ownership.clone(),
            mailbox_capacity: config.runtime.mailbox_capacity,
            passivate_after: config.runtime.passivate_after,
            conflict_retries: config.runtime.conflict_retries,
            snapshot_every: store.config().snapshot_every,
            clock: clock.clone(),
        });
        let mut feed = Feed::new(store.clone());
        let mut registered = Registered::default();
        let mut starter = Starter {
            store,
            settings: &settings,
            config,
            metrics,
            feed: &mut feed,
            registered: &mut registered,
        };
        for capability in capabilities() {
            (capability.start)(&mut starter);
        }
        // The command index: lookups read the log past its position, so a lagging index
        // slows retries of old commands, nothing more. Shown on /readyz, not required.
        let indexer = crate::runtime::indexer::Indexer::start(
            store.clone(),
            &mut feed,
            clock,
            metrics.clone(),
        );
        registered.informational.push((
            crate::runtime::indexer::Indexer::NAME.to_owned(),
            indexer.readiness(),
        ));
        registered.stops.push(Box::new(move || indexer.stop()));
        // It ends by itself once every read model has stopped.
        feed.start();
        let invalid = std::mem::take(&mut registered.invalid);
        let services = Self {
            inner: Arc::new(registered),
        };
        if !invalid.is_empty() {
            for stop in &services.inner.stops {
                stop();
            }
            return Err(InvalidConfig(invalid));
        }
        Ok(services)
    }

    /// What a capability provided, by type: `Entities<A>`, a read model's handle, ...
    pub fn get<T: Clone + 'static>(&self) -> Option<T> {
        self.inner
            .provided
            .get(&TypeId::of::<T>())
            .and_then(|value| value.downcast_ref::<T>())
            .cloned()
    }

    /// The registry of kind `A`.
    pub fn entities<A: Aggregate>(&self) -> Option<Entities<A>> {
        self.get::<Entities<A>>()
    }

    /// The read model of kind `A`.
    pub fn table<A: Aggregate>(&self) -> Option<ProjectionHandle<EntityTable<A>>> {
        self.get::<ProjectionHandle<EntityTable<A>>>()
    }

    /// What answers other replicas' requests for entities of this replica's shards: one per
    /// kind.
    pub fn endpoints(&self) -> Vec<Arc<dyn Endpoint>> {
        self.inner.endpoints.clone()
    }

    /// Stops timers and read models, then every entity actor (each snapshots on the way out).
    pub async fn shutdown(&self, grace: Duration) {
        for stop in &self.inner.stops {
            stop();
        }
        futures::future::join_all(self.inner.drains.iter().map(|drain| drain(grace))).await;
    }

    /// What `/readyz` shows without waiting for it.
    pub fn informational(&self) -> Readinesses {
        self.inner.informational.clone()
    }

    /// The read models (and other followers of the log), by name, and whether each has caught
    /// up: the API waits for them, and `/readyz` requires them.
    pub fn readiness(&self) -> Readinesses {
        self.inner.readiness.clone()
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
    /// The kind's `acknowledge_foreign` route.
    pub acknowledge: fn() -> RouteSpec,
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
    pub fn of<A: Aggregate>() -> Self
    where
        A::Id: serde::de::DeserializeOwned + JsonSchema,
    {
        Self {
            acknowledge: routes::acknowledge_foreign::<A>,
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
