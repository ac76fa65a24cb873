//! An entity's state as of a position in the log, and how it is loaded: snapshot plus tail, or
//! the full history when the snapshot is missing, undecodable or inconsistent with the log.

use std::collections::VecDeque;

use super::provenance::{self, Foreign, ForeignMessage, Provenance, Record};
use super::snapshot::{SnapshotError, SnapshotRecord};
use super::{EventStore, Result, StoreError, StoredMessage};
use crate::codec::Bincode;
use crate::domain::event::Format;
use crate::domain::{Aggregate, CommandId, EntityId};
use crate::subject::snapshot_key;

/// How many of its latest commands an entity remembers, to answer retries that arrive after the
/// server's duplicate window. Kept as hashes: 16 bytes each, 1 KiB in all.
pub const RECENT_COMMANDS: usize = 64;

/// How many foreign messages an entity lists (the oldest beyond this are forgotten, still
/// skipped; `/readyz` and the audit show them all).
pub const FOREIGN_LISTED: usize = 64;

/// An aggregate's state after folding its log up to `last_seq`.
#[derive(Debug, Clone)]
pub struct Entity<A: Aggregate> {
    pub id: A::Id,
    pub state: A,
    /// Events folded so far; versions are gapless across messages.
    pub version: u64,
    /// Stream sequence of the entity's last message; 0 while it has none.
    pub last_seq: u64,
    recent: VecDeque<(u64, u64)>,
    /// Foreign messages in its history, not yet acknowledged by an operator.
    foreign: Vec<ForeignMessage>,
    /// Whether its position is known good: always from a full replay; from a snapshot only
    /// once the first message after it lines up (gapless entity versions).
    verified: bool,
    snapshot: Option<SnapshotMark>,
}

/// What the snapshot bucket holds for this entity, as far as this copy knows.
#[derive(Debug, Clone, Copy)]
struct SnapshotMark {
    revision: u64,
    version: u64,
}

impl<A: Aggregate> Entity<A> {
    pub fn new(id: A::Id) -> Self {
        Self {
            id,
            state: A::default(),
            version: 0,
            last_seq: 0,
            recent: VecDeque::new(),
            foreign: Vec::new(),
            verified: true,
            snapshot: None,
        }
    }

    /// Folds one stored message in: the store's commits and records; a foreign message is
    /// skipped (its position still counts, so the next append expects it) and listed; an
    /// event of a newer Switchyard is an error, never a hole.
    pub fn fold(&mut self, message: &StoredMessage) -> Result<()> {
        match provenance::classify::<A::Event>(A::KIND, message) {
            Provenance::Commit {
                events,
                entity_version,
            } => {
                let expected = self.version + events.len() as u64;
                self.check_version(message, expected, entity_version)?;
                for event in &events {
                    self.state.apply(event);
                }
                self.version = expected;
            }
            Provenance::Record {
                record,
                entity_version,
            } => {
                self.check_version(message, self.version, entity_version)?;
                match record {
                    Record::AcknowledgedForeign(ack) => {
                        self.foreign.retain(|f| !ack.seqs.contains(&f.seq));
                    }
                }
            }
            Provenance::Foreign(reason) => {
                self.skip(message, &reason);
                return Ok(());
            }
            Provenance::Newer(event) => {
                return Err(StoreError::Newer {
                    seq: message.seq,
                    subject: message.subject.clone(),
                    event,
                });
            }
        }
        self.verified = true;
        self.last_seq = message.seq;
        if let Some(command_id) = message.command_id() {
            self.remember(command_id, message.seq);
        }
        Ok(())
    }

    /// A snapshot not yet verified must line up with the first message after it; otherwise
    /// the version header only describes (a full replay counts events, which is the truth).
    fn check_version(&self, message: &StoredMessage, expected: u64, found: u64) -> Result<()> {
        if !self.verified && found != expected {
            return Err(StoreError::VersionGap {
                seq: message.seq,
                subject: message.subject.clone(),
                expected,
                found,
            });
        }
        if found != expected {
            tracing::warn!(seq = message.seq, subject = %message.subject, expected, found, "a commit's entity version does not follow the history; counting events");
        }
        Ok(())
    }

