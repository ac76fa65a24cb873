//! `switchyard audit`: replays events from the log, filtered by entity, kind, time range or
//! sequence range, decoded to JSON whatever the stored encoding; and rebuilds an entity as it
//! was at any point in the log.

use std::collections::HashMap;
use std::io::Write;

use futures::StreamExt;
use serde::Serialize;

use crate::api::catalog::{AsOfError, Inspected, KindSpec, ViewAsOf, kinds};
use crate::codec::{StoredEvent, header};
use crate::domain::Timestamp;
use crate::store::{EventStore, Start, StoreError, StoredMessage};

/// Which messages to replay; every bound is inclusive.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kind: Option<String>,
    /// An entity id; needs `kind`.
    pub entity: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("an entity filter needs its kind: KIND/ID")]
    EntityWithoutKind,
    #[error("unknown kind {kind:?}; known kinds: {known}")]
    UnknownKind { kind: String, known: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AsOf(#[from] AsOfError),
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

/// One message of the log, decoded for a reader.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub stored_at: Timestamp,
    pub kind: String,
    pub entity: String,
    pub entity_version: Option<u64>,
    pub command_id: Option<String>,
    pub principal: Option<String>,
    pub recorded_at: Option<Timestamp>,
    pub traceparent: Option<String>,
    pub events: Vec<StoredEvent>,
    /// A record of the store itself (an operator's acknowledgement of foreign messages):
    /// `{"type": ..., ...}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// Why this message is not the store's, if it is not: every reader skips it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign: Option<String>,
    /// Why the events could not be decoded, if they could not (an unknown kind, or an event
    /// of a newer Switchyard).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn spec<'a>(
    specs: &'a HashMap<&'static str, KindSpec>,
    kind: &str,
) -> Result<&'a KindSpec, AuditError> {
    specs.get(kind).ok_or_else(|| {
        let mut known: Vec<&str> = specs.keys().copied().collect();
        known.sort_unstable();
        AuditError::UnknownKind {
            kind: kind.to_owned(),
            known: known.join(", "),
        }
    })
}

fn record(
    store: &EventStore,
    specs: &HashMap<&'static str, KindSpec>,
    message: &StoredMessage,
) -> AuditRecord {
    let (kind, entity) = store
        .subjects()
        .parse_event(&message.subject)
        .unwrap_or_default();
    let inspected = match specs.get(kind.as_str()) {
        Some(spec) => (spec.inspect)(message),
        None => Inspected::Newer(format!("unknown kind {kind:?}")),
    };
    let (mut events, mut record, mut foreign, mut error) = (Vec::new(), None, None, None);
    match inspected {
        Inspected::Events(decoded) => events = decoded,
        Inspected::Record(stored) => {
            let mut value = stored.to_json();
            if let Some(fields) = value.as_object_mut() {
                fields.insert("type".to_owned(), stored.name().into());
            }
            record = Some(value);
        }
        Inspected::Foreign(reason) => foreign = Some(reason),
        Inspected::Newer(reason) => error = Some(reason),
    }
    AuditRecord {
        seq: message.seq,
        stored_at: message.stored_at,
        kind,
        entity,
        entity_version: message.entity_version(),
        command_id: message.command_id().map(str::to_owned),
        principal: message.principal().map(str::to_owned),
        recorded_at: message.recorded_at(),
        traceparent: message.header(header::TRACEPARENT).map(str::to_owned),
        events,
        record,
        foreign,
        error,
    }
}

/// Replays the messages `filter` selects, oldest first, handing each to `sink`; returns how many.
/// It reads what the stream holds when it starts, then stops.
pub async fn replay(
    store: &EventStore,
    filter: &Filter,
    mut sink: impl FnMut(AuditRecord) -> Result<(), AuditError>,
) -> Result<u64, AuditError> {
    let specs: HashMap<&'static str, KindSpec> = kinds().into_iter().map(|k| (k.kind, k)).collect();
    let subjects = store.subjects();
    let subject = match (&filter.kind, &filter.entity) {
        (Some(kind), Some(id)) => {
            spec(&specs, kind)?;
            subjects.event(kind, id)
        }
        (Some(kind), None) => {
            spec(&specs, kind)?;
            subjects.events_of_kind(kind)
        }
        (None, Some(_)) => return Err(AuditError::EntityWithoutKind),
        (None, None) => subjects.all_events(),
    };
    let start = match (filter.from_seq, filter.since) {
        (Some(seq), _) => Start::Sequence(seq),
        (None, Some(time)) => Start::Time(time),
        (None, None) => Start::Sequence(1),
    };
    let (mut messages, pending) = store.follow(&subject, start).await?;
    let mut written = 0;
    for _ in 0..pending {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        if filter.to_seq.is_some_and(|to| message.seq > to)
            || filter.until.is_some_and(|until| message.stored_at > until)
            || filter.limit.is_some_and(|limit| written >= limit)
        {
            break;
        }
        if filter.since.is_some_and(|since| message.stored_at < since) {
            continue;
        }
        sink(record(store, &specs, &message))?;
        written += 1;
    }
    Ok(written)
}

/// The entity `kind`/`id` as it was right after sequence `seq` (the latest state if `None`).
pub async fn state_as_of(
    store: &EventStore,
    kind: &str,
    id: &str,
    seq: Option<u64>,
) -> Result<ViewAsOf, AuditError> {
    let specs: HashMap<&'static str, KindSpec> = kinds().into_iter().map(|k| (k.kind, k)).collect();
    let spec = spec(&specs, kind)?;
    Ok((spec.view_as_of)(store, id, seq.unwrap_or(u64::MAX)).await?)
}

/// Writes records as JSON lines.
pub fn write_json(out: &mut impl Write, record: &AuditRecord) -> Result<(), AuditError> {
    serde_json::to_writer(&mut *out, record).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// The table's header line.
pub fn write_table_header(out: &mut impl Write) -> Result<(), AuditError> {
    writeln!(
        out,
        "{:>8}  {:<30}  {:<24}  {:>5}  {:<12}  EVENTS",
        "SEQ", "STORED AT", "ENTITY", "VER", "PRINCIPAL"
    )?;
    Ok(())
}

/// Writes one record as table rows: one line per event.
pub fn write_table_row(out: &mut impl Write, record: &AuditRecord) -> Result<(), AuditError> {
    let entity = format!("{}/{}", record.kind, record.entity);
    let version = record
        .entity_version
        .map(|v| v.to_string())
        .unwrap_or_default();
    let principal = record.principal.as_deref().unwrap_or("");
    let mut lines: Vec<String> = record
        .events
        .iter()
        .map(|e| format!("{}@{} {}", e.event_type, e.version, e.data))
        .collect();
    if let Some(stored) = &record.record {
        lines.push(format!("(record) {stored}"));
    }
    if let Some(reason) = &record.foreign {
        lines.push(format!("(not written by Switchyard, skipped: {reason})"));
    }
    if let Some(error) = &record.error {
        lines.push(format!("(undecodable: {error})"));
    }
    for (i, line) in lines.iter().enumerate() {
        if i == 0 {
            writeln!(
                out,
                "{:>8}  {:<30}  {:<24}  {:>5}  {:<12}  {line}",
                record.seq,
                record.stored_at.to_string(),
                entity,
                version,
                principal
            )?;
        } else {
            writeln!(
                out,
                "{:>8}  {:<30}  {:<24}  {:>5}  {:<12}  {line}",
                "", "", "", "", ""
            )?;
        }
    }
    Ok(())
}
