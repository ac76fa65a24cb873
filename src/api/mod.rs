//! The command API over NATS: request/reply on `<prefix>.api.<kind>.<verb>` and fire-and-forget
//! on `<prefix>.cmd.<kind>.<verb>`, with JSON bodies and typed errors, announced as the NATS
//! micro service `switchyard`.
//!
//! A request body is a JSON object. Commands may carry `command_id` (in the body or the
//! `Switchyard-Command-Id` header): the same id is the same command, applied once, answered with
//! its first reply. `Switchyard-Principal` names the caller on the events.

pub mod auth;
pub mod catalog;
pub mod micro;
pub mod routes;
pub mod server;
pub mod work_queue;

use async_nats::HeaderMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{CommandId, ErrorKind, Principal};
use crate::runtime::{CommandError, CommandMeta, error_chain};

pub use catalog::{Services, routes};
pub use routes::{Mode, RouteSpec, Router};

pub const COMMAND_ID_HEADER: &str = "Switchyard-Command-Id";
pub const PRINCIPAL_HEADER: &str = "Switchyard-Principal";
/// The error code, for clients that read only headers.
pub const ERROR_CODE_HEADER: &str = "Switchyard-Error";
/// The error reason, when there is one.
pub const ERROR_REASON_HEADER: &str = "Switchyard-Error-Reason";

/// A typed API error: its code is one of [`ErrorKind`], its message is for humans, and an
/// optional reason narrows the code for programs (`unavailable` + `no_pods`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorKind,
    pub message: String,
    pub reason: Option<&'static str>,
}

impl ApiError {
    pub fn new(code: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// Narrows the code with a machine-readable reason, a `snake_case` word.
    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
                reason: self.reason.map(str::to_owned),
            },
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        ApiError {
            code: err.kind(),
            message: error_chain(&err),
            reason: err.reason(),
        }
    }
}

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    pub code: ErrorKind,
    pub message: String,
    /// Narrows `code` where programs need more, e.g. `no_pods`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A request, parsed from its NATS message but not yet from its route's body type.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub kind: String,
    pub verb: String,
    /// The body's fields, without `command_id`.
    pub body: Map<String, Value>,
    pub meta: CommandMeta,
}

/// Where a request's command id comes from when the caller gave none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// A new id, generated now: no earlier attempt can have used it.
    Fresh,
    /// One derived from where the request was found (a fire-and-forget command's stream
    /// sequence): a redelivery gets the same one.
    Derived,
}

/// Parses the parts every request shares. `default_id` supplies a command id when the caller
/// gave none; `source` says what kind of id it supplies.
pub fn parse_request(
    kind: &str,
    verb: &str,
    payload: &[u8],
    headers: Option<&HeaderMap>,
    max_payload: usize,
    source: IdSource,
    default_id: impl FnOnce() -> CommandId,
) -> Result<ApiRequest, ApiError> {
    if payload.len() > max_payload {
        return Err(ApiError::invalid(format!(
            "request body is {} bytes, the limit is {max_payload}",
            payload.len()
        )));
    }
    let mut body = if payload.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(ApiError::invalid(format!(
                    "request body must be a JSON object, not {}",
                    json_type(&other)
                )));
            }
            Err(err) => {
                return Err(ApiError::invalid(format!(
                    "request body is not JSON: {err}"
                )));
            }
        }
    };
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let from_body = match body.remove("command_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "command_id must be a string, not {}",
                json_type(&other)
            )));
        }
    };
    let (command_id, fresh) = match (from_body, header(COMMAND_ID_HEADER)) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(format!(
                "command_id {a:?} in the body differs from {COMMAND_ID_HEADER} {b:?}"
            )));
        }
        (Some(id), _) | (None, Some(id)) => (
            CommandId::new(id)
                .map_err(|e| ApiError::invalid(format!("invalid command_id: {e}")))?,
            false,
        ),
        (None, None) => (default_id(), source == IdSource::Fresh),
    };
    let principal = match header(PRINCIPAL_HEADER) {
        Some(p) => Principal::new(p)
            .map_err(|e| ApiError::invalid(format!("invalid {PRINCIPAL_HEADER}: {e}")))?,
        None => Principal::anonymous(),
    };
    Ok(ApiRequest {
        kind: kind.to_owned(),
        verb: verb.to_owned(),
        meta: CommandMeta {
            command_id,
            principal,
            // Only an id that may come again needs telling a retry from a reuse.
            digest: (!fresh).then(|| digest(kind, verb, &body)),
            fresh,
        },
        body,
    })
}

