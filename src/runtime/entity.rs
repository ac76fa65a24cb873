//! The entity actor: owns one entity's state and handles its requests one at a time.
//!
//! The actor is a mailbox and an owner, nothing more; the steps of a command are the plain
//! async function [`execute`], which takes the state by `&mut` for the duration of the command.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{Instrument, Span};

use super::{CommandError, CommandMeta, Outcome, Settings};
use crate::domain::{Aggregate, Context as DomainContext, EntityId};
use crate::metrics::EntityMetrics;
use crate::store::provenance::{AcknowledgedForeign, ForeignMessage, Record};
use crate::store::{Appended, Commit, Entity, EventStore, RecordCommit, StoreError};

pub type Reply<T> = oneshot::Sender<Result<T, CommandError>>;

/// Events since the last snapshot that make a passivating actor write one.
const PASSIVATION_SNAPSHOT_AFTER: u64 = 16;

/// A request to one entity.
pub enum Work<A: Aggregate> {
    Execute {
        command: A::Command,
        meta: CommandMeta,
        span: Span,
        reply: Reply<Outcome<A::Reply>>,
    },
    Read {
        reply: Reply<(Option<A::View>, u64)>,
    },
    /// The whole state, for this replica's own reactions (never sent to another replica).
    Inspect { reply: Reply<(A, u64)> },
    /// An operator acknowledges foreign messages in the entity's history (all of them when
    /// `seqs` is `None`): recorded in the log, and no longer reported.
    Acknowledge {
        seqs: Option<Vec<u64>>,
        note: String,
        meta: CommandMeta,
        reply: Reply<Acknowledged>,
    },
    /// Sent by the registry once it has forgotten this actor: snapshot if useful, then stop.
    Passivate,
}

impl<A: Aggregate> Message for Work<A> {
    type Result = ();
}

