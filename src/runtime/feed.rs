//! The event feed: one reader of the whole event stream for every projection of a process.
//!
//! JetStream delivers a consumer filtered on one kind (`sy.evt.pod.*`) at about half the rate
//! of one that reads the stream whole (measured in `switchyard bench`, replay: 72k against
//! 140k events/s), and each filtered consumer scans the stream again. So projections do not
//! read for themselves: the feed reads everything once, from the start, and hands each
//! projection the messages its filter matches, with the stream position reached. A rebuild of
//! every read model costs one pass at the unfiltered rate, however many kinds there are. The
//! price: a projection that falls behind by more than its few chunks of slack holds up the
//! others, as any single reader would.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::store::{EventStore, Start, StoredMessage};
use crate::subject;

/// How long to wait before following the stream again after it failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);
/// The most messages read before they are handed out.
const CHUNK: usize = 1024;
/// Chunks a subscriber may have waiting before the feed waits for it.
const CHUNKS_AHEAD: usize = 4;

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
}

impl Feed {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            subscribers: Vec::new(),
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
    /// an actor's thread. The feed ends once every subscriber is gone.
    pub fn start(self) -> FeedHandle {
        FeedHandle(tokio::spawn(self.run()))
    }

    async fn run(mut self) {
        let caught_up_at = loop {
            match self.store.last_sequence().await {
                Ok(last) => break last,
                Err(err) => {
                    tracing::warn!(
                        error = &err as &dyn std::error::Error,
                        "cannot read the stream's position; retrying"
                    );
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                }
            }
        };
        for subscriber in &self.subscribers {
            // A subscriber already gone is dropped by the next flush.
            let _ = subscriber
                .sender
                .send(FeedItem::Start { caught_up_at })
                .await;
        }
        let filter = self.store.subjects().all_events();
        let mut position = 0;
        while !self.subscribers.is_empty() {
            let messages = match self
                .store
                .follow(&filter, Start::Sequence(position + 1))
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
            'read: loop {
                // Reading stops once every subscriber is gone, also while the stream is quiet.
                let senders: Vec<_> = self.subscribers.iter().map(|s| s.sender.clone()).collect();
                let all_gone = async move {
                    for sender in &senders {
                        sender.closed().await;
                    }
                };
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    () = all_gone => return,
                };
                let Some(chunk) = chunk else { break };
                let before = position;
                for item in chunk {
                    match item {
                        // After a resubscription the consumer may repeat what was read.
                        Ok(message) if message.seq <= position => {}
                        Ok(message) => {
                            position = message.seq;
                            self.hand_out(message);
                        }
                        Err(err) => {
                            tracing::warn!(
                                error = &err as &dyn std::error::Error,
                                "event stream error; following again"
                            );
                            self.flush(position, caught_up_at).await;
                            break 'read;
                        }
                    }
                }
                if position > before {
                    self.flush(position, caught_up_at).await;
                }
                if self.subscribers.is_empty() {
                    return;
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

    /// Sends each subscriber its matched messages and the position (see [`FeedItem::Chunk`]);
    /// drops those gone.
    async fn flush(&mut self, position: u64, caught_up_at: u64) {
        self.subscribers.retain(|s| !s.sender.is_closed());
        let mut gone = Vec::new();
        for (index, subscriber) in self.subscribers.iter_mut().enumerate() {
            if subscriber.pending.is_empty() && subscriber.told >= caught_up_at {
                continue;
            }
            let messages = std::mem::take(&mut subscriber.pending);
            let item = FeedItem::Chunk { messages, position };
            if subscriber.sender.send(item).await.is_err() {
                gone.push(index);
            } else {
                subscriber.told = position;
            }
        }
        for index in gone.into_iter().rev() {
            self.subscribers.swap_remove(index);
        }
    }
}

/// The running feed; stops it when dropped.
pub struct FeedHandle(tokio::task::JoinHandle<()>);

impl Drop for FeedHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}
