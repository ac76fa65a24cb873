//! Routes: what each `<kind>.<verb>` does, described once (for dispatch, `$SRV.INFO` and
//! `schemas/`) and bound to the running services at startup.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::catalog::Services;
use super::{ApiError, ApiRequest, body_as};
use crate::domain::{Aggregate, CommandRequest};
use crate::metrics::{Metrics, RouteMetrics};
use crate::runtime::{Entities, EntityTable, Projection, ProjectionHandle, Readiness};

/// Handles one route's requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Changes state; may also be sent fire-and-forget.
    Command,
    /// Reads state; request/reply only.
    Query,
}

/// Binds a route to the running services; `None` if what it needs was not started.
pub type Bind = Box<dyn Fn(&Services) -> Option<Arc<dyn Handler>> + Send + Sync>;

/// The id of the entity a command request is for, if it names one: what orders fire-and-forget
/// commands (one entity's are applied in the order they were published).
pub type EntityOf = fn(&ApiRequest) -> Option<String>;

/// A route, described without the services it will run on.
pub struct RouteSpec {
    pub kind: &'static str,
    pub verb: &'static str,
    pub mode: Mode,
    pub summary: &'static str,
    pub request_schema: fn(&mut SchemaGenerator) -> Schema,
    pub reply_schema: fn(&mut SchemaGenerator) -> Schema,
    pub bind: Bind,
    pub entity: Option<EntityOf>,
}

impl RouteSpec {
    /// Names the entity a request of this route is for.
    pub fn with_entity(mut self, entity: EntityOf) -> Self {
        self.entity = Some(entity);
        self
    }
}

/// The string field `field` of a request's body.
pub fn body_field(request: &ApiRequest, field: &str) -> Option<String> {
    request
        .body
        .get(field)
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
}

impl std::fmt::Debug for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{} ({:?})", self.kind, self.verb, self.mode)
    }
}

/// The reply to a command.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct CommandReply<R> {
    pub result: R,
    /// The entity's version after the command.
    pub version: u64,
    /// The stream sequence of the command's events; projections at or past it include them.
    pub sequence: u64,
}

/// `<kind>.get`: one entity by id.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetRequest<I> {
    pub id: I,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct GetReply<V> {
    pub result: V,
    pub version: u64,
}

/// `<kind>.list`: entities in id order, a page at a time.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListRequest<I> {
    /// Start after this id (the previous page's `next`).
    pub after: Option<I>,
    /// Page size, 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// One page of a filtered listing: at most `limit` views, and the id to continue after when
/// there are more.
pub fn page<I, V>(
    views: impl Iterator<Item = V>,
    limit: usize,
    id: impl Fn(&V) -> I,
) -> (Vec<V>, Option<I>) {
    let mut views: Vec<V> = views.take(limit + 1).collect();
    let next = if views.len() > limit {
        views.truncate(limit);
        views.last().map(id)
    } else {
        None
    };
    (views, next)
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ListReply<I, V> {
    pub result: Vec<V>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<I>,
    /// The stream sequence the read model has applied.
    pub position: u64,
}

/// The reason on `unavailable` while a read model rebuilds.
pub const CATCHING_UP: &str = "catching_up";
/// The reason on `unavailable` when a read model no longer follows the log.
pub const READ_MODEL_STOPPED: &str = "read_model_stopped";

/// Refuses to answer from a read model that has not caught up, or has stopped: its answer
/// would be a partial page or a stale one.
pub fn caught_up<P: Projection>(table: &ProjectionHandle<P>) -> Result<(), ApiError> {
    match table.readiness_now() {
        Readiness::CaughtUp => Ok(()),
        Readiness::CatchingUp => Err(ApiError::unavailable(format!(
            "the {} read model is catching up with the log; retry",
            table.name()
        ))
        .with_reason(CATCHING_UP)),
        Readiness::Stopped(why) => Err(ApiError::unavailable(format!(
            "the {} read model stopped: {why}",
            table.name()
        ))
        .with_reason(READ_MODEL_STOPPED)),
    }
}

pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

pub fn json(value: impl Serialize) -> Result<Bytes, ApiError> {
    serde_json::to_vec(&value).map(Bytes::from).map_err(|e| {
        ApiError::new(
            crate::domain::ErrorKind::Internal,
            format!("cannot encode reply: {e}"),
        )
    })
}

struct CommandRoute<C: CommandRequest> {
    entities: Entities<C::Aggregate>,
    _request: PhantomData<fn() -> C>,
}

impl<C: CommandRequest> Handler for CommandRoute<C> {
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
        let entities = self.entities.clone();
        Box::pin(async move {
            let body: C = body_as(&request)?;
            let (id, command) = body.into_command();
            let outcome = entities.execute(id, command, request.meta).await?;
            json(CommandReply {
                result: outcome.reply,
                version: outcome.version,
                sequence: outcome.seq,
            })
        })
    }
}