impl<A: Aggregate> Work<A> {
    /// Answers the request with `err` without running it.
    pub fn fail(self, err: CommandError) {
        match self {
            Work::Execute { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Work::Read { reply } => {
                let _ = reply.send(Err(err));
            }
            Work::Inspect { reply } => {
                let _ = reply.send(Err(err));
            }
            Work::Acknowledge { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Work::Passivate => {}
        }
    }
}

pub struct EntityActor<A: Aggregate> {
    id: A::Id,
    /// The shard lease it serves under: it answers nothing once this replica no longer holds
    /// it, and every commit it makes carries it.
    fence: (u32, u64),
    store: EventStore,
    settings: Arc<Settings>,
    metrics: Arc<EntityMetrics>,
    /// `None` until loaded, and again after a failure that leaves the state in doubt.
    entity: Option<Entity<A>>,
    /// Requests routed here and not yet finished; shared with the registry, which refuses new
    /// ones beyond the mailbox capacity.
    pending: Arc<AtomicUsize>,
}

impl<A: Aggregate> EntityActor<A> {
    pub fn new(
        id: A::Id,
        token: u64,
        store: EventStore,
        settings: Arc<Settings>,
        metrics: Arc<EntityMetrics>,
        pending: Arc<AtomicUsize>,
    ) -> Self {
        let shard = settings.ownership.shard_of(A::KIND, id.as_str());
        Self {
            id,
            fence: (shard, token),
            store,
            settings,
            metrics,
            entity: None,
            pending,
        }
    }
}

impl<A: Aggregate> Actor for EntityActor<A> {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.metrics.activations.inc();
        self.metrics.active.inc();
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.metrics.active.dec();
    }
}

impl<A: Aggregate> Handler<Work<A>> for EntityActor<A> {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, work: Work<A>, _: &mut Context<Self>) -> Self::Result {
        let (shard, token) = self.fence;
        if !matches!(work, Work::Passivate) && !self.settings.ownership.holds(shard, token) {
            // The shard moved: whatever this actor knows may be behind its new owner. Every
            // request queued here gets the same answer, which sends it to the new owner; the
            // registry passivates the actor once none is left. (Stopping here would drop the
            // queued ones unanswered, and an unanswered command may or may not have run.)
            work.fail(CommandError::NotOwner {
                kind: A::KIND,
                id: self.id.to_string(),
            });
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.entity = None;
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let fence = self.fence;
        let mut entity = self.entity.take();
        let store = self.store.clone();
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        let id = self.id.clone();
        let passivate = matches!(work, Work::Passivate);
        let job = async move {
            match work {
                Work::Execute {
                    command,
                    meta,
                    span,
                    reply,
                } => {
                    let span = tracing::debug_span!(parent: &span, "entity.execute", kind = A::KIND, id = %id, command_id = %meta.command_id);
                    let result = execute(
                        &store,
                        &settings,
                        &metrics,
                        &mut entity,
                        &id,
                        fence,
                        &command,
                        &meta,
                    )
                    .instrument(span.clone())
                    .await;
                    let _ = reply.send(result);
                    // After replying, so the caller does not wait for it.
                    if let Some(loaded) = entity.as_mut()
                        && loaded.snapshot_due(settings.snapshot_every)
                    {
                        store.save_snapshot(loaded).instrument(span).await;
                    }
                }
                Work::Read { reply } => {
                    let result = load(&store, &mut entity, &id)
                        .await
                        .map(|loaded| (loaded.state.view(&id), loaded.version));
                    let _ = reply.send(result);
                }
                Work::Inspect { reply } => {
                    let result = load(&store, &mut entity, &id)
                        .await
                        .map(|loaded| (loaded.state.clone(), loaded.version));
                    let _ = reply.send(result);
                }
                Work::Acknowledge {
                    seqs,
                    note,
                    meta,
                    reply,
                } => {
                    let result = acknowledge(
                        &store,
                        &settings,
                        &mut entity,
                        &id,
                        fence,
                        seqs.as_deref(),
                        &note,
                        &meta,
                    )
                    .await;
                    let _ = reply.send(result);
                }
                Work::Passivate => {
                    // Snapshot on the way out only when the tail is long enough to be worth
                    // skipping at the next activation; a handful of events replays faster than a
                    // KV round trip is written.
                    if let Some(loaded) = entity.as_mut()
                        && settings.snapshot_every > 0
                        && loaded
                            .snapshot_due(PASSIVATION_SNAPSHOT_AFTER.min(settings.snapshot_every))
                    {
                        store.save_snapshot(loaded).await;
                    }
                }
            }
            entity
        };
        AtomicResponse::new(Box::pin(job.into_actor(self).map(
            move |entity, act, ctx| {
                act.entity = entity;
                if passivate {
                    act.metrics.passivations.inc();
                    ctx.stop();
                } else {
                    act.pending.fetch_sub(1, Ordering::AcqRel);
                }
            },
        )))
    }
}

async fn load<'a, A: Aggregate>(
    store: &EventStore,
    slot: &'a mut Option<Entity<A>>,
    id: &A::Id,
) -> Result<&'a mut Entity<A>, CommandError> {
    if slot.is_none() {
        *slot = Some(store.load::<A>(id).await?);
    }
    // Just filled above when empty.
    slot.as_mut().ok_or(CommandError::Dropped {
        kind: A::KIND,
        id: id.to_string(),
    })
}