/// What a command says, as a short hex string: its route and its body without the command id,
/// keys sorted at every level. A retry carries the same body; the same id with another digest
/// is a reused id.
pub fn digest(kind: &str, verb: &str, body: &Map<String, Value>) -> String {
    fn object(map: &Map<String, Value>, out: &mut String) {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_unstable();
        out.push('{');
        for (i, key) in keys.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(key.clone()).to_string());
            out.push(':');
            canonical(&map[key], out);
        }
        out.push('}');
    }
    fn canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => object(map, out),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = format!("{kind}.{verb}\n");
    object(body, &mut text);
    let hash = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    hash.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Deserializes a route's body type, turning serde's complaint into an `invalid` error.
pub fn body_as<T: serde::de::DeserializeOwned>(request: &ApiRequest) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(request.body.clone())).map_err(|err| {
        ApiError::invalid(format!(
            "invalid {}.{} request: {err}",
            request.kind, request.verb
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(payload: &[u8]) -> Result<ApiRequest, ApiError> {
        parse_request(
            "counter",
            "add",
            payload,
            None,
            100,
            IdSource::Fresh,
            crate::runtime::new_command_id,
        )
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert_eq!(parse(b"[1]").unwrap_err().code, ErrorKind::Invalid);
        assert!(parse(b"{oops").unwrap_err().message.contains("not JSON"));
        assert!(parse(b"").unwrap().body.is_empty());
        assert!(
            parse(&[b' '; 101])
                .unwrap_err()
                .message
                .contains("limit is 100")
        );
    }

    #[test]
    fn a_digest_names_what_a_command_says_whatever_the_key_order() {
        let body = |json: &str| match serde_json::from_str::<Value>(json).unwrap() {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let a = digest(
            "counter",
            "add",
            &body(r#"{"id":"x","amount":3,"n":{"b":1,"a":2}}"#),
        );
        let b = digest(
            "counter",
            "add",
            &body(r#"{"n":{"a":2,"b":1},"amount":3,"id":"x"}"#),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        assert_ne!(
            a,
            digest("counter", "add", &body(r#"{"id":"x","amount":4}"#))
        );
        assert_ne!(
            digest("counter", "add", &body("{}")),
            digest("counter", "delete", &body("{}"))
        );
        // The command id is not part of what the command says.
        let with_id = parse(br#"{"command_id":"c1","id":"x"}"#).unwrap();
        let without = parse(br#"{"id":"x"}"#).unwrap();
        assert_eq!(
            with_id.meta.digest,
            Some(digest("counter", "add", &without.body))
        );
        assert!(!with_id.meta.fresh && without.meta.fresh);
        // A generated id is never retried: nothing to tell apart, no digest.
        assert_eq!(without.meta.digest, None);
    }

    #[test]
    fn command_ids_come_from_body_or_header_and_must_agree() {
        let request = parse(br#"{"command_id":"abc","id":"x"}"#).unwrap();
        assert_eq!(request.meta.command_id.as_str(), "abc");
        assert!(!request.body.contains_key("command_id"));
        let mut headers = HeaderMap::new();
        headers.insert(COMMAND_ID_HEADER, "def");
        let err = parse_request(
            "k",
            "v",
            br#"{"command_id":"abc"}"#,
            Some(&headers),
            100,
            IdSource::Fresh,
            crate::runtime::new_command_id,
        );
        assert!(err.unwrap_err().message.contains("differs"));
        let request = parse_request(
            "k",
            "v",
            b"{}",
            Some(&headers),
            100,
            IdSource::Fresh,
            crate::runtime::new_command_id,
        )
        .unwrap();
        assert_eq!(request.meta.command_id.as_str(), "def");
        assert_eq!(
            parse(br#"{"command_id":7}"#).unwrap_err().code,
            ErrorKind::Invalid
        );
        assert_eq!(
            parse(br#"{"command_id":""}"#).unwrap_err().code,
            ErrorKind::Invalid
        );
    }
}