/// A command route for request type `C`.
pub fn command<C: CommandRequest>(summary: &'static str) -> RouteSpec {
    RouteSpec {
        kind: <C::Aggregate as Aggregate>::KIND,
        verb: C::VERB,
        mode: Mode::Command,
        summary,
        request_schema: |g| g.root_schema_for::<C>(),
        reply_schema: |g| g.root_schema_for::<CommandReply<<C::Aggregate as Aggregate>::Reply>>(),
        bind: Box::new(|services| {
            let entities = services.entities::<C::Aggregate>()?;
            Some(Arc::new(CommandRoute::<C> {
                entities,
                _request: PhantomData,
            }))
        }),
        entity: Some(|request| {
            body_as::<C>(request)
                .ok()
                .map(|body| body.into_command().0.to_string())
        }),
    }
}

struct GetRoute<A: Aggregate> {
    entities: Entities<A>,
}

impl<A: Aggregate> Handler for GetRoute<A>
where
    A::Id: serde::de::DeserializeOwned,
{
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
        let entities = self.entities.clone();
        Box::pin(async move {
            let body: GetRequest<A::Id> = body_as(&request)?;
            let id = body.id;
            match entities.read(id.clone()).await? {
                (Some(view), version) => json(GetReply {
                    result: view,
                    version,
                }),
                (None, _) => Err(ApiError::not_found(format!(
                    "{} {:?} does not exist",
                    A::KIND,
                    id.to_string()
                ))),
            }
        })
    }
}

/// `<kind>.get`, answered by the entity's actor: it reflects every command already answered.
pub fn get<A: Aggregate>(summary: &'static str) -> RouteSpec
where
    A::Id: serde::de::DeserializeOwned + JsonSchema,
{
    RouteSpec {
        kind: A::KIND,
        verb: "get",
        mode: Mode::Query,
        summary,
        request_schema: |g| g.root_schema_for::<GetRequest<A::Id>>(),
        reply_schema: |g| g.root_schema_for::<GetReply<A::View>>(),
        bind: Box::new(|services| {
            let entities = services.entities::<A>()?;
            Some(Arc::new(GetRoute::<A> { entities }))
        }),
        entity: Some(|request| body_field(request, "id")),
    }
}

struct ListRoute<A: Aggregate> {
    table: ProjectionHandle<EntityTable<A>>,
}

impl<A: Aggregate> Handler for ListRoute<A>
where
    A::Id: serde::de::DeserializeOwned + Serialize,
{
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
        let table = self.table.clone();
        Box::pin(async move {
            let body: ListRequest<A::Id> = body_as(&request)?;
            let limit = body.limit.unwrap_or(DEFAULT_PAGE);
            if !(1..=MAX_PAGE).contains(&limit) {
                return Err(ApiError::invalid(format!(
                    "limit must be 1 to {MAX_PAGE}, not {limit}"
                )));
            }
            caught_up(&table)?;
            let after = body.after;
            let (mut page, position) = table
                .ask(move |table, position| (table.list(after.as_ref(), limit + 1), position))
                .await
                .map_err(|e| {
                    ApiError::unavailable(format!("the {} read model is not running: {e}", A::KIND))
                })?;
            let next = if page.len() > limit {
                page.truncate(limit);
                page.last().map(|(id, _)| id.clone())
            } else {
                None
            };
            json(ListReply {
                result: page.into_iter().map(|(_, view)| view).collect(),
                next,
                position,
            })
        })
    }
}