/// One command, whole: load if needed, answer a retry with its first reply, decide, append with
/// the expected sequence, fold the events in only after the ack, reply. A conflict reloads the
/// tail and decides again, a bounded number of times.
#[allow(clippy::too_many_arguments)] // the command's whole context, passed by reference
pub async fn execute<A: Aggregate>(
    store: &EventStore,
    settings: &Settings,
    metrics: &EntityMetrics,
    slot: &mut Option<Entity<A>>,
    id: &A::Id,
    (shard, token): (u32, u64),
    command: &A::Command,
    meta: &CommandMeta,
) -> Result<Outcome<A::Reply>, CommandError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let entity = load(store, slot, id).await?;
        let seen = match entity.recent_seq(&meta.command_id) {
            Some(seq) => Some(seq),
            None => seen_before(store, metrics, entity, meta).await?,
        };
        if let Some(seq) = seen
            && let Some(outcome) = first_reply::<A>(store, id, seq, command, meta).await?
        {
            return Ok(outcome);
        }
        let now = (settings.clock)();
        let events = entity
            .state
            .decide(id, command, &DomainContext { now })
            .map_err(|rejection| CommandError::rejected(&rejection))?;
        if events.is_empty() {
            return Ok(Outcome {
                reply: entity.state.reply(id, command),
                version: entity.version,
                seq: entity.last_seq,
            });
        }
        let version = entity.version + events.len() as u64;
        // Held through the append: the shard is not handed over with a commit in flight.
        let Some(_fence) = settings.ownership.fence(shard, token).await else {
            return Err(CommandError::NotOwner {
                kind: A::KIND,
                id: id.to_string(),
            });
        };
        let appended = store
            .append(Commit {
                fence: Some(crate::cluster::Fence {
                    shard,
                    token,
                    replica: settings.ownership.replica(),
                }),
                kind: A::KIND,
                entity: id.as_str(),
                expected: entity.last_seq,
                entity_version: version,
                command_id: &meta.command_id,
                principal: &meta.principal,
                digest: meta.digest.as_deref(),
                generated_id: meta.fresh,
                recorded_at: now,
                events: &events,
            })
            .await;
        match appended {
            Ok(Appended {
                seq,
                duplicate: false,
            }) => {
                metrics.appended.inc();
                entity.record(seq, &meta.command_id, &events);
                return Ok(Outcome {
                    reply: entity.state.reply(id, command),
                    version,
                    seq,
                });
            }
            Ok(Appended {
                seq,
                duplicate: true,
            }) => {
                // Stored by an earlier attempt this copy never saw: catch up, answer as then.
                metrics.duplicates.inc();
                store.catch_up(entity).await?;
                if let Some(outcome) = first_reply::<A>(store, id, seq, command, meta).await? {
                    return Ok(outcome);
                }
            }
            Err(StoreError::Conflict { .. }) => {
                metrics.conflicts.inc();
                // Someone else wrote: catch up whether or not this command tries again, so
                // the next one does not start from the same stale state. A stale read (a
                // lagging replica) shows nothing new: reload from scratch.
                if store.catch_up(entity).await? == 0 {
                    *slot = None;
                }
                if attempts > settings.conflict_retries {
                    return Err(CommandError::Contended {
                        kind: A::KIND,
                        id: id.to_string(),
                        attempts,
                    });
                }
            }
            Err(err) => {
                metrics.append_errors.inc();
                // The commit may or may not be stored: forget the state and reload it before
                // the next command, which finds this one among the recent if it was stored.
                *slot = None;
                return Err(err.into());
            }
        }
    }
}

/// Where a command the entity no longer remembers was stored, if it was, within the
/// idempotency window: the command index, and the entity's own messages the index has not
/// reached yet. Skipped for a fresh id (none can have used it) and for an entity that remembers
/// every command it ever had.
async fn seen_before<A: Aggregate>(
    store: &EventStore,
    metrics: &EntityMetrics,
    entity: &Entity<A>,
    meta: &CommandMeta,
) -> Result<Option<u64>, CommandError> {
    if meta.fresh || entity.remembers_every_command() {
        return Ok(None);
    }
    let index = store.command_index();
    let subject = store.subjects().event(A::KIND, entity.id.as_str());
    // Read the position first: whatever the lookup misses is past it.
    let indexed = index.position();
    if let Some(seq) = index.lookup(&meta.command_id, &subject).await? {
        metrics.index_found.inc();
        return Ok(Some(seq));
    }
    let found = if indexed >= entity.last_seq || entity.remembers_since(indexed + 1) {
        None
    } else {
        store
            .read_subject(&subject, indexed + 1, Some(entity.last_seq))
            .await?
            .iter()
            .find(|message| message.command_id() == Some(meta.command_id.as_str()))
            .map(|message| message.seq)
    };
    match found {
        Some(_) => metrics.index_found.inc(),
        None => metrics.index_missing.inc(),
    };
    Ok(found)
}

/// The reply the command got when it was stored at `seq`: the entity is rebuilt as it was right
/// after that message. `None` if the message there is not this command's commit on this entity
/// (a hash collision in the recent-command list, or a foreign message bearing its id); a
/// conflict if it is, but the command then said something else: the id was reused.
async fn first_reply<A: Aggregate>(
    store: &EventStore,
    id: &A::Id,
    seq: u64,
    command: &A::Command,
    meta: &CommandMeta,
) -> Result<Option<Outcome<A::Reply>>, CommandError> {
    let message = store.message(seq).await?;
    if message.command_id() != Some(meta.command_id.as_str())
        || message.subject != store.subjects().event(A::KIND, id.as_str())
        || !matches!(
            crate::store::provenance::classify::<A::Event>(A::KIND, &message),
            crate::store::provenance::Provenance::Commit { .. }
        )
    {
        return Ok(None);
    }
    if let (Some(then), Some(now)) = (
        message.header(crate::codec::header::COMMAND_DIGEST),
        &meta.digest,
    ) && then != now
    {
        return Err(CommandError::Rejected {
            kind: crate::domain::ErrorKind::Conflict,
            message: format!(
                "command id {} was used at sequence {seq} for a different {} command; a retry must repeat the request unchanged, and a new command needs a new id",
                meta.command_id,
                A::KIND
            ),
            reason: Some(crate::domain::COMMAND_ID_REUSED),
        });
    }
    let then = store.load_as_of::<A>(id, seq).await?;
    tracing::debug!(seq, "command seen before; answering with its first reply");
    Ok(Some(Outcome {
        reply: then.state.reply(id, command),
        version: then.version,
        seq,
    }))
}

