//! Projections: read models rebuilt from the event stream on start, then kept current by
//! following it live, all fed by one [`Feed`]. Each knows its position (the stream sequence it
//! has applied up to) and reports ready once it has caught up with what the stream held when
//! the feed started.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::Bound;

use actix::prelude::*;
use tokio::sync::{mpsc, watch};

use super::feed::{Feed, FeedItem};
use crate::domain::{Aggregate, EntityId, Timestamp};
use crate::metrics::{Metrics, ProjectionLabels};
use crate::store::provenance::{self, Foreign, ForeignMessage, Provenance};
use crate::store::{EventStore, StoreError, StoredMessage};
use crate::subject::Subjects;
use crate::telemetry;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The store did not write it: skipped and reported, never a reason to stop.
    #[error("message {} on {} is not the store's: {}", .0.seq, .0.subject, .0.reason)]
    Foreign(ForeignMessage),
    /// It cannot be read, and skipping it would leave a hole the read model's users would act
    /// on (an event of a newer Switchyard): the read model stops.
    #[error(transparent)]
    Unreadable(#[from] StoreError),
}

/// Where a read model stands, for `/readyz` and for everything that reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Rebuilding from the stream: not yet at the position the stream had when it started.
    CatchingUp,
    /// Has applied everything the stream held when it started, and follows it live.
    CaughtUp,
    /// No longer follows the stream, and why. What it would answer is stale, or built on a
    /// hole, so nobody may act on it.
    Stopped(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        *self == Readiness::CaughtUp
    }

    /// One line for `/readyz`.
    pub fn describe(&self) -> String {
        match self {
            Readiness::CatchingUp => "catching up".to_owned(),
            Readiness::CaughtUp => "caught up".to_owned(),
            Readiness::Stopped(why) => format!("stopped: {why}"),
        }
    }
}

/// A read model folded from stored messages.
pub trait Projection: Send + Unpin + 'static {
    /// Names the projection in metrics and `/readyz`.
    fn name(&self) -> String;
    /// The subjects it reads.
    fn filter(&self, subjects: &Subjects) -> String;
    /// Applies one message. A foreign message is skipped (reported); an unreadable one stops
    /// the read model, which then answers nothing rather than answer from a hole.
    fn apply(
        &mut self,
        subjects: &Subjects,
        message: &StoredMessage,
    ) -> Result<(), ProjectionError>;
}

/// A command a reaper must send, and what it saw.
pub struct Due<A: Aggregate> {
    pub id: A::Id,
    pub command: A::Command,
    /// The stream sequence of the entity's last message when the command was found due: it
    /// never repeats for an entity, also across its lives (a re-created entity's row starts
    /// again at version 0, but its messages have new sequences).
    pub seq: u64,
    pub traceparent: Option<String>,
}

/// The latest state of every entity of one kind: the read model behind `list` and reapers.
pub struct EntityTable<A: Aggregate> {
    rows: BTreeMap<A::Id, Row<A>>,
}

pub struct Row<A: Aggregate> {
    pub state: A,
    /// The stream sequence of the entity's last message: what reactions name their commands
    /// after (it never repeats, unlike a version, which a re-created entity's row restarts).
    pub last_seq: u64,
    /// The `traceparent` of the entity's last message, for whoever reacts to it later.
    pub traceparent: Option<String>,
}

impl<A: Aggregate> Default for EntityTable<A> {
    fn default() -> Self {
        Self {
            rows: BTreeMap::new(),
        }
    }
}

impl<A: Aggregate> EntityTable<A> {
    pub fn get(&self, id: &A::Id) -> Option<&Row<A>> {
        self.rows.get(id)
    }

    /// Entities in id order from `start`.
    pub fn range(&self, start: Bound<&A::Id>) -> impl Iterator<Item = (&A::Id, &Row<A>)> {
        self.rows.range((start, Bound::Unbounded))
    }

    /// Every entity, in id order, including those whose view is `None`.
    pub fn rows(&self) -> impl Iterator<Item = (&A::Id, &Row<A>)> {
        self.rows.iter()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Up to `limit` entities in id order, starting after `after`.
    pub fn list(&self, after: Option<&A::Id>, limit: usize) -> Vec<(A::Id, A::View)> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.rows
            .range((start, Bound::Unbounded))
            .filter_map(|(id, row)| row.state.view(id).map(|view| (id.clone(), view)))
            .take(limit)
            .collect()
    }

    /// Every entity with a command due at `now`, with the row that made it due.
    pub fn due(&self, now: Timestamp) -> Vec<Due<A>> {
        self.rows
            .iter()
            .filter_map(|(id, row)| {
                row.state.due(id, now).map(|command| Due {
                    id: id.clone(),
                    command,
                    seq: row.last_seq,
                    traceparent: row.traceparent.clone(),
                })
            })
            .collect()
    }
}

