//! The command index: where each entity's commands of the last `store.idempotency_window`
//! (24 hours by default) were stored, so a retry is recognised however busy the entity has been
//! since. An entity remembers only its last 64 commands and JetStream deduplicates only within
//! its `duplicate_window`; payment APIs keep idempotency keys for a day, and so does this.
//!
//! It is a read model of the log, kept in a KV bucket (`<P>_COMMAND_IDS`) whose entries expire
//! after the window: key = the commit's message id (command id and entity subject), value = its
//! stream sequence. The indexer (`runtime::indexer`) writes it from the event feed, level-
//! triggered, from a checkpoint; it trails the log a little, and [`CommandIndex::position`]
//! says how far it has got, so a lookup reads the entity's own messages past that point.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;

use super::{Result, StoreError, message_id};
use crate::config::StoreConfig;
use crate::domain::CommandId;

/// The key of the indexer's checkpoint: the stream sequence indexed up to.
const CHECKPOINT: &str = "checkpoint";
/// Puts in flight at once while indexing.
const PUTS_IN_FLIGHT: usize = 256;

#[derive(Clone, Debug)]
pub struct CommandIndex {
    kv: kv::Store,
    bucket: String,
    window: Duration,
    /// The stream sequence every commit up to which is in the index.
    position: Arc<AtomicU64>,
}

impl CommandIndex {
    pub(super) async fn open(js: &jetstream::Context, config: &StoreConfig) -> Result<Self> {
        let bucket = config.command_index_bucket();
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                description: "Switchyard command index: the commits of the idempotency window"
                    .to_owned(),
                history: 1,
                max_age: config.idempotency_window,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::Setup {
                what: "bucket",
                name: bucket.clone(),
                source: e.into(),
            })?;
        Ok(Self::on(kv, bucket, config))
    }

    /// The bucket as it is, created by someone else.
    pub(super) async fn attach(js: &jetstream::Context, config: &StoreConfig) -> Result<Self> {
        let bucket = config.command_index_bucket();
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| StoreError::Setup {
                what: "bucket",
                name: bucket.clone(),
                source: e.into(),
            })?;
        Ok(Self::on(kv, bucket, config))
    }

    fn on(kv: kv::Store, bucket: String, config: &StoreConfig) -> Self {
        Self {
            kv,
            bucket,
            window: config.idempotency_window,
            position: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The stream sequence up to which every commit is indexed.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    /// The indexer has written everything up to `seq`.
    pub fn advance(&self, seq: u64) {
        self.position.fetch_max(seq, Ordering::AcqRel);
    }

    /// The commit's message id (the same one its `Nats-Msg-Id` is), without dashes.
    fn key(command_id: &CommandId, subject: &str) -> String {
        message_id(command_id, subject).replace('-', "")
    }

    fn error(&self, reason: String) -> StoreError {
        StoreError::Read {
            stream: self.bucket.clone(),
            subject: "command index".to_owned(),
            reason,
        }
    }

    /// Where `command_id` was stored on `subject`, if the index has it.
    pub async fn lookup(&self, command_id: &CommandId, subject: &str) -> Result<Option<u64>> {
        let entry = self
            .kv
            .get(Self::key(command_id, subject))
            .await
            .map_err(|e| self.error(e.to_string()))?;
        Ok(entry.and_then(|value| std::str::from_utf8(&value).ok()?.parse().ok()))
    }

    /// Records commits: `(command id, subject, stream sequence)`.
    pub async fn record(&self, commits: &[(CommandId, String, u64)]) -> Result<()> {
        let entries: Vec<(String, Bytes)> = commits
            .iter()
            .map(|(command_id, subject, seq)| {
                (Self::key(command_id, subject), Bytes::from(seq.to_string()))
            })
            .collect();
        let puts = futures::stream::iter(entries.into_iter().map(|(key, value)| {
            let kv = self.kv.clone();
            async move { kv.put(key, value).await }
        }))
        .buffer_unordered(PUTS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        for put in puts {
            put.map_err(|e| self.error(e.to_string()))?;
        }
        Ok(())
    }

    /// The sequence the indexer had reached when it last said so (0: none).
    pub async fn checkpoint(&self) -> u64 {
        match self.kv.get(CHECKPOINT).await {
            Ok(Some(value)) => std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            _ => 0,
        }
    }

    pub async fn set_checkpoint(&self, seq: u64) -> Result<()> {
        self.kv
            .put(CHECKPOINT, Bytes::from(seq.to_string()))
            .await
            .map(|_| ())
            .map_err(|e| self.error(e.to_string()))
    }
}