/// `<kind>.list`, answered by the kind's read model: eventually consistent, with its position.
pub fn list<A: Aggregate>(summary: &'static str) -> RouteSpec
where
    A::Id: serde::de::DeserializeOwned + Serialize + JsonSchema,
{
    RouteSpec {
        kind: A::KIND,
        verb: "list",
        mode: Mode::Query,
        summary,
        request_schema: |g| g.root_schema_for::<ListRequest<A::Id>>(),
        reply_schema: |g| g.root_schema_for::<ListReply<A::Id, A::View>>(),
        bind: Box::new(|services| {
            let table = services.table::<A>()?;
            Some(Arc::new(ListRoute::<A> { table }))
        }),
        entity: None,
    }
}

/// `<kind>.acknowledge_foreign`: an operator says the foreign messages in an entity's history
/// (messages the store did not write, which every reader skips) may stay. Recorded in the log
/// with the operator as principal; they are no longer reported.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcknowledgeForeignRequest<I> {
    pub id: I,
    /// The stream sequences to acknowledge; all of the entity's foreign messages if absent.
    pub seqs: Option<Vec<u64>>,
    /// Why they may stay; 1 to 1024 characters.
    pub note: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AcknowledgeForeignReply {
    /// The sequences acknowledged by this request.
    pub acknowledged: Vec<u64>,
    /// The entity's foreign messages still unacknowledged.
    pub remaining: Vec<crate::store::provenance::ForeignMessage>,
    /// The stream sequence of the acknowledgement (of the entity's last message if none).
    pub sequence: u64,
}

/// The longest note an acknowledgement takes.
pub const MAX_NOTE: usize = 1024;

struct AcknowledgeRoute<A: Aggregate> {
    entities: Entities<A>,
}

impl<A: Aggregate> Handler for AcknowledgeRoute<A>
where
    A::Id: serde::de::DeserializeOwned,
{
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
        let entities = self.entities.clone();
        Box::pin(async move {
            let body: AcknowledgeForeignRequest<A::Id> = body_as(&request)?;
            let note = body.note.trim();
            if note.is_empty() || note.chars().count() > MAX_NOTE {
                return Err(ApiError::invalid(format!(
                    "note must say why, in 1 to {MAX_NOTE} characters"
                )));
            }
            let done = entities
                .acknowledge_foreign(body.id, body.seqs, note.to_owned(), request.meta)
                .await?;
            json(AcknowledgeForeignReply {
                acknowledged: done.acknowledged,
                remaining: done.remaining,
                sequence: done.seq,
            })
        })
    }
}

/// `<kind>.acknowledge_foreign`, run by the entity's actor.
pub fn acknowledge_foreign<A: Aggregate>() -> RouteSpec
where
    A::Id: serde::de::DeserializeOwned + JsonSchema,
{
    RouteSpec {
        kind: A::KIND,
        verb: "acknowledge_foreign",
        mode: Mode::Command,
        summary: "Acknowledge messages in an entity's history that the store did not write (operators)",
        request_schema: |g| g.root_schema_for::<AcknowledgeForeignRequest<A::Id>>(),
        reply_schema: |g| g.root_schema_for::<AcknowledgeForeignReply>(),
        bind: Box::new(|services| {
            let entities = services.entities::<A>()?;
            Some(Arc::new(AcknowledgeRoute::<A> { entities }))
        }),
        entity: Some(|request| body_field(request, "id")),
    }
}