impl<A: Aggregate> Projection for EntityTable<A> {
    fn name(&self) -> String {
        format!("{}_table", A::KIND)
    }

    fn filter(&self, subjects: &Subjects) -> String {
        subjects.events_of_kind(A::KIND)
    }

    fn apply(
        &mut self,
        subjects: &Subjects,
        message: &StoredMessage,
    ) -> Result<(), ProjectionError> {
        let id = subjects
            .parse_event(&message.subject)
            .and_then(|(_, id)| A::Id::parse(&id).ok())
            .ok_or_else(|| {
                ProjectionError::Foreign(ForeignMessage::new(message, &Foreign::Subject))
            })?;
        let events = match provenance::classify::<A::Event>(A::KIND, message) {
            Provenance::Commit { events, .. } => events,
            // A record changes no state; the actor takes its acknowledgements.
            Provenance::Record { .. } => return Ok(()),
            Provenance::Foreign(reason) => {
                return Err(ProjectionError::Foreign(ForeignMessage::new(
                    message, &reason,
                )));
            }
            Provenance::Newer(event) => {
                return Err(ProjectionError::Unreadable(StoreError::Newer {
                    seq: message.seq,
                    subject: message.subject.clone(),
                    event,
                }));
            }
        };
        let row = match self.rows.get_mut(&id) {
            Some(row) => row,
            None => self.rows.entry(id.clone()).or_insert_with(|| Row {
                state: A::default(),
                last_seq: 0,
                traceparent: None,
            }),
        };
        for event in &events {
            row.state.apply(event);
        }
        row.last_seq = message.seq;
        let traceparent = message.header(crate::codec::header::TRACEPARENT);
        if row.traceparent.as_deref() != traceparent {
            row.traceparent = traceparent.map(str::to_owned);
        }
        // Entities back in their initial state (deleted) cost nothing; their history stays in
        // the stream.
        if row.state == A::default() {
            self.rows.remove(&id);
        }
        Ok(())
    }
}

pub struct ProjectionActor<P: Projection> {
    projection: P,
    name: String,
    store: EventStore,
    /// The stream sequence applied up to.
    position: u64,
    /// The position at which it has caught up, once the feed has said; `None` before, and
    /// after it has caught up.
    catching_up: Option<u64>,
    ready: watch::Sender<Readiness>,
    position_gauge: Gauge,
    errors: Counter,
    foreign: crate::metrics::ForeignLog,
    /// Why it stopped applying, once it met a message it cannot read.
    stopped: Option<String>,
    /// Set once asked to stop, so the end of the feed is not taken for a failure.
    stopping: bool,
    /// What the feed sends; taken when the actor starts.
    feed: Option<mpsc::Receiver<FeedItem>>,
}

impl<P: Projection> ProjectionActor<P> {
    fn check_caught_up(&mut self) {
        if self.catching_up.is_some_and(|at| self.position >= at) {
            self.catching_up = None;
            tracing::info!(projection = %self.name, position = self.position, "projection caught up");
            self.ready.send_replace(Readiness::CaughtUp);
        }
    }
}

impl<P: Projection> Actor for ProjectionActor<P> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(feed) = self.feed.take() {
            let items = futures::stream::unfold(feed, |mut feed| async move {
                feed.recv().await.map(|item| (item, feed))
            });
            ctx.add_stream(items);
        }
    }
}

impl<P: Projection> ProjectionActor<P> {
    fn apply(&mut self, message: &StoredMessage, live: bool) {
        // Live, a projection's update continues the trace of the command that caused it; while
        // rebuilding it makes no spans at all (a replay must not join months-old traces).
        let span = if live {
            let span = tracing::debug_span!("projection.apply", projection = %self.name, seq = message.seq);
            telemetry::continue_trace(&span, Some(&message.headers));
            span
        } else {
            tracing::Span::none()
        };
        let _applying = span.enter();
        if let Some(seqs) = provenance::acknowledged(message) {
            self.foreign.acknowledge(&seqs);
        }
        match self.projection.apply(self.store.subjects(), message) {
            Ok(()) => {}
            Err(ProjectionError::Foreign(foreign)) => {
                self.errors.inc();
                self.foreign.report(foreign);
            }
            Err(ProjectionError::Unreadable(err)) => {
                let why = crate::runtime::error_chain(&err);
                tracing::error!(projection = %self.name, seq = message.seq, reason = %why, "the read model cannot read a message and stops: reconcilers and reapers that read it pause, its queries answer unavailable");
                self.ready.send_replace(Readiness::Stopped(why.clone()));
                self.stopped = Some(why);
            }
        }
    }
}

