//! The event feed: one reader of the whole event stream for every projection of a process.
//!
//! JetStream delivers a consumer filtered on one kind (`sy.evt.pod.*`) at about half the rate
//! of one that reads the stream whole (measured in `switchyard bench`, replay: 72k against
//! 140k events/s), and each filtered consumer scans the stream again. So projections do not
//! read for themselves: the feed reads everything once, from the start, and hands each
//! projection the messages its filter matches, with the stream position reached. A rebuild of
//! every read model costs one pass at the unfiltered rate, however many kinds there are. The
//! price: a projection that falls far behind (more than [`SLACK`] messages not yet taken)
//! holds up the others, as any single reader would; short stalls are absorbed by merging
//! what it has not taken into its next chunk.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::store::{EventStore, Start, StoredMessage};
use crate::subject;

/// How long to wait before following the stream again after it failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);
/// The most messages read before they are handed out.
const CHUNK: usize = 1024;
/// Chunks a subscriber may have waiting in its channel.
const CHUNKS_AHEAD: usize = 4;
/// Messages a subscriber may have matched but not taken before the feed waits for it.
pub const SLACK: usize = CHUNK * CHUNKS_AHEAD;
/// How soon the feed tries again to hand over what a busy subscriber could not take.
const RETRY_HAND_OVER: Duration = Duration::from_millis(2);

/// What a subscriber receives.
#[derive(Debug)]
pub enum FeedItem {
    /// First: the stream's last sequence when the feed started; a subscriber has caught up
    /// once its position reaches it.
    Start { caught_up_at: u64 },
    /// The messages its filter matched, in order, and the stream sequence the feed has read
    /// up to. While a subscriber catches up it also gets chunks where none matched, so it
    /// learns when it has caught up; after that, only chunks with messages for it (a live
    /// message of one kind wakes that kind's projections, not every one).
    Chunk {
        messages: Vec<StoredMessage>,
        position: u64,
    },
}

struct Subscriber {
    filter: String,
    sender: mpsc::Sender<FeedItem>,
    /// Matched messages not handed out yet.
    pending: Vec<StoredMessage>,
    /// The last position sent to it.
    told: u64,
}

/// Collects subscribers, then reads for all of them.
pub struct Feed {
    store: EventStore,
    subscribers: Vec<Subscriber>,
    /// The stream sequence read up to.
    position: u64,
    /// The stream's last sequence when the feed started.
    caught_up_at: u64,
}

impl Feed {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            subscribers: Vec::new(),
            position: 0,
            caught_up_at: 0,
        }
    }

    /// The messages whose subject matches `filter` (a NATS subject filter), from the start of
    /// the stream, once the feed starts.
    pub fn subscribe(&mut self, filter: String) -> mpsc::Receiver<FeedItem> {
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        self.subscribers.push(Subscriber {
            filter,
            sender,
            pending: Vec::new(),
            told: 0,
        });
        receiver
    }

    /// Starts reading on the multi-threaded runtime, so handing messages out never waits on
    /// an actor's thread. The feed ends by itself once every subscriber is gone.
    pub fn start(self) {
        tokio::spawn(self.run());
    }

    fn all_gone(&self) -> bool {
        self.subscribers.iter().all(|s| s.sender.is_closed())
    }

    /// Whether a subscriber has messages, or (while catching up) a position, not handed over.
    fn owes(&self, subscriber: &Subscriber) -> bool {
        !subscriber.pending.is_empty()
            || (subscriber.told < self.caught_up_at && subscriber.told < self.position)
    }

    async fn run(mut self) {
        self.caught_up_at = loop {
            match self.store.last_sequence().await {
                Ok(last) => break last,
                Err(err) => {
                    tracing::warn!(
                        error = &err as &dyn std::error::Error,
                        "cannot read the stream's position; retrying"
                    );
                    if self.all_gone() {
                        return;
                    }
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                }
            }
        };
        let caught_up_at = self.caught_up_at;
        for subscriber in &self.subscribers {
            // A subscriber already gone is dropped by the next flush.
            let _ = subscriber
                .sender
                .send(FeedItem::Start { caught_up_at })
                .await;
        }
        let filter = self.store.subjects().all_events();
        loop {
            if self.all_gone() {
                return;
            }
            let messages = match self
                .store
                .follow(&filter, Start::Sequence(self.position + 1))
                .await
            {
                Ok((messages, _)) => messages,
                Err(err) => {
                    tracing::warn!(
                        error = &err as &dyn std::error::Error,
                        "cannot follow the event stream; retrying"
                    );
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                    continue;
                }
            };
            let mut chunks = messages.ready_chunks(CHUNK);
            // Reading stops once every subscriber is gone, also while the stream is quiet.
            let senders: Vec<_> = self.subscribers.iter().map(|s| s.sender.clone()).collect();
            let all_gone = async move {
                for sender in &senders {
                    sender.closed().await;
                }
            };
            tokio::pin!(all_gone);
            loop {
                let owing = self.subscribers.iter().any(|s| self.owes(s));
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    () = &mut all_gone => return,
                    () = tokio::time::sleep(RETRY_HAND_OVER), if owing => {
                        self.flush().await;
                        continue;
                    }
                };
                // The stream ended (the consumer gave up): follow again from where it stopped.
                let Some(chunk) = chunk else { break };
                let before = self.position;
                for item in chunk {
                    match item {
                        // After a resubscription the consumer may repeat what was read.
                        Ok(message) if message.seq <= self.position => {}
                        Ok(message) => {
                            self.position = message.seq;
                            self.hand_out(message);
                        }
                        // One unreadable message never stops the read models; the ordered
                        // consumer recovers from its own errors and goes on.
                        Err(err) => {
                            tracing::warn!(
                                error = &err as &dyn std::error::Error,
                                "skipping an unreadable message of the event stream"
                            );
                        }
                    }
                }
                if self.position > before {
                    self.flush().await;
                }
            }
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    }

    /// Queues `message` for every subscriber whose filter matches it.
    fn hand_out(&mut self, message: StoredMessage) {
        let mut matching = self
            .subscribers
            .iter_mut()
            .filter(|s| subject::matches(&s.filter, &message.subject))
            .peekable();
        while let Some(subscriber) = matching.next() {
            if matching.peek().is_some() {
                subscriber.pending.push(message.clone());
            } else {
                subscriber.pending.push(message);
                break;
            }
        }
    }

    /// Hands each subscriber its matched messages and the position (see [`FeedItem::Chunk`]).
    /// A subscriber whose channel is full keeps its messages for the next chunk; only one
    /// more than [`SLACK`] messages behind is waited for. Drops subscribers that are gone.
    async fn flush(&mut self) {
        self.subscribers.retain(|s| !s.sender.is_closed());
        let (position, caught_up_at) = (self.position, self.caught_up_at);
        for subscriber in &mut self.subscribers {
            if subscriber.pending.is_empty() && subscriber.told >= caught_up_at.min(position) {
                continue;
            }
            let messages = std::mem::take(&mut subscriber.pending);
            let item = FeedItem::Chunk { messages, position };
            let sent = match subscriber.sender.try_send(item) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(FeedItem::Chunk { messages, .. }))
                    if messages.len() <= SLACK =>
                {
                    subscriber.pending = messages;
                    false
                }
                Err(mpsc::error::TrySendError::Full(item)) => {
                    subscriber.sender.send(item).await.is_ok()
                }
            };
            if sent {
                subscriber.told = position;
            }
        }
    }
}