/// A route served by `run`, for requests that are more than one command to one entity
/// (a reservation across a pod and a meeting point) or queries with their own shape.
pub fn custom<Req: JsonSchema, Rep: JsonSchema, S: Clone + Send + Sync + 'static>(
    kind: &'static str,
    verb: &'static str,
    mode: Mode,
    summary: &'static str,
    state: fn(&Services) -> Option<S>,
    run: fn(S, ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>>,
) -> RouteSpec {
    RouteSpec {
        kind,
        verb,
        mode,
        summary,
        request_schema: |g| g.root_schema_for::<Req>(),
        reply_schema: |g| g.root_schema_for::<Rep>(),
        bind: Box::new(move |services| {
            Some(Arc::new(CustomRoute {
                state: state(services)?,
                run,
            }))
        }),
        entity: None,
    }
}

struct CustomRoute<S> {
    state: S,
    run: fn(S, ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>>,
}

impl<S: Clone + Send + Sync + 'static> Handler for CustomRoute<S> {
    fn handle(&self, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
        (self.run)(self.state.clone(), request)
    }
}

/// Routes whose capability did not start what they are bound to.
#[derive(Debug, thiserror::Error)]
#[error("routes bound to nothing that was started: {}", .0.join(", "))]
pub struct UnboundRoutes(pub Vec<String>);

/// One bound route.
pub struct Route {
    pub mode: Mode,
    pub handler: Arc<dyn Handler>,
    pub metrics: RouteMetrics,
    pub entity: Option<EntityOf>,
}

/// Every route, bound to running services: what the API server and the work queue dispatch to.
pub struct Router {
    /// By `<kind>.<verb>`.
    routes: HashMap<String, Route>,
    /// Requests to routes that do not exist share one label set, so arbitrary subjects cannot
    /// grow the metrics without bound.
    unknown: RouteMetrics,
}

impl Router {
    /// Binds every route; fails (naming them) if a route needs something no capability
    /// started, which is a wiring mistake, found at start-up rather than at a request.
    pub fn new(
        specs: &[RouteSpec],
        services: &Services,
        metrics: &Metrics,
    ) -> Result<Self, UnboundRoutes> {
        let mut routes = HashMap::new();
        let mut unbound = Vec::new();
        for spec in specs {
            let name = format!("{}.{}", spec.kind, spec.verb);
            match (spec.bind)(services) {
                Some(handler) => {
                    let route = Route {
                        mode: spec.mode,
                        handler,
                        metrics: metrics.route(spec.kind, spec.verb),
                        entity: spec.entity,
                    };
                    routes.insert(name, route);
                }
                None => unbound.push(name),
            }
        }
        if !unbound.is_empty() {
            return Err(UnboundRoutes(unbound));
        }
        Ok(Self {
            routes,
            unknown: metrics.route("unknown", "unknown"),
        })
    }

    /// The route `<kind>.<verb>`, or a `not_found` that lists what exists.
    pub fn route(&self, kind: &str, verb: &str) -> Result<&Route, ApiError> {
        let key = format!("{kind}.{verb}");
        if let Some(route) = self.routes.get(&key) {
            return Ok(route);
        }
        let mut verbs: Vec<&str> = self
            .routes
            .keys()
            .filter_map(|k| k.split_once('.'))
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| v)
            .collect();
        verbs.sort_unstable();
        if verbs.is_empty() {
            let kinds: BTreeSet<&str> = self
                .routes
                .keys()
                .filter_map(|k| k.split_once('.'))
                .map(|(k, _)| k)
                .collect();
            Err(ApiError::not_found(format!(
                "unknown kind {kind:?}; known kinds: {}",
                kinds.into_iter().collect::<Vec<_>>().join(", ")
            )))
        } else {
            Err(ApiError::not_found(format!(
                "unknown verb {verb:?} for {kind}; known verbs: {}",
                verbs.join(", ")
            )))
        }
    }

    /// Where a request to `<kind>.<verb>` is counted.
    pub fn metrics(&self, kind: &str, verb: &str) -> &RouteMetrics {
        self.routes
            .get(&format!("{kind}.{verb}"))
            .map_or(&self.unknown, |r| &r.metrics)
    }
}
