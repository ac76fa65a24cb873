//! Reactions (process managers): the event-driven half of the runtime.
//!
//! A reaction follows the event stream from a durable checkpoint, folds what it needs into its
//! own state, and runs the jobs that state says are due (`Reaction::due`, level-triggered: it
//! reads the state and the time, never why it was woken). A job acts for one entity and runs
//! only on the replica that owns that entity's shard, at most one per entity at a time; the
//! commands it sends are named after what it saw (`derived_command_id`), so a job repeated
//! after a crash, a redelivery or a fail-over writes once.
//!
//! The checkpoint (`<prefix>_REACTIONS`, key `<name>`) holds the stream position the state was
//! folded up to and the state itself; every replica keeps it moving, and any replica's
//! checkpoint is a true fold of the log up to its position, so whoever wrote last is right. A
//! restart folds on from there: it never re-reads the log from the start, and since jobs follow
//! state rather than events, nothing is re-done for events folded twice.
//!
//! While a reaction catches up (at start, or when it falls more than `max_lag` messages behind)
//! it runs no job and `/readyz` says so; its position and lag are in `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use super::{Clock, Readiness};
use crate::cluster::{Ownership, Route};
use crate::domain::{Aggregate, EntityId, Timestamp};
use crate::metrics::{Metrics, ReactionLabels};
use crate::store::provenance::{self, Provenance};
use crate::store::{EventStore, Start, StoreError, StoredMessage};

/// How a reaction runs; from `ReactionsConfig`.
#[derive(Debug, Clone)]
pub struct ReactionSettings {
    /// How often `due` is asked even when nothing new arrived (timeouts, retries, shards
    /// newly owned).
    pub interval: Duration,
    /// How often, at most, the checkpoint is written while messages arrive.
    pub checkpoint_every: Duration,
    /// Beyond this many messages behind the stream, the reaction counts as catching up: it
    /// runs no job and is not ready.
    pub max_lag: u64,
}

/// One message of a followed kind, as a reaction sees it.
pub struct Observed<'a> {
    pub kind: &'a str,
    /// The entity id, decoded from the subject.
    pub id: &'a str,
    pub message: &'a StoredMessage,
}

impl Observed<'_> {
    pub fn seq(&self) -> u64 {
        self.message.seq
    }

    /// The `traceparent` stored with the message: the trace a job continues.
    pub fn traceparent(&self) -> Option<String> {
        self.message
            .header(crate::codec::header::TRACEPARENT)
            .map(str::to_owned)
    }

    /// The id, if this message is of kind `A`.
    pub fn id_of<A: Aggregate>(&self) -> Option<A::Id> {
        (self.kind == A::KIND)
            .then(|| A::Id::parse(self.id).ok())
            .flatten()
    }

    /// The events of this message, if it is a commit of kind `A`. A foreign message or a
    /// record is `Ok(None)` (skipped); an event of a newer Switchyard is an error, and the
    /// reaction stops rather than act on a hole.
    pub fn events<A: Aggregate>(&self) -> Result<Option<Vec<A::Event>>, StoreError> {
        if self.kind != A::KIND {
            return Ok(None);
        }
        match provenance::classify::<A::Event>(A::KIND, self.message) {
            Provenance::Commit { events, .. } => Ok(Some(events)),
            Provenance::Record { .. } | Provenance::Foreign(_) => Ok(None),
            Provenance::Newer(event) => Err(StoreError::Newer {
                seq: self.message.seq,
                subject: self.message.subject.clone(),
                event,
            }),
        }
    }
}

/// A job due now, for one entity: it runs on the owner of that entity's shard, and never
/// alongside another job for the same entity.
pub struct Due<J> {
    pub kind: &'static str,
    pub id: String,
    pub job: J,
}

/// A process manager. See the module documentation.
pub trait Reaction: Send + Sync + 'static {
    /// Names its checkpoint, metrics and spans: `[a-z][a-z0-9_]*`.
    const NAME: &'static str;
    /// The checkpoint's state version: bump it when `State` changes shape, and an old
    /// checkpoint is ignored (the state is folded again from the start of the log).
    const STATE_VERSION: u16;
    /// What it keeps. Keep it to what `due` needs: it is written with every checkpoint.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    type Job: Send + 'static;

    /// The entity kinds it follows.
    fn kinds(&self) -> Vec<&'static str>;

    /// Folds one message into the state. Pure; an error stops the reaction.
    fn observe(&self, state: &mut Self::State, message: &Observed<'_>) -> Result<(), StoreError>;

    /// The jobs due now. Level-triggered: from the state and the time only.
    fn due(&self, state: &Self::State, now: Timestamp) -> Vec<Due<Self::Job>>;

    /// Runs one job to its end (or until it has to wait for something the log will say).
    /// It is aborted, as a crash would end it, if its entity's shard moves meanwhile.
    fn run(&self, job: Self::Job) -> BoxFuture<'static, Result<(), String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum ReactionError {
    #[error("cannot open the reaction checkpoint bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
}

