//! What wrote a message on an entity's subject, and so what it is to that entity's history.
//!
//! The store accepts into an entity's history only what it wrote itself: a commit (the headers
//! it sets, naming the events its payload holds, which decode) or one of its own records (an
//! operator's acknowledgement). Anything else on the subject, a stray publish of garbage, a
//! message from another tool, is **foreign**: skipped by every reader, reported (log, metric,
//! `/readyz` detail), and never allowed to wedge the entity. A commit that names an event type or
//! version this build does not know is **newer**: written by a newer Switchyard, it is neither
//! skipped (that would act on a hole) nor applied; the reader stops until it is upgraded.
//!
//! This recognises mistakes and garbage, not a forger who writes well-formed commits: keeping
//! others from writing the stream at all is the job of NATS permissions (`deploy/`).

use serde::{Deserialize, Serialize};

use super::StoredMessage;
use crate::codec::{self, CodecError, Encoding, header};
use crate::domain::DomainEvent;
use crate::domain::event::EventCodecError;

/// The header naming a store record (a message of the store's own, not of the aggregate).
pub const RECORD: &str = "Switchyard-Record";
/// The record acknowledging foreign messages in an entity's history.
pub const ACKNOWLEDGE_FOREIGN: &str = "acknowledge_foreign";

/// What one message is to an entity's history.
#[derive(Debug)]
pub enum Provenance<E> {
    /// A commit the store wrote: its events (decoded and upcast) and the entity version it
    /// says the entity reached.
    Commit { events: Vec<E>, entity_version: u64 },
    /// One of the store's records; it changes no state, only the store's bookkeeping.
    Record { record: Record, entity_version: u64 },
    /// Not written by the store.
    Foreign(Foreign),
    /// Written by a newer Switchyard.
    Newer(NewerEvent),
}

/// A store record. Its JSON is the message's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcknowledgedForeign {
    /// The stream sequences of the foreign messages acknowledged.
    pub seqs: Vec<u64>,
    /// Why the operator says they may stay.
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    AcknowledgedForeign(AcknowledgedForeign),
}

impl Record {
    pub fn name(&self) -> &'static str {
        match self {
            Record::AcknowledgedForeign(_) => ACKNOWLEDGE_FOREIGN,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Record::AcknowledgedForeign(ack) => serde_json::to_value(ack).unwrap_or_default(),
        }
    }
}

/// Why a message is not the store's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Foreign {
    #[error("it has no {header} header")]
    MissingHeader { header: &'static str },
    #[error("its {header} header {value:?} is malformed")]
    MalformedHeader { header: &'static str, value: String },
    #[error("its payload does not decode: {reason}")]
    Payload { reason: String },
    #[error("its headers name events {headers:?} but its payload holds {payload:?}")]
    Mismatch { headers: String, payload: String },
    #[error("its subject names no entity of this kind")]
    Subject,
}

/// An event type or version this build cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_newer(.name, *.version, *.known))]
pub struct NewerEvent {
    pub name: String,
    pub version: u16,
    /// The newest version of `name` this build reads; `None` for a type it does not know.
    pub known: Option<u16>,
}

fn describe_newer(name: &str, version: u16, known: Option<u16>) -> String {
    match known {
        Some(known) => format!(
            "event {name} version {version}: this build reads {name} up to version {known}; upgrade it (new event versions roll out readers first)"
        ),
        None => format!(
            "event type {name} (version {version}) is unknown to this build; upgrade it (new event types roll out readers first)"
        ),
    }
}

/// A foreign message as readers report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ForeignMessage {
    pub seq: u64,
    pub subject: String,
    pub reason: String,
}

impl ForeignMessage {
    pub fn new(message: &StoredMessage, reason: &Foreign) -> Self {
        Self {
            seq: message.seq,
            subject: message.subject.clone(),
            reason: reason.to_string(),
        }
    }
}

/// What `message` is to the history of an entity of `kind`, whose events are `E`.
pub fn classify<E: DomainEvent>(kind: &str, message: &StoredMessage) -> Provenance<E> {
    match inspect::<E>(kind, message) {
        Ok(provenance) => provenance,
        Err(foreign) => Provenance::Foreign(foreign),
    }
}

