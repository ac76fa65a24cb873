//! The registry: one per entity kind. It activates an entity actor on the first request for its
//! id, routes requests to it, refuses them with `unavailable` when its queue is full (never
//! dropping one), and passivates actors that have been idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::Span;

use super::entity::{EntityActor, Work};
use super::{CommandError, CommandMeta, Outcome, Settings};
use crate::cluster::Route as Route_;
use crate::domain::{Aggregate, EntityId};
use crate::metrics::{EntityMetrics, Metrics};
use crate::store::EventStore;

struct Slot<A: Aggregate> {
    addr: Addr<EntityActor<A>>,
    /// The fencing token of the shard lease it was activated under.
    token: u64,
    pending: Arc<AtomicUsize>,
    last_used: Instant,
}

pub struct Registry<A: Aggregate> {
    store: EventStore,
    settings: Arc<Settings>,
    metrics: Arc<EntityMetrics>,
    actors: HashMap<A::Id, Slot<A>>,
    /// Passivated actors that may still be finishing (a snapshot); forgotten once stopped.
    stopping: Vec<Addr<EntityActor<A>>>,
}

impl<A: Aggregate> Registry<A> {
    pub fn new(store: EventStore, settings: Arc<Settings>, metrics: Metrics) -> Self {
        Self {
            store,
            settings,
            metrics: Arc::new(metrics.entity(A::KIND)),
            actors: HashMap::new(),
            stopping: Vec::new(),
        }
    }

    fn activate(&self, id: &A::Id, token: u64) -> Slot<A> {
        let pending = Arc::new(AtomicUsize::new(0));
        let actor = EntityActor::<A>::new(
            id.clone(),
            token,
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            pending.clone(),
        );
        Slot {
            addr: actor.start(),
            token,
            pending,
            last_used: Instant::now(),
        }
    }

    /// Stops actors idle for at least `idle`, and idle ones of shards this replica no longer
    /// serves under their token; they snapshot on the way out. Returns how many.
    fn passivate(&mut self, idle: Duration) -> usize {
        self.stopping.retain(Addr::connected);
        let before = self.actors.len();
        let stopping = &mut self.stopping;
        let ownership = &self.settings.ownership;
        self.actors.retain(|id, slot| {
            let busy = slot.pending.load(Ordering::Acquire) > 0;
            let held = ownership.holds(ownership.shard_of(A::KIND, id.as_str()), slot.token);
            let keep = busy || (held && slot.last_used.elapsed() < idle);
            if !keep {
                // Queued behind nothing: no request reaches it once it is out of the map.
                slot.addr.do_send(Work::Passivate);
                stopping.push(slot.addr.clone());
            }
            keep
        });
        before - self.actors.len()
    }
}

impl<A: Aggregate> Actor for Registry<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.settings.passivate_after / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(30));
        ctx.run_interval(every, |registry, _| {
            registry.passivate(registry.settings.passivate_after);
        });
    }
}

/// Routes one request to its entity.
pub struct Route<A: Aggregate> {
    pub id: A::Id,
    /// The shard lease this replica serves the entity under.
    pub token: u64,
    pub work: Work<A>,
}

impl<A: Aggregate> Message for Route<A> {
    type Result = ();
}

impl<A: Aggregate> Handler<Route<A>> for Registry<A> {
    type Result = ();

    fn handle(&mut self, route: Route<A>, _: &mut Context<Self>) {
        let Route { id, token, work } = route;
        // An actor of an earlier lease of the shard may hold state another owner has since
        // moved past: start afresh from the log.
        if let Some(stale) = self.actors.get(&id).filter(|slot| slot.token != token) {
            stale.addr.do_send(Work::Passivate);
            self.stopping.push(stale.addr.clone());
            self.actors.remove(&id);
        }
        if !self.actors.contains_key(&id) {
            let slot = self.activate(&id, token);
            self.actors.insert(id.clone(), slot);
        }
        let Some(slot) = self.actors.get_mut(&id) else {
            return;
        };
        let queued = slot.pending.load(Ordering::Acquire);
        if queued >= self.settings.mailbox_capacity {
            work.fail(CommandError::Busy {
                kind: A::KIND,
                id: id.to_string(),
                queued,
            });
            return;
        }
        slot.pending.fetch_add(1, Ordering::AcqRel);
        slot.last_used = Instant::now();
        if let Err(SendError::Closed(work) | SendError::Full(work)) =
            slot.addr.try_send_unbounded(work)
        {
            // The actor died (a panic in a handler); start a fresh one from the log.
            let fresh = self.activate(&id, token);
            fresh.pending.fetch_add(1, Ordering::AcqRel);
            if let Err(SendError::Closed(work) | SendError::Full(work)) =
                fresh.addr.try_send_unbounded(work)
            {
                work.fail(CommandError::Dropped {
                    kind: A::KIND,
                    id: id.to_string(),
                });
            }
            self.actors.insert(id, fresh);
        }
    }
}