/// What the checkpoint key holds.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    version: u16,
    position: u64,
    state: serde_json::Value,
}

/// A running reaction: its readiness, and a way to stop it.
#[derive(Clone)]
pub struct ReactionHandle {
    name: &'static str,
    ready: watch::Receiver<Readiness>,
    stop: Arc<watch::Sender<bool>>,
}

impl ReactionHandle {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.ready.clone()
    }

    /// Stops following and aborts its jobs (as a crash would; they are resumed by whoever
    /// owns their entities next), after writing a last checkpoint.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Opens the checkpoint bucket.
pub async fn checkpoint_bucket(store: &EventStore) -> Result<kv::Store, ReactionError> {
    let config = store.config();
    let bucket = format!("{}_REACTIONS", config.stream_prefix);
    store
        .jetstream()
        .create_or_update_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "Switchyard reaction checkpoints: position and state".to_owned(),
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| ReactionError::Bucket {
            bucket,
            source: e.into(),
        })
}

/// Starts `reaction` on the multi-threaded runtime. It opens its checkpoint bucket itself
/// (retrying while JetStream is not there yet), then folds on from its checkpoint.
pub fn start<R: Reaction>(
    reaction: R,
    store: EventStore,
    ownership: Ownership,
    settings: ReactionSettings,
    clock: Clock,
    metrics: Metrics,
) -> ReactionHandle {
    let (ready, watch) = watch::channel(Readiness::CatchingUp);
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        let bucket = loop {
            match checkpoint_bucket(&store).await {
                Ok(bucket) => break bucket,
                Err(err) => {
                    tracing::warn!(reaction = R::NAME, error = %crate::error_chain::error_chain(&err), "cannot open the checkpoint bucket; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                        _ = stopped.changed() => return,
                    }
                }
            }
        };
        let runner = Runner {
            reaction: Arc::new(reaction),
            store,
            bucket,
            ownership,
            settings,
            clock,
            metrics,
            ready,
        };
        runner.run(stopped).await;
    });
    ReactionHandle {
        name: R::NAME,
        ready: watch,
        stop: Arc::new(stop),
    }
}

/// A job in flight: which lease it runs under.
struct Running {
    shard: u32,
    token: u64,
    abort: AbortHandle,
}

/// How the last run of an entity's job ended: a job is run again when the fold has moved
/// past where it started (something new was seen) or at the next tick, and after a failure
/// only once its back-off has passed.
struct Ended {
    position: u64,
    retry_at: Option<Instant>,
    failures: u32,
}

/// The most a failed job waits before it runs again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The jobs of one runner.
#[derive(Default)]
struct Jobs {
    set: JoinSet<(String, bool)>,
    running: HashMap<String, Running>,
    ended: HashMap<String, Ended>,
}

struct Runner<R: Reaction> {
    reaction: Arc<R>,
    store: EventStore,
    bucket: kv::Store,
    ownership: Ownership,
    settings: ReactionSettings,
    clock: Clock,
    metrics: Metrics,
    ready: watch::Sender<Readiness>,
}

/// Where the fold stands.
struct Folded<S> {
    state: S,
    position: u64,
    /// The stream's last sequence, as last read.
    last: u64,
    caught_up: bool,
    dirty: bool,
    saved_at: Instant,
}

const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

impl<R: Reaction> Runner<R> {
    fn labels(&self) -> ReactionLabels {
        ReactionLabels {
            reaction: R::NAME.to_owned(),
        }
    }

    async fn load(&self) -> (R::State, u64) {
        loop {
            match self.bucket.get(R::NAME).await {
                Ok(None) => return (R::State::default(), 0),
                Ok(Some(bytes)) => {
                    let checkpoint = serde_json::from_slice::<Checkpoint>(&bytes)
                        .ok()
                        .filter(|c| c.version == R::STATE_VERSION)
                        .and_then(|c| {
                            serde_json::from_value::<R::State>(c.state)
                                .ok()
                                .map(|state| (state, c.position))
                        });
                    return checkpoint.unwrap_or_else(|| {
                        tracing::warn!(reaction = R::NAME, "the checkpoint is of another version or unreadable; folding the log from the start");
                        (R::State::default(), 0)
                    });
                }
                Err(err) => {
                    tracing::warn!(reaction = R::NAME, error = %err, "cannot read the checkpoint; retrying");
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                }
            }
        }
    }