/// Messages arrive in chunks: one wake-up of the actor per chunk, not per message, which is
/// what a rebuild of a million events needs.
impl<P: Projection> StreamHandler<FeedItem> for ProjectionActor<P> {
    fn handle(&mut self, item: FeedItem, _: &mut Context<Self>) {
        match item {
            FeedItem::Start { caught_up_at } => {
                self.catching_up = Some(caught_up_at);
            }
            FeedItem::Chunk { messages, position } => {
                if self.stopped.is_some() {
                    // Stays where it stopped: nothing after a hole is applied.
                    return;
                }
                for message in &messages {
                    // The feed never repeats a sequence; this guards the read model anyway.
                    if message.seq > self.position {
                        let live = self.catching_up.is_none_or(|at| message.seq > at);
                        self.apply(message, live);
                        if self.stopped.is_some() {
                            // Its position stays before the message it could not read.
                            return;
                        }
                        self.position = message.seq;
                    }
                }
                self.position = self.position.max(position);
                self.position_gauge
                    .set(i64::try_from(self.position).unwrap_or(i64::MAX));
            }
        }
        self.check_caught_up();
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        if !self.stopping && self.stopped.is_none() {
            // Stale from now on: say so on /readyz rather than answer from an old state.
            tracing::error!(projection = %self.name, position = self.position, "the event feed ended; this read model no longer follows the stream");
            self.ready.send_replace(Readiness::Stopped(format!(
                "the event feed ended at sequence {}",
                self.position
            )));
        }
    }
}

impl<P: Projection> Handler<super::Stop> for ProjectionActor<P> {
    type Result = ();

    fn handle(&mut self, _: super::Stop, ctx: &mut Context<Self>) {
        self.stopping = true;
        ctx.stop();
    }
}

/// A read-only query on a projection; it also gets the projection's position.
type Query<P, R> = Box<dyn FnOnce(&P, u64) -> R + Send>;

/// Runs a [`Query`] against the projection.
pub struct Ask<P, R> {
    query: Query<P, R>,
    _projection: PhantomData<fn() -> P>,
}

impl<P: 'static, R: Send + 'static> Message for Ask<P, R> {
    type Result = R;
}

impl<P: Projection, R: Send + 'static> Handler<Ask<P, R>> for ProjectionActor<P> {
    type Result = MessageResult<Ask<P, R>>;

    fn handle(&mut self, ask: Ask<P, R>, _: &mut Context<Self>) -> Self::Result {
        MessageResult((ask.query)(&self.projection, self.position))
    }
}

/// A running projection: query it, or watch whether it has caught up.
pub struct ProjectionHandle<P: Projection> {
    addr: Addr<ProjectionActor<P>>,
    ready: watch::Receiver<Readiness>,
    name: String,
}

impl<P: Projection> Clone for ProjectionHandle<P> {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr.clone(),
            ready: self.ready.clone(),
            name: self.name.clone(),
        }
    }
}

impl<P: Projection> ProjectionHandle<P> {
    /// Starts the projection with a feed of its own; it rebuilds from the start of the stream.
    pub fn start(projection: P, store: EventStore, metrics: Metrics) -> Self {
        let mut feed = Feed::new(store.clone());
        let handle = Self::start_on(projection, &mut feed, store, metrics);
        feed.start();
        handle
    }

    /// Starts the projection on a shared feed: it rebuilds, with the feed's other subscribers,
    /// once the feed starts.
    pub fn start_on(projection: P, feed: &mut Feed, store: EventStore, metrics: Metrics) -> Self {
        let (ready, watch) = watch::channel(Readiness::CatchingUp);
        let name = projection.name();
        let receiver = feed.subscribe(projection.filter(store.subjects()));
        let labels = ProjectionLabels {
            projection: name.clone(),
        };
        let actor = ProjectionActor {
            projection,
            name: name.clone(),
            store,
            position: 0,
            catching_up: Some(u64::MAX),
            ready,
            position_gauge: metrics.projection_position.get_or_create_owned(&labels),
            errors: metrics.projection_errors.get_or_create_owned(&labels),
            foreign: metrics.foreign.clone(),
            stopped: None,
            stopping: false,
            feed: Some(receiver),
        };
        Self {
            // Its own thread: a rebuild or a busy stream never delays entity actors.
            addr: ProjectionActor::start_in_arbiter(&actix::Arbiter::new().handle(), |_| actor),
            ready: watch,
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops following the stream.
    pub fn stop(&self) {
        self.addr.do_send(super::Stop);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.borrow().is_ready()
    }

    /// Where it stands now.
    pub fn readiness_now(&self) -> Readiness {
        self.ready.borrow().clone()
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.ready.clone()
    }

    /// Runs `query` on the read model; it also gets the projection's position.
    pub async fn ask<R: Send + 'static>(
        &self,
        query: impl FnOnce(&P, u64) -> R + Send + 'static,
    ) -> Result<R, MailboxError> {
        self.addr
            .send(Ask {
                query: Box::new(query),
                _projection: PhantomData,
            })
            .await
    }
}