/// How many entity actors are in memory, including passivated ones still stopping.
pub struct ActiveCount;

impl Message for ActiveCount {
    type Result = usize;
}

impl<A: Aggregate> Handler<ActiveCount> for Registry<A> {
    type Result = usize;

    fn handle(&mut self, _: ActiveCount, _: &mut Context<Self>) -> usize {
        self.stopping.retain(Addr::connected);
        self.actors.len() + self.stopping.len()
    }
}

/// Passivates every actor idle for at least this long, now rather than at the next sweep.
pub struct PassivateIdle(pub Duration);

impl Message for PassivateIdle {
    type Result = usize;
}

impl<A: Aggregate> Handler<PassivateIdle> for Registry<A> {
    type Result = usize;

    fn handle(&mut self, PassivateIdle(idle): PassivateIdle, _: &mut Context<Self>) -> usize {
        self.passivate(idle)
    }
}

/// Passivates every actor (they snapshot on the way out) and stops the registry; returns the
/// actors so the caller can wait for them to finish.
pub struct Drain<A: Aggregate>(std::marker::PhantomData<fn() -> A>);

impl<A: Aggregate> Message for Drain<A> {
    type Result = Vec<Addr<EntityActor<A>>>;
}

impl<A: Aggregate> Handler<Drain<A>> for Registry<A> {
    type Result = MessageResult<Drain<A>>;

    fn handle(&mut self, _: Drain<A>, ctx: &mut Context<Self>) -> Self::Result {
        let mut actors: Vec<_> = self.actors.drain().map(|(_, slot)| slot.addr).collect();
        for addr in &actors {
            addr.do_send(Work::Passivate);
        }
        actors.append(&mut self.stopping);
        ctx.stop();
        MessageResult(actors)
    }
}

/// `do_send` that hands the message back instead of losing it when the actor is gone.
trait SendBack<M: Message> {
    fn try_send_unbounded(&self, msg: M) -> Result<(), SendError<M>>;
}

impl<A: Aggregate> SendBack<Work<A>> for Addr<EntityActor<A>> {
    fn try_send_unbounded(&self, work: Work<A>) -> Result<(), SendError<Work<A>>> {
        // Capacity is enforced by the registry's own count, so the mailbox itself is unbounded;
        // `connected` is false only once the actor has stopped.
        if self.connected() {
            self.do_send(work);
            Ok(())
        } else {
            Err(SendError::Closed(work))
        }
    }
}

/// The handle callers use to reach entities of one kind; cheap to clone, usable from any task.
/// It routes by shard: to this replica's actor when it owns the entity's shard, to the owning
/// replica otherwise, and (for reads) to the log while nobody owns it.
pub struct Entities<A: Aggregate> {
    registry: Addr<Registry<A>>,
    store: EventStore,
    settings: Arc<Settings>,
    metrics: Metrics,
}

impl<A: Aggregate> Clone for Entities<A> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
            store: self.store.clone(),
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Where one request for an entity goes.
enum Target {
    Here(u64),
    Peer(String),
    Nobody(u32),
}

impl<A: Aggregate> Entities<A> {
    /// Starts the registry on the current arbiter.
    pub fn start(store: EventStore, settings: Arc<Settings>, metrics: Metrics) -> Self {
        Self {
            registry: Registry::<A>::new(store.clone(), settings.clone(), metrics.clone()).start(),
            store,
            settings,
            metrics,
        }
    }

    /// Whether this replica owns the entity's shard now (reapers and reconcilers act only
    /// on those).
    pub fn owns(&self, id: &A::Id) -> bool {
        self.ownership().owns_entity(A::KIND, id.as_str())
    }

    fn ownership(&self) -> &crate::cluster::Ownership {
        &self.settings.ownership
    }