    /// Writes the checkpoint unless a newer one (a further position, by another replica) is
    /// there already.
    async fn save(&self, folded: &mut Folded<R::State>) {
        let state = match serde_json::to_value(&folded.state) {
            Ok(state) => state,
            Err(err) => {
                tracing::error!(reaction = R::NAME, error = %err, "cannot encode the reaction state");
                return;
            }
        };
        let checkpoint = Checkpoint {
            version: R::STATE_VERSION,
            position: folded.position,
            state,
        };
        let Ok(bytes) = serde_json::to_vec(&checkpoint) else {
            return;
        };
        let ahead = match self.bucket.entry(R::NAME).await {
            Ok(Some(entry)) => serde_json::from_slice::<Checkpoint>(&entry.value)
                .is_ok_and(|c| c.version == R::STATE_VERSION && c.position >= folded.position),
            _ => false,
        };
        if !ahead && let Err(err) = self.bucket.put(R::NAME, bytes.into()).await {
            tracing::warn!(reaction = R::NAME, error = %err, "cannot write the checkpoint; will retry");
            return;
        }
        folded.dirty = false;
        folded.saved_at = Instant::now();
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let (state, position) = self.load().await;
        let mut folded = Folded {
            state,
            position,
            last: position,
            caught_up: false,
            dirty: false,
            saved_at: Instant::now(),
        };
        let filter = match self.reaction.kinds().as_slice() {
            [kind] => self.store.subjects().events_of_kind(kind),
            _ => self.store.subjects().all_events(),
        };
        let kinds = self.reaction.kinds();
        let mut jobs = Jobs::default();
        let mut changes = self.ownership.subscribe();
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            reaction = R::NAME,
            position,
            "reaction starting from its checkpoint"
        );
        'follow: loop {
            if let Ok(last) = self.store.last_sequence_of(&filter).await {
                folded.last = last;
            }
            let messages = match self
                .store
                .follow(&filter, Start::Sequence(folded.position + 1))
                .await
            {
                Ok((messages, _)) => messages,
                Err(err) => {
                    tracing::warn!(reaction = R::NAME, error = %crate::error_chain::error_chain(&err), "cannot follow the event stream; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RESUBSCRIBE_AFTER) => continue 'follow,
                        _ = stopped.changed() => break 'follow,
                    }
                }
            };
            let mut chunks = messages.ready_chunks(1024);
            self.check_caught_up(&mut folded);
            loop {
                tokio::select! {
                    chunk = chunks.next() => {
                        let Some(chunk) = chunk else { break };
                        for item in chunk {
                            let message = match item {
                                Ok(message) if message.seq > folded.position => message,
                                Ok(_) => continue,
                                Err(err) => {
                                    tracing::warn!(reaction = R::NAME, error = %crate::error_chain::error_chain(&err), "skipping an unreadable message");
                                    continue;
                                }
                            };
                            if let Err(err) = self.fold(&kinds, &mut folded, &message) {
                                let why = crate::error_chain::error_chain(&err);
                                tracing::error!(reaction = R::NAME, seq = message.seq, reason = %why, "the reaction cannot read a message and stops; it acts on nothing until Switchyard is upgraded");
                                self.ready.send_replace(Readiness::Stopped(why));
                                jobs.set.abort_all();
                                let _ = stopped.changed().await;
                                break 'follow;
                            }
                        }
                        folded.last = folded.last.max(folded.position);
                        self.check_caught_up(&mut folded);
                        self.act(&folded, &mut jobs, false);
                        if folded.dirty && folded.saved_at.elapsed() >= self.settings.checkpoint_every {
                            self.save(&mut folded).await;
                        }
                    }
                    _ = tick.tick() => {
                        if let Ok(last) = self.store.last_sequence_of(&filter).await {
                            folded.last = last.max(folded.position);
                        }
                        self.check_caught_up(&mut folded);
                        self.abort_lost(&mut jobs);
                        self.act(&folded, &mut jobs, true);
                        if folded.dirty {
                            self.save(&mut folded).await;
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break 'follow;
                        }
                        self.abort_lost(&mut jobs);
                        self.act(&folded, &mut jobs, true);
                    }
                    Some(joined) = jobs.set.join_next(), if !jobs.set.is_empty() => {
                        if let Ok((key, ok)) = joined {
                            jobs.finished(key, ok);
                            self.metrics
                                .reaction_jobs
                                .get_or_create(&crate::metrics::ReactionJobLabels {
                                    reaction: R::NAME.to_owned(),
                                    outcome: if ok { "ok" } else { "error" }.to_owned(),
                                })
                                .inc();
                        }
                        jobs.running.retain(|_, job| !job.abort.is_finished());
                        self.act(&folded, &mut jobs, false);
                    }
                    _ = stopped.changed() => break 'follow,
                }
            }
            // The consumer ended: follow again from where it stopped.
            tokio::select! {
                () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                _ = stopped.changed() => break 'follow,
            }
        }
        jobs.set.abort_all();
        if folded.dirty {
            self.save(&mut folded).await;
        }
    }

    fn fold(
        &self,
        kinds: &[&'static str],
        folded: &mut Folded<R::State>,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        let parsed = self.store.subjects().parse_event(&message.subject);
        if let Some((kind, id)) = parsed
            && kinds.contains(&kind.as_str())
        {
            let observed = Observed {
                kind: &kind,
                id: &id,
                message,
            };
            self.reaction.observe(&mut folded.state, &observed)?;
        }
        folded.position = message.seq;
        folded.dirty = true;
        self.metrics
            .reaction_position
            .get_or_create(&self.labels())
            .set(i64::try_from(folded.position).unwrap_or(i64::MAX));
        Ok(())
    }

    fn check_caught_up(&self, folded: &mut Folded<R::State>) {
        let lag = folded.last.saturating_sub(folded.position);
        self.metrics
            .reaction_lag
            .get_or_create(&self.labels())
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        let caught_up = if folded.caught_up {
            lag <= self.settings.max_lag
        } else {
            lag == 0
        };
        if caught_up != folded.caught_up {
            folded.caught_up = caught_up;
            if caught_up {
                tracing::info!(
                    reaction = R::NAME,
                    position = folded.position,
                    "reaction caught up"
                );
                self.ready.send_replace(Readiness::CaughtUp);
            } else {
                tracing::warn!(
                    reaction = R::NAME,
                    lag,
                    "reaction fell behind; it runs no job until it catches up"
                );
                self.ready.send_replace(Readiness::CatchingUp);
            }
        }
    }

    /// Aborts the jobs whose entity's shard this replica no longer holds under the lease they
    /// started with: the new owner resumes them from the log.
    fn abort_lost(&self, jobs: &mut Jobs) {
        jobs.running.retain(|key, job| {
            let held = self.ownership.holds(job.shard, job.token);
            if !held {
                tracing::info!(reaction = R::NAME, job = %key, "the shard moved; stopping the job here");
                job.abort.abort();
            }
            held && !job.abort.is_finished()
        });
    }

    /// Starts every due job of an owned entity that is not running already. Unless `tick`,
    /// a job that ended is run again only once the fold has moved past where it started.
    fn act(&self, folded: &Folded<R::State>, jobs: &mut Jobs, tick: bool) {
        if !folded.caught_up {
            return;
        }
        let now = (self.clock)();
        let instant = Instant::now();
        let mut due_keys = std::collections::HashSet::new();
        for due in self.reaction.due(&folded.state, now) {
            let key = format!("{}/{}", due.kind, due.id);
            due_keys.insert(key.clone());
            if jobs
                .running
                .get(&key)
                .is_some_and(|job| !job.abort.is_finished())
            {
                continue;
            }
            if let Some(ended) = jobs.ended.get(&key) {
                let waiting = ended.retry_at.is_some_and(|at| instant < at);
                let nothing_new = !tick && ended.position >= folded.position;
                if waiting || nothing_new {
                    continue;
                }
            }
            let shard = self.ownership.shard_of(due.kind, &due.id);
            let Route::Local { token } = self.ownership.route(shard) else {
                continue;
            };
            let reaction = self.reaction.clone();
            let name = key.clone();
            let abort = jobs.set.spawn(async move {
                match reaction.run(due.job).await {
                    Ok(()) => (name, true),
                    Err(err) => {
                        tracing::warn!(reaction = R::NAME, job = %name, error = %err, "job failed; it runs again while it is due");
                        (name, false)
                    }
                }
            });
            jobs.ended
                .entry(key.clone())
                .or_insert(Ended {
                    position: 0,
                    retry_at: None,
                    failures: 0,
                })
                .position = folded.position;
            jobs.running.insert(
                key,
                Running {
                    shard,
                    token,
                    abort,
                },
            );
        }
        // Forget how the jobs of entities that are no longer due ended.
        let running = &jobs.running;
        jobs.ended
            .retain(|key, _| due_keys.contains(key) || running.contains_key(key));
        self.metrics
            .reaction_running
            .get_or_create(&self.labels())
            .set(i64::try_from(jobs.running.len()).unwrap_or(i64::MAX));
    }
}

impl Jobs {
    /// Records how a job ended; a failure backs off, doubling up to [`MAX_BACKOFF`].
    fn finished(&mut self, key: String, ok: bool) {
        let ended = self.ended.entry(key).or_insert(Ended {
            position: 0,
            retry_at: None,
            failures: 0,
        });
        if ok {
            ended.failures = 0;
            ended.retry_at = None;
        } else {
            ended.failures = ended.failures.saturating_add(1);
            let backoff = Duration::from_millis(100)
                .saturating_mul(1 << ended.failures.min(9))
                .min(MAX_BACKOFF);
            ended.retry_at = Some(Instant::now() + backoff);
        }
    }
}