    fn skip(&mut self, message: &StoredMessage, reason: &Foreign) {
        tracing::warn!(seq = message.seq, subject = %message.subject, reason = %reason, "skipping a message the store did not write");
        self.last_seq = message.seq;
        if self.foreign.len() == FOREIGN_LISTED {
            self.foreign.remove(0);
        }
        self.foreign.push(ForeignMessage::new(message, reason));
    }

    /// Foreign messages in its history that no operator has acknowledged.
    pub fn foreign(&self) -> &[ForeignMessage] {
        &self.foreign
    }

    /// Folds in a record this process just appended at `seq`.
    pub fn record_store_record(&mut self, seq: u64, command_id: &CommandId, record: &Record) {
        match record {
            Record::AcknowledgedForeign(ack) => {
                self.foreign.retain(|f| !ack.seqs.contains(&f.seq));
            }
        }
        self.last_seq = seq;
        self.verified = true;
        self.remember(command_id.as_str(), seq);
    }

    /// Folds in the events of a commit this process just appended at `seq`.
    pub fn record(&mut self, seq: u64, command_id: &CommandId, events: &[A::Event]) {
        for event in events {
            self.state.apply(event);
        }
        self.version += events.len() as u64;
        self.last_seq = seq;
        self.verified = true;
        self.remember(command_id.as_str(), seq);
    }

    /// The sequence at which this command was stored, if it is among the recent ones. A hash
    /// match is only a hint: callers confirm it against the stored message's header.
    pub fn recent_seq(&self, command_id: &CommandId) -> Option<u64> {
        let hash = fnv1a(command_id.as_str());
        self.recent
            .iter()
            .rev()
            .find(|(h, _)| *h == hash)
            .map(|(_, seq)| *seq)
    }

    /// Whether the recent commands are all it ever had (fewer than [`RECENT_COMMANDS`]): then
    /// a command id not among them was never used on this entity.
    pub fn remembers_every_command(&self) -> bool {
        self.recent.len() < RECENT_COMMANDS
    }

    /// Whether every command stored at or after `seq` is among the recent ones.
    pub fn remembers_since(&self, seq: u64) -> bool {
        self.remembers_every_command() || self.recent.front().is_some_and(|(_, at)| *at <= seq)
    }

    fn remember(&mut self, command_id: &str, seq: u64) {
        if self.recent.len() == RECENT_COMMANDS {
            self.recent.pop_front();
        }
        self.recent.push_back((fnv1a(command_id), seq));
    }

    /// Whether `every` events have been folded since the last snapshot this copy knows of.
    pub fn snapshot_due(&self, every: u64) -> bool {
        every > 0 && self.version >= self.snapshot.map_or(0, |s| s.version) + every
    }

