//! The indexer: keeps the command index (`store::index`) from the event feed. A reaction in the
//! plain sense: it follows the log from a checkpoint and writes what it saw; it writes the same
//! entries again after a crash, which is harmless (a put of the same value).
//!
//! It indexes only the store's commits and records (a foreign message's command id must not
//! make a later command look like a retry), only those younger than the idempotency window
//! (older ones would expire at once), and not those whose id was generated for them (nobody
//! can retry an id they were never given). Until its writes are acknowledged it does not move its
//! position, which lookups rely on: what is past the position they read from the log.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Readiness;
use super::feed::{Feed, FeedItem};
use crate::codec::header;
use crate::domain::CommandId;
use crate::metrics::Metrics;
use crate::store::{EventStore, StoredMessage, provenance};

/// How often the checkpoint is written while commits flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before writing again after the index failed.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The running indexer: whether it has caught up, for `/readyz`.
#[derive(Clone)]
pub struct Indexer {
    ready: watch::Receiver<Readiness>,
    stop: std::sync::Arc<watch::Sender<bool>>,
}

impl Indexer {
    pub const NAME: &'static str = "command_index";

    /// Subscribes to `feed` (before it starts) and runs on the multi-threaded runtime.
    pub fn start(
        store: EventStore,
        feed: &mut Feed,
        clock: super::Clock,
        metrics: Metrics,
    ) -> Self {
        let receiver = feed.subscribe(store.subjects().all_events());
        let (ready, watch) = watch::channel(Readiness::CatchingUp);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(run(store, receiver, ready, clock, metrics, stopped));
        Self {
            ready: watch,
            stop: std::sync::Arc::new(stop),
        }
    }

    /// Stops indexing (on shutdown); the checkpoint already written stays.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.ready.clone()
    }
}

/// A commit or record of the store that names its command: what the index keeps.
fn indexable(message: &StoredMessage) -> Option<CommandId> {
    let store_shaped = message.header(provenance::RECORD).is_some()
        || message.header(header::EVENT_TYPE).is_some();
    if !store_shaped
        || message.header(header::ENTITY_VERSION).is_none()
        || message.header(header::COMMAND_ID_GENERATED) == Some("true")
    {
        return None;
    }
    CommandId::new(message.command_id()?).ok()
}

async fn run(
    store: EventStore,
    mut feed: mpsc::Receiver<FeedItem>,
    ready: watch::Sender<Readiness>,
    clock: super::Clock,
    metrics: Metrics,
    mut stopped: watch::Receiver<bool>,
) {
    let index = store.command_index().clone();
    let checkpoint = index.checkpoint().await;
    index.advance(checkpoint);
    let mut caught_up_at = u64::MAX;
    let mut last_checkpoint = tokio::time::Instant::now();
    let mut unsaved = false;
    loop {
        let item = tokio::select! {
            item = feed.recv() => item,
            _ = stopped.changed() => return,
        };
        let Some(item) = item else { break };
        let (messages, position) = match item {
            FeedItem::Start { caught_up_at: at } => {
                caught_up_at = at;
                if index.position() >= at {
                    ready.send_replace(Readiness::CaughtUp);
                }
                continue;
            }
            FeedItem::Chunk { messages, position } => (messages, position),
        };
        let window = index.window();
        let oldest = (clock)().saturating_sub(window);
        let commits: Vec<(CommandId, String, u64)> = messages
            .iter()
            .filter(|m| m.seq > checkpoint && m.stored_at >= oldest)
            .filter_map(|m| Some((indexable(m)?, m.subject.clone(), m.seq)))
            .collect();
        // Level-triggered: an entry not written now is written at the next attempt; the
        // position waits for it, so lookups read those commits from the log meanwhile.
        while let Err(err) = index.record(&commits).await {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "cannot write the command index; retrying"
            );
            tokio::select! {
                () = tokio::time::sleep(RETRY_AFTER) => {}
                _ = stopped.changed() => return,
            }
        }
        metrics.indexed.inc_by(commits.len() as u64);
        index.advance(position);
        unsaved |= !commits.is_empty();
        if unsaved && last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            match index.set_checkpoint(position).await {
                Ok(()) => unsaved = false,
                Err(err) => tracing::debug!(
                    error = &err as &dyn std::error::Error,
                    "cannot write the index checkpoint"
                ),
            }
            last_checkpoint = tokio::time::Instant::now();
        }
        if position >= caught_up_at && !ready.borrow().is_ready() {
            ready.send_replace(Readiness::CaughtUp);
        }
    }
    ready.send_replace(Readiness::Stopped("the event feed ended".to_owned()));
}
