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
use crate::domain::Aggregate;
use crate::metrics::{EntityMetrics, Metrics};
use crate::store::EventStore;

struct Slot<A: Aggregate> {
    addr: Addr<EntityActor<A>>,
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

    fn activate(&self, id: &A::Id) -> Slot<A> {
        let pending = Arc::new(AtomicUsize::new(0));
        let actor = EntityActor::<A>::new(
            id.clone(),
            self.store.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            pending.clone(),
        );
        Slot {
            addr: actor.start(),
            pending,
            last_used: Instant::now(),
        }
    }

    /// Stops actors idle for at least `idle`; they snapshot on the way out. Returns how many.
    fn passivate(&mut self, idle: Duration) -> usize {
        self.stopping.retain(Addr::connected);
        let before = self.actors.len();
        let stopping = &mut self.stopping;
        self.actors.retain(|_, slot| {
            let keep = slot.pending.load(Ordering::Acquire) > 0 || slot.last_used.elapsed() < idle;
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
    pub work: Work<A>,
}

impl<A: Aggregate> Message for Route<A> {
    type Result = ();
}

impl<A: Aggregate> Handler<Route<A>> for Registry<A> {
    type Result = ();

    fn handle(&mut self, route: Route<A>, _: &mut Context<Self>) {
        let Route { id, work } = route;
        if !self.actors.contains_key(&id) {
            let slot = self.activate(&id);
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
            let fresh = self.activate(&id);
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
pub struct Entities<A: Aggregate> {
    registry: Addr<Registry<A>>,
}

impl<A: Aggregate> Clone for Entities<A> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<A: Aggregate> Entities<A> {
    /// Starts the registry on the current arbiter.
    pub fn start(store: EventStore, settings: Arc<Settings>, metrics: Metrics) -> Self {
        Self {
            registry: Registry::<A>::new(store, settings, metrics).start(),
        }
    }

    /// Runs one command on its entity, in the current span's trace.
    pub async fn execute(
        &self,
        id: A::Id,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<Outcome<A::Reply>, CommandError> {
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
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

    /// The entity's current view (`None` if it does not exist) and version, read from its actor:
    /// it reflects every command answered before.
    pub async fn read(&self, id: A::Id) -> Result<(Option<A::View>, u64), CommandError> {
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
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
        let (reply, answer) = oneshot::channel();
        let kind_id = id.to_string();
        self.registry.do_send(Route {
            id,
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