/// What an acknowledgement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledged {
    /// The foreign messages acknowledged now (none if there were none to acknowledge).
    pub acknowledged: Vec<u64>,
    /// Those still unacknowledged.
    pub remaining: Vec<ForeignMessage>,
    /// The record's stream sequence (or the entity's last message's, if nothing was written).
    pub seq: u64,
}

/// Records an operator's acknowledgement of foreign messages in the entity's history, with the
/// same optimistic concurrency as a command. A sequence that is not a foreign message of this
/// entity is refused; a retry (same command id) is answered with what its record says.
#[allow(clippy::too_many_arguments)] // the request's whole context, passed by reference
async fn acknowledge<A: Aggregate>(
    store: &EventStore,
    settings: &Settings,
    slot: &mut Option<Entity<A>>,
    id: &A::Id,
    (shard, token): (u32, u64),
    seqs: Option<&[u64]>,
    note: &str,
    meta: &CommandMeta,
) -> Result<Acknowledged, CommandError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let entity = load(store, slot, id).await?;
        if let Some(seq) = entity.recent_seq(&meta.command_id) {
            let message = store.message(seq).await?;
            if message.command_id() == Some(meta.command_id.as_str())
                && let Some(acknowledged) = crate::store::provenance::acknowledged(&message)
            {
                return Ok(Acknowledged {
                    acknowledged,
                    remaining: entity.foreign().to_vec(),
                    seq,
                });
            }
        }
        let foreign: Vec<u64> = entity.foreign().iter().map(|f| f.seq).collect();
        let wanted = match seqs {
            None => foreign,
            Some(seqs) => {
                if let Some(unknown) = seqs.iter().find(|seq| !foreign.contains(seq)) {
                    return Err(CommandError::Rejected {
                        kind: crate::domain::ErrorKind::Invalid,
                        message: format!(
                            "message {unknown} is not an unacknowledged foreign message of {} {:?}; its foreign messages are {foreign:?}",
                            A::KIND,
                            id.as_str()
                        ),
                        reason: None,
                    });
                }
                seqs.to_vec()
            }
        };
        if wanted.is_empty() {
            return Ok(Acknowledged {
                acknowledged: Vec::new(),
                remaining: entity.foreign().to_vec(),
                seq: entity.last_seq,
            });
        }
        let record = Record::AcknowledgedForeign(AcknowledgedForeign {
            seqs: wanted.clone(),
            note: note.to_owned(),
        });
        let Some(_fence) = settings.ownership.fence(shard, token).await else {
            return Err(CommandError::NotOwner {
                kind: A::KIND,
                id: id.to_string(),
            });
        };
        let appended = store
            .append_record(RecordCommit {
                fence: Some(crate::cluster::Fence {
                    shard,
                    token,
                    replica: settings.ownership.replica(),
                }),
                kind: A::KIND,
                entity: id.as_str(),
                expected: entity.last_seq,
                entity_version: entity.version,
                command_id: &meta.command_id,
                principal: &meta.principal,
                recorded_at: (settings.clock)(),
                record: &record,
            })
            .await;
        match appended {
            Ok(Appended { seq, duplicate }) => {
                if duplicate {
                    store.catch_up(entity).await?;
                } else {
                    entity.record_store_record(seq, &meta.command_id, &record);
                }
                return Ok(Acknowledged {
                    acknowledged: wanted,
                    remaining: entity.foreign().to_vec(),
                    seq,
                });
            }
            Err(StoreError::Conflict { .. }) => {
                if store.catch_up(entity).await? == 0 {
                    *slot = None;
                }
                if attempts > settings.conflict_retries {
                    return Err(CommandError::Contended {
                        kind: A::KIND,
                        id: id.to_string(),
                        attempts,
                    });
                }
            }
            Err(err) => {
                *slot = None;
                return Err(err.into());
            }
        }
    }
}
