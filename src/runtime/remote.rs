//! Commands and reads of one entity, handed from a replica that does not own its shard to the
//! replica that does, over NATS request/reply on `<prefix>.replica.<owner>.entity.<kind>`.
//! The envelope is internal (JSON, both ends are Switchyard of the same release family); only
//! replicas can publish there (the subjects are not exported from Switchyard's account).
//!
//! The owner runs what it receives only if it still owns the shard; otherwise it answers
//! `shard_moved` and the sender looks again. It never forwards further, so nothing loops.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::entity::Acknowledged;
use super::{CommandError, CommandMeta, Outcome};
use crate::domain::{Aggregate, CommandId, EntityId, ErrorKind, Principal};
use crate::store::provenance::ForeignMessage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Envelope {
    Execute {
        id: String,
        command: Value,
        meta: WireMeta,
    },
    Read {
        id: String,
    },
    Acknowledge {
        id: String,
        seqs: Option<Vec<u64>>,
        note: String,
        meta: WireMeta,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireMeta {
    command_id: String,
    principal: String,
    digest: Option<String>,
    fresh: bool,
}

impl From<&CommandMeta> for WireMeta {
    fn from(meta: &CommandMeta) -> Self {
        Self {
            command_id: meta.command_id.as_str().to_owned(),
            principal: meta.principal.as_str().to_owned(),
            digest: meta.digest.clone(),
            fresh: meta.fresh,
        }
    }
}

impl WireMeta {
    fn into_meta(self) -> Result<CommandMeta, String> {
        Ok(CommandMeta {
            command_id: CommandId::new(self.command_id).map_err(|e| e.to_string())?,
            principal: Principal::new(self.principal).map_err(|e| e.to_string())?,
            digest: self.digest,
            fresh: self.fresh,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireResult {
    Ok(Value),
    Err(WireError),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    kind: ErrorKind,
    message: String,
    reason: Option<String>,
    definite: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireOutcome {
    reply: Value,
    version: u64,
    seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireRead {
    view: Option<Value>,
    version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireAcknowledged {
    acknowledged: Vec<u64>,
    remaining: Vec<ForeignMessage>,
    seq: u64,
}

/// Reasons are `&'static str` everywhere else; a peer's come from the same small set of
/// constants, so they are interned (bounded: beyond 256 distinct ones, they are dropped).
fn intern(reason: &str) -> Option<&'static str> {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = seen.get(reason) {
        return Some(known);
    }
    if seen.len() >= 256 || reason.len() > 64 {
        return None;
    }
    let leaked: &'static str = Box::leak(reason.to_owned().into_boxed_str());
    seen.insert(leaked);
    Some(leaked)
}

impl From<&CommandError> for WireError {
    fn from(err: &CommandError) -> Self {
        Self {
            kind: err.kind(),
            message: crate::error_chain::error_chain(err),
            reason: err.reason().map(str::to_owned),
            definite: err.is_definite(),
        }
    }
}

impl From<WireError> for CommandError {
    fn from(err: WireError) -> Self {
        CommandError::Remote {
            kind: err.kind,
            message: err.message,
            reason: err.reason.as_deref().and_then(intern),
            definite: err.definite,
        }
    }
}

fn encode(result: Result<Value, CommandError>) -> Bytes {
    let wire = match result {
        Ok(value) => WireResult::Ok(value),
        Err(err) => WireResult::Err(WireError::from(&err)),
    };
    serde_json::to_vec(&wire).unwrap_or_default().into()
}

fn to_value(value: impl Serialize) -> Result<Value, CommandError> {
    serde_json::to_value(value).map_err(|e| CommandError::Rejected {
        kind: ErrorKind::Internal,
        message: format!("cannot encode a reply for another replica: {e}"),
        reason: None,
    })
}

/// Asks the replica that owns an entity.
pub struct Peer<'a> {
    pub client: &'a Client,
    pub subject: String,
    pub replica: &'a str,
    pub kind: &'static str,
    pub id: &'a str,
}

impl Peer<'_> {
    async fn call(&self, envelope: &Envelope) -> Result<Value, CommandError> {
        let unreachable = |reason: String, definite: bool| CommandError::Unreachable {
            kind: self.kind,
            id: self.id.to_owned(),
            replica: self.replica.to_owned(),
            reason,
            definite,
        };
        let body = serde_json::to_vec(envelope)
            .map_err(|e| unreachable(format!("cannot encode the request: {e}"), true))?;
        let mut headers = HeaderMap::new();
        crate::telemetry::inject(&tracing::Span::current(), &mut headers);
        let reply = self
            .client
            .request_with_headers(self.subject.clone(), headers, body.into())
            .await
            .map_err(|e| {
                let definite = e.kind() == async_nats::client::RequestErrorKind::NoResponders;
                unreachable(e.to_string(), definite)
            })?;
        match serde_json::from_slice::<WireResult>(&reply.payload) {
            Ok(WireResult::Ok(value)) => Ok(value),
            Ok(WireResult::Err(err)) => Err(err.into()),
            Err(e) => Err(unreachable(format!("its reply does not parse: {e}"), false)),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, value: Value) -> Result<T, CommandError> {
        serde_json::from_value(value).map_err(|e| CommandError::Unreachable {
            kind: self.kind,
            id: self.id.to_owned(),
            replica: self.replica.to_owned(),
            reason: format!("its reply does not parse: {e}"),
            definite: false,
        })
    }

    pub async fn execute<A: Aggregate>(
        &self,
        command: &A::Command,
        meta: &CommandMeta,
    ) -> Result<Outcome<A::Reply>, CommandError> {
        let envelope = Envelope::Execute {
            id: self.id.to_owned(),
            command: to_value(command)?,
            meta: meta.into(),
        };
        let outcome: WireOutcome = self.decode(self.call(&envelope).await?)?;
        Ok(Outcome {
            reply: self.decode(outcome.reply)?,
            version: outcome.version,
            seq: outcome.seq,
        })
    }

    pub async fn read<A: Aggregate>(&self) -> Result<(Option<A::View>, u64), CommandError> {
        let envelope = Envelope::Read {
            id: self.id.to_owned(),
        };
        let read: WireRead = self.decode(self.call(&envelope).await?)?;
        let view = read.view.map(|v| self.decode(v)).transpose()?;
        Ok((view, read.version))
    }

    pub async fn acknowledge(
        &self,
        seqs: Option<Vec<u64>>,
        note: String,
        meta: &CommandMeta,
    ) -> Result<Acknowledged, CommandError> {
        let envelope = Envelope::Acknowledge {
            id: self.id.to_owned(),
            seqs,
            note,
            meta: meta.into(),
        };
        let done: WireAcknowledged = self.decode(self.call(&envelope).await?)?;
        Ok(Acknowledged {
            acknowledged: done.acknowledged,
            remaining: done.remaining,
            seq: done.seq,
        })
    }
}

/// The answer to an entity request for a kind this build does not serve.
pub fn unknown_kind(kind: &str) -> Bytes {
    encode(Err(CommandError::Rejected {
        kind: ErrorKind::NotFound,
        message: format!("this replica serves no entity kind {kind:?}"),
        reason: None,
    }))
}

/// The owner's side: one per kind, answering envelopes for entities of its shards.
pub trait Endpoint: Send + Sync {
    fn kind(&self) -> &'static str;
    fn handle(&self, payload: Bytes) -> BoxFuture<'static, Bytes>;
}

impl<A: Aggregate> Endpoint for super::Entities<A> {
    fn kind(&self) -> &'static str {
        A::KIND
    }

    fn handle(&self, payload: Bytes) -> BoxFuture<'static, Bytes> {
        let entities = self.clone();
        Box::pin(async move {
            let invalid = |message: String| {
                encode(Err(CommandError::Rejected {
                    kind: ErrorKind::Invalid,
                    message,
                    reason: None,
                }))
            };
            let envelope: Envelope = match serde_json::from_slice(&payload) {
                Ok(envelope) => envelope,
                Err(e) => return invalid(format!("not an entity request: {e}")),
            };
            let id_of =
                |id: String| A::Id::parse(&id).map_err(|e| format!("invalid {} id: {e}", A::KIND));
            match envelope {
                Envelope::Execute { id, command, meta } => {
                    let (id, command, meta) = match (
                        id_of(id),
                        serde_json::from_value::<A::Command>(command),
                        meta.into_meta(),
                    ) {
                        (Ok(id), Ok(command), Ok(meta)) => (id, command, meta),
                        (Err(e), _, _) | (_, _, Err(e)) => return invalid(e),
                        (_, Err(e), _) => return invalid(format!("invalid command: {e}")),
                    };
                    let result = entities.execute_here(id, command, meta).await;
                    encode(result.and_then(|o| {
                        to_value(WireOutcome {
                            reply: to_value(o.reply)?,
                            version: o.version,
                            seq: o.seq,
                        })
                    }))
                }
                Envelope::Read { id } => {
                    let id = match id_of(id) {
                        Ok(id) => id,
                        Err(e) => return invalid(e),
                    };
                    let result = entities.read_here(id).await;
                    encode(result.and_then(|(view, version)| {
                        to_value(WireRead {
                            view: view.map(to_value).transpose()?,
                            version,
                        })
                    }))
                }
                Envelope::Acknowledge {
                    id,
                    seqs,
                    note,
                    meta,
                } => {
                    let (id, meta) = match (id_of(id), meta.into_meta()) {
                        (Ok(id), Ok(meta)) => (id, meta),
                        (Err(e), _) | (_, Err(e)) => return invalid(e),
                    };
                    let result = entities.acknowledge_here(id, seqs, note, meta).await;
                    encode(result.and_then(|done| {
                        to_value(WireAcknowledged {
                            acknowledged: done.acknowledged,
                            remaining: done.remaining,
                            seq: done.seq,
                        })
                    }))
                }
            }
        })
    }
}