    fn from_snapshot(id: A::Id, record: &SnapshotRecord, revision: u64) -> Option<Self> {
        if record.state_version != A::SNAPSHOT_VERSION {
            return None;
        }
        let state = Bincode::decode::<A>(&record.state).ok()?;
        Some(Self {
            id,
            state,
            version: record.version,
            last_seq: record.seq,
            recent: record.recent.iter().copied().collect(),
            foreign: record
                .foreign
                .iter()
                .map(|(seq, subject, reason)| ForeignMessage {
                    seq: *seq,
                    subject: subject.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            verified: false,
            snapshot: Some(SnapshotMark {
                revision,
                version: record.version,
            }),
        })
    }
}

/// FNV-1a, 64-bit: stable across Rust versions, unlike `DefaultHasher`, because it is stored.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl EventStore {
    /// Loads an entity: snapshot plus tail, falling back to the full history when the snapshot
    /// is missing, will not decode, or does not line up with the log.
    pub async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Entity<A>> {
        let key = snapshot_key(A::KIND, id.as_str());
        let snapshot = self.snapshots().get(&key).await;
        let revision = snapshot.as_ref().map(|(_, revision)| *revision);
        if let Some((record, revision)) = &snapshot {
            match Entity::from_snapshot(id.clone(), record, *revision) {
                Some(mut entity) => match self.catch_up(&mut entity).await {
                    Ok(_) => return Ok(entity),
                    Err(err @ StoreError::VersionGap { .. }) => {
                        tracing::warn!(%key, error = &err as &dyn std::error::Error, "snapshot does not line up with the log; replaying the full history");
                    }
                    Err(err) => return Err(err),
                },
                None => {
                    tracing::info!(%key, "snapshot of another state version; replaying the full history")
                }
            }
        }
        let mut entity = Entity::new(id.clone());
        self.catch_up(&mut entity).await?;
        // Keep the KV revision so the next snapshot write can compare-and-set over it.
        entity.snapshot = revision.map(|revision| SnapshotMark {
            revision,
            version: 0,
        });
        Ok(entity)
    }

    /// Folds every message stored after the entity's position; returns how many.
    pub async fn catch_up<A: Aggregate>(&self, entity: &mut Entity<A>) -> Result<usize> {
        let subject = self.subjects().event(A::KIND, entity.id.as_str());
        // With replicas, Direct Get may be answered by a follower that has not applied the
        // latest writes yet. The leader's last sequence on the subject, read first, is where
        // the tail must reach: it includes every write acknowledged before this read began.
        let floor = if self.config().replicas > 1 {
            Some(self.last_sequence_of(&subject).await?)
        } else {
            None
        };
        let mut tail = self
            .read_subject(&subject, entity.last_seq + 1, None)
            .await?;
        if let Some(floor) = floor {
            let reached = tail.last().map_or(entity.last_seq, |m| m.seq);
            if reached < floor {
                tail.extend(
                    self.read_subject_from_leader(&subject, reached + 1, floor)
                        .await?,
                );
            }
        }
        for message in &tail {
            entity.fold(message)?;
        }
        Ok(tail.len())
    }

    /// The entity as it was right after the message at `seq`: a full replay, for audits and for
    /// answering a retried command with its first reply.
    pub async fn load_as_of<A: Aggregate>(&self, id: &A::Id, seq: u64) -> Result<Entity<A>> {
        let subject = self.subjects().event(A::KIND, id.as_str());
        let mut entity = Entity::new(id.clone());
        for message in self.read_subject(&subject, 1, Some(seq)).await? {
            entity.fold(&message)?;
        }
        Ok(entity)
    }

    /// Writes a snapshot of `entity` (compare-and-set on the revision it knows). Failures are
    /// logged, not returned: a snapshot is only an optimisation.
    pub async fn save_snapshot<A: Aggregate>(&self, entity: &mut Entity<A>) {
        let key = snapshot_key(A::KIND, entity.id.as_str());
        let state = match Bincode::encode(&entity.state) {
            Ok(state) => state,
            Err(err) => {
                tracing::warn!(%key, error = &err as &dyn std::error::Error, "cannot encode snapshot");
                return;
            }
        };
        let record = SnapshotRecord {
            format: 0,
            state_version: A::SNAPSHOT_VERSION,
            seq: entity.last_seq,
            version: entity.version,
            recent: entity.recent.iter().copied().collect(),
            foreign: entity
                .foreign
                .iter()
                .map(|f| (f.seq, f.subject.clone(), f.reason.clone()))
                .collect(),
            state,
        };
        match self
            .snapshots()
            .put(&key, record, entity.snapshot.map(|s| s.revision))
            .await
        {
            Ok(revision) => {
                entity.snapshot = Some(SnapshotMark {
                    revision,
                    version: entity.version,
                });
            }
            Err(SnapshotError::Superseded { .. }) => {
                // Another writer got there first (an earlier owner of the shard). Learn the
                // revision it left, so the next snapshot compares-and-sets over it rather than
                // failing for the rest of this actor's life.
                entity.snapshot =
                    self.snapshots()
                        .revision(&key)
                        .await
                        .map(|revision| SnapshotMark {
                            revision,
                            version: 0,
                        });
            }
            Err(err) => {
                tracing::warn!(%key, error = &err as &dyn std::error::Error, "snapshot not written");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_reference_function() {
        // Known FNV-1a 64 values; a change here would orphan every stored snapshot's history.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