fn inspect<E: DomainEvent>(kind: &str, message: &StoredMessage) -> Result<Provenance<E>, Foreign> {
    let required = |name: &'static str| {
        message
            .header(name)
            .filter(|v| !v.is_empty())
            .ok_or(Foreign::MissingHeader { header: name })
    };
    let entity_version: u64 = {
        let value = required(header::ENTITY_VERSION)?;
        value.parse().map_err(|_| Foreign::MalformedHeader {
            header: header::ENTITY_VERSION,
            value: value.to_owned(),
        })?
    };
    required(header::COMMAND_ID)?;
    if let Some(name) = message.header(RECORD) {
        return record(name, message).map(|record| Provenance::Record {
            record,
            entity_version,
        });
    }
    let types = required(header::EVENT_TYPE)?;
    let encoding = message.encoding().map_err(|e| Foreign::MalformedHeader {
        header: header::CONTENT_TYPE,
        value: e.to_string(),
    })?;
    let events = match codec::decode_events::<E>(&message.payload, encoding) {
        Ok(events) => events,
        Err(CodecError::Event(EventCodecError::UnknownType { name, version })) => {
            return newer_or_foreign::<E>(kind, name, version);
        }
        Err(err) => {
            return Err(Foreign::Payload {
                reason: crate::error_chain::error_chain(&err),
            });
        }
    };
    // The headers must name exactly the events the payload holds.
    let names_agree = types.split(',').count() == events.len()
        && types
            .split(',')
            .zip(&events)
            .all(|(name, event)| name.trim() == event.event_type().name);
    if !names_agree {
        return Err(Foreign::Mismatch {
            headers: types.to_owned(),
            payload: events
                .iter()
                .map(|e| e.event_type().name)
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    Ok(Provenance::Commit {
        events,
        entity_version,
    })
}

/// An event the payload names but this build cannot decode: newer if it is of this kind (a
/// known type at a higher version, or a new type under the kind's name), else foreign.
fn newer_or_foreign<E: DomainEvent>(
    kind: &str,
    name: String,
    version: u16,
) -> Result<Provenance<E>, Foreign> {
    let known = E::known_types()
        .into_iter()
        .filter(|t| t.name == name)
        .map(|t| t.version)
        .max();
    let of_kind = name
        .strip_prefix(kind)
        .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1);
    match known {
        Some(known) if version > known => Ok(Provenance::Newer(NewerEvent {
            name,
            version,
            known: Some(known),
        })),
        None if of_kind => Ok(Provenance::Newer(NewerEvent {
            name,
            version,
            known: None,
        })),
        _ => Err(Foreign::Payload {
            reason: format!("unknown event type {name} version {version}"),
        }),
    }
}

fn record(name: &str, message: &StoredMessage) -> Result<Record, Foreign> {
    let malformed = |reason: String| Foreign::Payload { reason };
    match name {
        ACKNOWLEDGE_FOREIGN => serde_json::from_slice(&message.payload)
            .map(Record::AcknowledgedForeign)
            .map_err(|e| malformed(format!("malformed {ACKNOWLEDGE_FOREIGN} record: {e}"))),
        other => Err(Foreign::MalformedHeader {
            header: RECORD,
            value: other.to_owned(),
        }),
    }
}

/// The acknowledged sequences, if `message` is an acknowledgement the store wrote.
pub fn acknowledged(message: &StoredMessage) -> Option<Vec<u64>> {
    message.header(RECORD)?;
    message.header(header::ENTITY_VERSION)?;
    message.header(header::COMMAND_ID)?;
    match record(message.header(RECORD)?, message) {
        Ok(Record::AcknowledgedForeign(ack)) => Some(ack.seqs),
        Err(_) => None,
    }
}

/// The payload and content type of a record.
pub fn encode_record(record: &Record) -> (bytes::Bytes, &'static str) {
    let json = serde_json::to_vec(&record.to_json()).unwrap_or_default();
    (bytes::Bytes::from(json), Encoding::Json.content_type())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;
    use crate::domain::counter::{Added, CounterEvent};
    use async_nats::HeaderMap;

    fn message(headers: &[(&str, &str)], payload: &[u8]) -> StoredMessage {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        StoredMessage {
            seq: 7,
            subject: "sy.evt.counter.c".to_owned(),
            stored_at: Timestamp::EPOCH,
            headers: map,
            payload: bytes::Bytes::copy_from_slice(payload),
        }
    }

    fn added() -> Vec<CounterEvent> {
        vec![CounterEvent::Added(Added {
            amount: 1,
            at: Timestamp::EPOCH,
        })]
    }

    fn commit_headers(types: &str) -> Vec<(&'static str, String)> {
        vec![
            (header::EVENT_TYPE, types.to_owned()),
            (header::SCHEMA_VERSION, "1".to_owned()),
            (header::ENTITY_VERSION, "2".to_owned()),
            (header::COMMAND_ID, "c1".to_owned()),
        ]
    }

    fn with(headers: &[(&'static str, String)], payload: &[u8]) -> StoredMessage {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        message(&headers, payload)
    }

    fn classify_counter(message: &StoredMessage) -> Provenance<CounterEvent> {
        classify::<CounterEvent>("counter", message)
    }

    #[test]
    fn a_commit_of_the_store_is_accepted() {
        let payload = codec::encode_events(&added(), Encoding::Bincode).unwrap();
        let message = with(&commit_headers("counter.added"), &payload);
        assert!(matches!(
            classify_counter(&message),
            Provenance::Commit {
                entity_version: 2,
                ..
            }
        ));
    }

    #[test]
    fn garbage_and_missing_headers_are_foreign() {
        // The publish found by hand: eight bytes, no headers.
        let garbage = message(&[], b"\x01\x02\x03\x04\x05\x06\x07\x08");
        assert!(matches!(
            classify_counter(&garbage),
            Provenance::Foreign(Foreign::MissingHeader { .. })
        ));
        let undecodable = with(&commit_headers("counter.added"), b"\x01\x02\x03");
        assert!(matches!(
            classify_counter(&undecodable),
            Provenance::Foreign(Foreign::Payload { .. })
        ));
        let payload = codec::encode_events(&added(), Encoding::Bincode).unwrap();
        let lying = with(&commit_headers("counter.created"), &payload);
        assert!(matches!(
            classify_counter(&lying),
            Provenance::Foreign(Foreign::Mismatch { .. })
        ));
        let mut bad_version = commit_headers("counter.added");
        bad_version[2].1 = "two".to_owned();
        assert!(matches!(
            classify_counter(&with(&bad_version, &payload)),
            Provenance::Foreign(Foreign::MalformedHeader { .. })
        ));
    }

    #[test]
    fn a_newer_version_or_type_of_the_kind_is_newer_and_another_kinds_is_foreign() {
        let mut headers = commit_headers("counter.added");
        headers.push((header::CONTENT_TYPE, "application/json".to_owned()));
        let newer = br#"[{"type":"counter.added","version":9,"data":{}}]"#;
        let Provenance::Newer(event) = classify_counter(&with(&headers, newer)) else {
            panic!("newer")
        };
        assert_eq!(event.known, Some(1));
        let new_type = br#"[{"type":"counter.reset","version":1,"data":{}}]"#;
        assert!(matches!(
            classify_counter(&with(&headers, new_type)),
            Provenance::Newer(NewerEvent { known: None, .. })
        ));
        let other_kind = br#"[{"type":"pod.added","version":1,"data":{}}]"#;
        assert!(matches!(
            classify_counter(&with(&headers, other_kind)),
            Provenance::Foreign(_)
        ));
        let prefix_only = br#"[{"type":"counterfeit.x","version":1,"data":{}}]"#;
        assert!(matches!(
            classify_counter(&with(&headers, prefix_only)),
            Provenance::Foreign(_)
        ));
    }

    #[test]
    fn records_are_read_back() {
        let record = Record::AcknowledgedForeign(AcknowledgedForeign {
            seqs: vec![3],
            note: "a stray publish".to_owned(),
        });
        let (payload, _) = encode_record(&record);
        let headers = [
            (RECORD, ACKNOWLEDGE_FOREIGN.to_owned()),
            (header::ENTITY_VERSION, "2".to_owned()),
            (header::COMMAND_ID, "r1".to_owned()),
        ];
        let message = with(&headers, &payload);
        assert!(
            matches!(classify_counter(&message), Provenance::Record { record: r, entity_version: 2 } if r == record)
        );
        assert_eq!(acknowledged(&message), Some(vec![3]));
        assert!(matches!(
            classify_counter(&with(&headers, b"{")),
            Provenance::Foreign(_)
        ));
    }
}
