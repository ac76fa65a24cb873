//! The wire form of a commit: one JetStream message per command, holding all its events, and
//! the headers that describe it. bincode 2 (serde) by default; JSON when the content type says so.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::domain::DomainEvent;
use crate::domain::event::{EventCodecError, Format, FormatError};

/// Header names on every event message.
pub mod header {
    /// Event type names, comma-separated, one per event in the payload.
    pub const EVENT_TYPE: &str = "Switchyard-Event-Type";
    /// Schema versions, comma-separated, aligned with `EVENT_TYPE`.
    pub const SCHEMA_VERSION: &str = "Switchyard-Schema-Version";
    /// The entity's version after the message's last event; versions count events, gapless.
    pub const ENTITY_VERSION: &str = "Switchyard-Entity-Version";
    pub const COMMAND_ID: &str = "Switchyard-Command-Id";
    pub const PRINCIPAL: &str = "Switchyard-Principal";
    /// A digest of what the command said (route and body); a retry carries the same one.
    pub const COMMAND_DIGEST: &str = "Switchyard-Command-Digest";
    /// `true` when the command id was generated for the command (the caller gave none): no
    /// retry can carry it, so the command index skips it.
    pub const COMMAND_ID_GENERATED: &str = "Switchyard-Command-Id-Generated";
    /// When the control plane decided the command (RFC 3339); the stream keeps its own time too.
    pub const RECORDED_AT: &str = "Switchyard-Recorded-At";
    /// The shard of the entity, the fencing token of the lease its owner held (the lease's
    /// revision when taken), and the replica that wrote it: who owned the shard at each commit.
    pub const SHARD: &str = "Switchyard-Shard";
    pub const FENCE: &str = "Switchyard-Fence";
    pub const REPLICA: &str = "Switchyard-Replica";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

pub const BINCODE_CONTENT_TYPE: &str = "application/vnd.switchyard.events+bincode";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The largest payload a decoder will allocate for; bounds hostile length prefixes.
pub const DECODE_LIMIT: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Bincode,
    Json,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Bincode => BINCODE_CONTENT_TYPE,
            Encoding::Json => JSON_CONTENT_TYPE,
        }
    }

    /// A missing content type means bincode, the default encoding.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, CodecError> {
        match content_type.map(|c| c.split(';').next().unwrap_or(c).trim()) {
            None | Some(BINCODE_CONTENT_TYPE) => Ok(Encoding::Bincode),
            Some(JSON_CONTENT_TYPE) => Ok(Encoding::Json),
            Some(other) => Err(CodecError::UnknownContentType {
                content_type: other.to_owned(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown content type {content_type:?}")]
    UnknownContentType { content_type: String },
    #[error("malformed {encoding:?} event payload")]
    MalformedPayload {
        encoding: Encoding,
        #[source]
        source: FormatError,
    },
    #[error("a commit must hold at least one event")]
    NoEvents,
    #[error(transparent)]
    Event(#[from] EventCodecError),
}

pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// bincode 2.0.1 through serde, standard configuration, with a decode limit.
#[derive(Debug)]
pub struct Bincode;

impl Format for Bincode {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| FormatError(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
        let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
        let (value, read) = bincode::serde::decode_from_slice(bytes, config)
            .map_err(|e| FormatError(e.to_string()))?;
        if read != bytes.len() {
            return Err(FormatError(format!(
                "{} trailing bytes",
                bytes.len() - read
            )));
        }
        Ok(value)
    }
}

#[derive(Debug)]
pub struct Json;

impl Format for Json {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec(value).map_err(|e| FormatError(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
        serde_json::from_slice(bytes).map_err(|e| FormatError(e.to_string()))
    }
}

#[derive(Serialize, Deserialize)]
struct BinaryEvent<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    version: u16,
    #[serde(borrow)]
    data: Cow<'a, [u8]>,
}

#[derive(Serialize, Deserialize)]
struct JsonEvent<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    version: u16,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// One event as stored: its type, the schema version it was written with, and its data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u16,
    pub data: serde_json::Value,
}

/// Encodes a commit's events into one payload.
pub fn encode_events<E: DomainEvent>(events: &[E], encoding: Encoding) -> Result<Bytes> {
    if events.is_empty() {
        return Err(CodecError::NoEvents);
    }
    let malformed = |source| CodecError::MalformedPayload { encoding, source };
    let bytes = match encoding {
        Encoding::Bincode => {
            let mut wire = Vec::with_capacity(events.len());
            for event in events {
                let kind = event.event_type();
                wire.push(BinaryEvent {
                    event_type: Cow::Borrowed(kind.name),
                    version: kind.version,
                    data: Cow::Owned(event.encode::<Bincode>()?),
                });
            }
            Bincode::encode(&wire).map_err(malformed)?
        }
        Encoding::Json => {
            let mut wire = Vec::with_capacity(events.len());
            for event in events {
                let kind = event.event_type();
                let data = String::from_utf8(event.encode::<Json>()?)
                    .map_err(|e| malformed(FormatError(e.to_string())))?;
                wire.push((
                    kind,
                    RawValue::from_string(data)
                        .map_err(|e| malformed(FormatError(e.to_string())))?,
                ));
            }
            let wire: Vec<JsonEvent<'_>> = wire
                .iter()
                .map(|(kind, data)| JsonEvent {
                    event_type: Cow::Borrowed(kind.name),
                    version: kind.version,
                    data,
                })
                .collect();
            Json::encode(&wire).map_err(malformed)?
        }
    };
    Ok(Bytes::from(bytes))
}

/// Decodes a commit's events, upcasting old schema versions.
pub fn decode_events<E: DomainEvent>(payload: &[u8], encoding: Encoding) -> Result<Vec<E>> {
    let malformed = |source| CodecError::MalformedPayload { encoding, source };
    let events = match encoding {
        Encoding::Bincode => {
            let wire: Vec<BinaryEvent<'_>> =
                Bincode::decode_borrowed(payload).map_err(malformed)?;
            wire.iter()
                .map(|e| E::decode::<Bincode>(&e.event_type, e.version, &e.data))
                .collect::<Result<Vec<_>, _>>()?
        }
        Encoding::Json => {
            let wire: Vec<JsonEvent<'_>> = serde_json::from_slice(payload)
                .map_err(|e| malformed(FormatError(e.to_string())))?;
            wire.iter()
                .map(|e| E::decode::<Json>(&e.event_type, e.version, e.data.get().as_bytes()))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    if events.is_empty() {
        return Err(CodecError::NoEvents);
    }
    Ok(events)
}

/// Decodes a commit into JSON for readers (audit): each event is upcast to its current schema,
/// and keeps the version it was stored with.
pub fn events_to_json<E: DomainEvent>(
    payload: &[u8],
    encoding: Encoding,
) -> Result<Vec<StoredEvent>> {
    let stored_versions = stored_types(payload, encoding)?;
    let events = decode_events::<E>(payload, encoding)?;
    events
        .iter()
        .zip(stored_versions)
        .map(|(event, (name, version))| {
            let data = event.encode::<Json>()?;
            let data = serde_json::from_slice(&data).map_err(|e| CodecError::MalformedPayload {
                encoding: Encoding::Json,
                source: FormatError(e.to_string()),
            })?;
            Ok(StoredEvent {
                event_type: name,
                version,
                data,
            })
        })
        .collect()
}

/// The `(type, version)` of each event in a payload, without decoding the event data.
pub fn stored_types(payload: &[u8], encoding: Encoding) -> Result<Vec<(String, u16)>> {
    let malformed = |source| CodecError::MalformedPayload { encoding, source };
    Ok(match encoding {
        Encoding::Bincode => {
            let wire: Vec<BinaryEvent<'_>> =
                Bincode::decode_borrowed(payload).map_err(malformed)?;
            wire.into_iter()
                .map(|e| (e.event_type.into_owned(), e.version))
                .collect()
        }
        Encoding::Json => {
            let wire: Vec<JsonEvent<'_>> = serde_json::from_slice(payload)
                .map_err(|e| malformed(FormatError(e.to_string())))?;
            wire.into_iter()
                .map(|e| (e.event_type.into_owned(), e.version))
                .collect()
        }
    })
}

impl Bincode {
    fn decode_borrowed<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, FormatError> {
        let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
        let (value, read) = bincode::serde::borrow_decode_from_slice(bytes, config)
            .map_err(|e| FormatError(e.to_string()))?;
        if read != bytes.len() {
            return Err(FormatError(format!(
                "{} trailing bytes",
                bytes.len() - read
            )));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;
    use crate::domain::counter::{Added, CounterEvent, Created};
    use proptest::prelude::*;

    fn sample() -> Vec<CounterEvent> {
        vec![
            CounterEvent::Created(Created {
                limit: Some(9),
                idle_ttl_ms: None,
                at: Timestamp::from_unix_nanos(5),
            }),
            CounterEvent::Added(Added {
                amount: 3,
                at: Timestamp::from_unix_nanos(6),
            }),
        ]
    }

    #[test]
    fn commits_round_trip_in_both_encodings() {
        for encoding in [Encoding::Bincode, Encoding::Json] {
            let bytes = encode_events(&sample(), encoding).unwrap();
            assert_eq!(
                decode_events::<CounterEvent>(&bytes, encoding).unwrap(),
                sample()
            );
        }
    }

    #[test]
    fn json_commits_are_readable_by_anyone() {
        let bytes = encode_events(&sample(), Encoding::Json).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value[0]["type"], "counter.created");
        assert_eq!(value[0]["version"], 2);
        assert_eq!(value[1]["data"]["amount"], 3);
    }

    #[test]
    fn unknown_types_and_versions_are_typed_errors() {
        let payload = br#"[{"type":"counter.created","version":9,"data":{}}]"#;
        let err = decode_events::<CounterEvent>(payload, Encoding::Json).unwrap_err();
        assert!(matches!(
            err,
            CodecError::Event(EventCodecError::UnknownType { version: 9, .. })
        ));
        let payload = br#"[{"type":"counter.added","version":1,"data":{"amount":"x"}}]"#;
        let err = decode_events::<CounterEvent>(payload, Encoding::Json).unwrap_err();
        assert!(matches!(
            err,
            CodecError::Event(EventCodecError::Malformed { .. })
        ));
        assert!(matches!(
            decode_events::<CounterEvent>(b"[]", Encoding::Json),
            Err(CodecError::NoEvents)
        ));
    }

    #[test]
    fn content_types_map_to_encodings() {
        assert_eq!(
            Encoding::from_content_type(None).unwrap(),
            Encoding::Bincode
        );
        assert_eq!(
            Encoding::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Encoding::Json
        );
        assert!(Encoding::from_content_type(Some("text/plain")).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_events::<CounterEvent>(&bytes, Encoding::Bincode);
            let _ = decode_events::<CounterEvent>(&bytes, Encoding::Json);
            let _ = stored_types(&bytes, Encoding::Bincode);
        }

        #[test]
        fn decoding_mutated_commits_never_panics(flip in 0usize..64, byte in any::<u8>()) {
            let mut bytes = encode_events(&sample(), Encoding::Bincode).unwrap().to_vec();
            let i = flip % bytes.len();
            bytes[i] = byte;
            let _ = decode_events::<CounterEvent>(&bytes, Encoding::Bincode);
        }
    }
}