    /// Where a command goes: waits (up to a lease TTL) while nobody owns the shard.
    async fn target(&self, id: &A::Id) -> Target {
        let shard = self.ownership().shard_of(A::KIND, id.as_str());
        Self::to_target(self.ownership().resolve(shard).await, shard)
    }

    /// Where a read goes: it does not wait for an owner, since the log answers it meanwhile.
    fn read_target(&self, id: &A::Id) -> Target {
        let shard = self.ownership().shard_of(A::KIND, id.as_str());
        Self::to_target(self.ownership().route(shard), shard)
    }

    fn to_target(route: Route_, shard: u32) -> Target {
        match route {
            Route_::Local { token } => Target::Here(token),
            Route_::Remote { replica } => Target::Peer(replica),
            Route_::Unowned => Target::Nobody(shard),
        }
    }

    /// A replica nobody answers for is not alive, whatever its presence says.
    fn suspect(&self, err: &CommandError) {
        if let CommandError::Unreachable { replica, .. } = err {
            self.ownership().suspect(replica);
        }
    }

    fn peer<'a>(&'a self, replica: &'a str, id: &'a str) -> super::remote::Peer<'a> {
        self.metrics
            .forwarded
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: "entity".to_owned(),
            })
            .inc();
        super::remote::Peer {
            client: self.store.client(),
            subject: self.store.subjects().replica_entity(replica, A::KIND),
            replica,
            kind: A::KIND,
            id,
        }
    }

    /// Runs one command on its entity, in the current span's trace, wherever it is owned. If
    /// the shard moves while the request is on its way, it looks again once.
    pub async fn execute(
        &self,
        id: A::Id,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Outcome<A::Reply>, CommandError> {
        let mut looked_again = false;
        loop {
            let result = match self.target(&id).await {
                Target::Here(token) => {
                    self.local_execute(id.clone(), command.clone(), meta.clone(), token)
                        .await
                }
                Target::Peer(replica) => {
                    self.peer(&replica, id.as_str())
                        .execute::<A>(&command, &meta)
                        .await
                }
                Target::Nobody(shard) => Err(CommandError::NoOwner {
                    kind: A::KIND,
                    id: id.to_string(),
                    shard,
                }),
            };
            match result {
                Err(err) if moved(&err) && !looked_again => {
                    self.suspect(&err);
                    looked_again = true;
                }
                other => return other,
            }
        }
    }

    /// Runs a command only if this replica owns the entity's shard: what another replica's
    /// forwarded request gets.
    pub async fn execute_here(
        &self,
        id: A::Id,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Outcome<A::Reply>, CommandError> {
        let token = self.here(&id)?;
        self.local_execute(id, command, meta, token).await
    }

    fn here(&self, id: &A::Id) -> Result<u64, CommandError> {
        let shard = self.ownership().shard_of(A::KIND, id.as_str());
        match self.ownership().route(shard) {
            Route_::Local { token } => Ok(token),
            _ => Err(CommandError::NotOwner {
                kind: A::KIND,
                id: id.to_string(),
            }),
        }
    }

    async fn local_execute(
        &self,
        id: A::Id,
        command: A::Command,
        meta: CommandMeta,
        token: u64,
    ) -> Result<Outcome<A::Reply>, CommandError> {
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
            token,
            work: Work::Execute {
                command,
                meta,
                span: Span::current(),
                reply,
            },
        });
        answer.await.unwrap_or(Err(CommandError::Dropped {
            kind: A::KIND,
            id: kind_id,
        }))
    }

    /// The entity's current view (`None` if it does not exist) and version. From its owner's
    /// actor, which has every acknowledged command; while nobody owns the shard, from the log.
    pub async fn read(&self, id: A::Id) -> Result<(Option<A::View>, u64), CommandError> {
        let mut looked_again = false;
        loop {
            let result = match self.read_target(&id) {
                Target::Here(token) => self.local_read(id.clone(), token).await,
                Target::Peer(replica) => self.peer(&replica, id.as_str()).read::<A>().await,
                Target::Nobody(_) => self.read_log(&id).await,
            };
            match result {
                Err(err) if moved(&err) && !looked_again => {
                    self.suspect(&err);
                    looked_again = true;
                }
                other => return other,
            }
        }
    }

    /// The entity's whole state and version, from this replica's actor: for the reactions of
    /// the shard's owner. `shard_moved` if this replica does not own it.
    pub async fn inspect_here(&self, id: A::Id) -> Result<(A, u64), CommandError> {
        let token = self.here(&id)?;
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
            token,
            work: Work::Inspect { reply },
        });
        answer.await.unwrap_or(Err(CommandError::Dropped {
            kind: A::KIND,
            id: kind_id,
        }))
    }

    /// A read for another replica: here if this replica owns the shard, else `shard_moved`.
    pub async fn read_here(&self, id: A::Id) -> Result<(Option<A::View>, u64), CommandError> {
        let token = self.here(&id)?;
        self.local_read(id, token).await
    }

    async fn read_log(&self, id: &A::Id) -> Result<(Option<A::View>, u64), CommandError> {
        let entity = self.store.load::<A>(id).await?;
        Ok((entity.state.view(id), entity.version))
    }

    async fn local_read(
        &self,
        id: A::Id,
        token: u64,
    ) -> Result<(Option<A::View>, u64), CommandError> {
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
            token,
            work: Work::Read { reply },
        });
        answer.await.unwrap_or(Err(CommandError::Dropped {
            kind: A::KIND,
            id: kind_id,
        }))
    }

    /// Acknowledges foreign messages in the entity's history (all when `seqs` is `None`).
    pub async fn acknowledge_foreign(
        &self,
        id: A::Id,
        seqs: Option<Vec<u64>>,
        note: String,
        meta: CommandMeta,
    ) -> Result<super::entity::Acknowledged, CommandError> {
        let mut looked_again = false;
        loop {
            let result = match self.target(&id).await {
                Target::Here(token) => {
                    self.local_acknowledge(
                        id.clone(),
                        seqs.clone(),
                        note.clone(),
                        meta.clone(),
                        token,
                    )
                    .await
                }
                Target::Peer(replica) => {
                    self.peer(&replica, id.as_str())
                        .acknowledge(seqs.clone(), note.clone(), &meta)
                        .await
                }
                Target::Nobody(shard) => Err(CommandError::NoOwner {
                    kind: A::KIND,
                    id: id.to_string(),
                    shard,
                }),
            };
            match result {
                Err(err) if moved(&err) && !looked_again => {
                    self.suspect(&err);
                    looked_again = true;
                }
                other => return other,
            }
        }
    }

    /// An acknowledgement for another replica: here if this replica owns the shard.
    pub async fn acknowledge_here(
        &self,
        id: A::Id,
        seqs: Option<Vec<u64>>,
        note: String,
        meta: CommandMeta,
    ) -> Result<super::entity::Acknowledged, CommandError> {
        let token = self.here(&id)?;
        self.local_acknowledge(id, seqs, note, meta, token).await
    }

    async fn local_acknowledge(
        &self,
        id: A::Id,
        seqs: Option<Vec<u64>>,
        note: String,
        meta: CommandMeta,
        token: u64,
    ) -> Result<super::entity::Acknowledged, CommandError> {
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
            token,
            work: Work::Acknowledge {
                seqs,
                note,
                meta,
                reply,
            },
        });
        answer.await.unwrap_or(Err(CommandError::Dropped {
            kind: A::KIND,
            id: kind_id,
        }))
    }

    /// How many actors of this kind are in memory.
    pub async fn active(&self) -> usize {
        self.registry.send(ActiveCount).await.unwrap_or(0)
    }

    /// Stops every actor of this kind after the requests it holds, snapshotting each, and waits
    /// for them for at most `grace`. Requests sent afterwards get `unavailable`.
    pub async fn shutdown(&self, grace: Duration) {
        let Ok(actors) = self
            .registry
            .send(Drain::<A>(std::marker::PhantomData))
            .await
        else {
            return;
        };
        let deadline = Instant::now() + grace;
        while actors.iter().any(Addr::connected) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Passivates the actors idle for at least `idle` now; returns how many were asked to stop.
    pub async fn passivate_idle(&self, idle: Duration) -> usize {
        self.registry.send(PassivateIdle(idle)).await.unwrap_or(0)
    }
}

/// Whether a request should look for the entity's owner again: the shard moved under it.
fn moved(err: &CommandError) -> bool {
    match err {
        CommandError::NotOwner { .. } => true,
        CommandError::Remote { reason, .. } => *reason == Some(crate::cluster::SHARD_MOVED),
        // Nobody listens where the owner should be: it died, and its lease has not lapsed yet.
        CommandError::Unreachable { definite, .. } => *definite,
        _ => false,
    }
}
