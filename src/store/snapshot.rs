//! Snapshots of entity state in a KV bucket, written with compare-and-set so an actor of an
//! older generation can never replace a newer snapshot. Snapshots are an optimisation only:
//! a missing, stale or undecodable one means a longer replay, never a wrong state.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use super::{Result, StoreError};
use crate::codec::Bincode;
use crate::config::StoreConfig;
use crate::domain::event::Format;

/// The layout of [`SnapshotRecord`] itself; bump it when the record changes shape.
const RECORD_FORMAT: u16 = 2;

/// What a snapshot holds besides the state: where in the log it was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format: u16,
    /// `Aggregate::SNAPSHOT_VERSION` of the state's shape.
    pub state_version: u16,
    /// Stream sequence of the last message folded into `state`.
    pub seq: u64,
    /// Entity version (events folded) at `seq`.
    pub version: u64,
    /// The entity's recent commands: `(hash of command id, sequence)`.
    pub recent: Vec<(u64, u64)>,
    /// Foreign messages in its history not yet acknowledged: `(sequence, subject, reason)`.
    pub foreign: Vec<(u64, String, String)>,
    /// The state, bincode-encoded.
    pub state: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {key} was replaced by another writer")]
    Superseded { key: String },
    #[error("cannot write snapshot {key}")]
    Write {
        key: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot encode snapshot {key}")]
    Encode {
        key: String,
        #[source]
        source: crate::domain::event::FormatError,
    },
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    kv: kv::Store,
}

impl SnapshotStore {
    pub(super) async fn open(js: &jetstream::Context, config: &StoreConfig) -> Result<Self> {
        let bucket = config.snapshot_bucket();
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                description:
                    "Switchyard entity snapshots (disposable; the event stream is the truth)"
                        .to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::Setup {
                what: "bucket",
                name: bucket,
                source: e.into(),
            })?;
        Ok(Self { kv })
    }

    /// The bucket as it is, created by someone else.
    pub(super) async fn attach(js: &jetstream::Context, config: &StoreConfig) -> Result<Self> {
        let bucket = config.snapshot_bucket();
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| StoreError::Setup {
                what: "bucket",
                name: bucket,
                source: e.into(),
            })?;
        Ok(Self { kv })
    }

    /// The snapshot under `key` and its KV revision. A snapshot that cannot be read or decoded
    /// is reported as missing (with a warning): the caller then replays the full history.
    pub async fn get(&self, key: &str) -> Option<(SnapshotRecord, u64)> {
        let entry = match self.kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return None,
            Err(err) => {
                tracing::warn!(
                    key,
                    error = &err as &dyn std::error::Error,
                    "snapshot unreadable; replaying the full history"
                );
                return None;
            }
        };
        match Bincode::decode::<SnapshotRecord>(&entry.value) {
            Ok(record) if record.format == RECORD_FORMAT => Some((record, entry.revision)),
            Ok(record) => {
                tracing::info!(
                    key,
                    format = record.format,
                    "snapshot of an older layout; replaying the full history"
                );
                None
            }
            Err(err) => {
                tracing::warn!(
                    key,
                    error = &err as &dyn std::error::Error,
                    "snapshot does not decode; replaying the full history"
                );
                None
            }
        }
    }

    /// The key's current revision, whatever its value holds (`None`: no snapshot).
    pub async fn revision(&self, key: &str) -> Option<u64> {
        match self.kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => Some(entry.revision),
            _ => None,
        }
    }

    /// Writes `record` if the key is still at `revision` (`None`: if it does not exist yet).
    /// Returns the new revision.
    pub async fn put(
        &self,
        key: &str,
        mut record: SnapshotRecord,
        revision: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        record.format = RECORD_FORMAT;
        let bytes = Bincode::encode(&record).map_err(|source| SnapshotError::Encode {
            key: key.to_owned(),
            source,
        })?;
        match revision {
            Some(revision) => {
                self.kv
                    .update(key, bytes.into(), revision)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => SnapshotError::Superseded {
                            key: key.to_owned(),
                        },
                        _ => SnapshotError::Write {
                            key: key.to_owned(),
                            source: e.into(),
                        },
                    })
            }
            None => self
                .kv
                .create(key, bytes.into())
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => SnapshotError::Superseded {
                        key: key.to_owned(),
                    },
                    _ => SnapshotError::Write {
                        key: key.to_owned(),
                        source: e.into(),
                    },
                }),
        }
    }

    /// Overwrites a snapshot regardless of its revision; for tests that plant corrupt data.
    pub async fn put_raw(&self, key: &str, bytes: Vec<u8>) -> Result<u64, SnapshotError> {
        self.kv
            .put(key, bytes.into())
            .await
            .map_err(|e| SnapshotError::Write {
                key: key.to_owned(),
                source: e.into(),
            })
    }
}
