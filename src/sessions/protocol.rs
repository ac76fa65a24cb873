//! The sessions' requests and replies, as callers send and receive them: shared by the routes
//! and the CLI. Nothing here imports the server.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::CommandRequest;
use crate::domain::sessions::scheduler::PoolView;
use crate::domain::sessions::spec::{MAX_TIMEOUT, Problem, SessionSpec};
use crate::domain::sessions::{
    ComponentName, ComponentSpec, Session, SessionCommand, SessionId, Status,
};

/// `session.schedule`: a new session. It waits in the queue until every machine it needs is
/// free, then runs. Refused at once (and nothing recorded) if it is invalid, names a pool that
/// does not exist (`not_found`/`unknown_pool`) or needs more machines than a pool has
/// (`capacity`/`exceeds_pool_capacity`).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSession {
    /// The session's id; a new UUID if absent. Scheduling an id that exists is
    /// `already_exists` (a retry with the same `command_id` gets its first reply instead).
    #[serde(default)]
    pub id: Option<SessionId>,
    /// One driver, and any servers and clients.
    pub components: Vec<ComponentSpec>,
    /// How long it may take from admission to the end; `sessions.timeout` (15 minutes) if
    /// absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Names one session: `session.get`, `session.cancel`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    pub id: SessionId,
}

/// `session.cancel`: stop it. A waiting session ends at once (ERROR, cancelled); a running one
/// is stopped, its logs kept and its processes removed. Cancelling an ended one changes
/// nothing.
impl CommandRequest for SessionRequest {
    type Aggregate = Session;
    const VERB: &'static str = "cancel";

    fn into_command(self) -> (SessionId, SessionCommand) {
        (self.id, SessionCommand::Cancel)
    }
}

/// The reply to `session.schedule`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Scheduled {
    pub id: SessionId,
    pub status: Status,
}

/// `session.list`: sessions in id order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSessions {
    /// Only sessions in this state.
    #[serde(default)]
    pub status: Option<Status>,
    pub after: Option<SessionId>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// `session.logs`: a component's output (the driver's by default), from `offset`. While the
/// session runs it is read from the running process; once stored, from the log bucket.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionLogs {
    pub id: SessionId,
    #[serde(default)]
    pub component: Option<ComponentName>,
    /// The byte to start at; 0 by default.
    #[serde(default)]
    pub offset: u64,
    /// At most this many bytes, 1 to 1048576; 65536 by default.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogChunk {
    pub component: ComponentName,
    pub offset: u64,
    /// The bytes read, as UTF-8 (invalid sequences replaced).
    pub data: String,
    /// Pass as `offset` for the next chunk.
    pub next_offset: u64,
    /// Nothing more will come: the session has ended and this is the end of what was kept.
    pub complete: bool,
    /// Where it was read from: `process` (running) or `store` (kept after the end).
    pub source: String,
}

/// The reply to `pool.list`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PoolList {
    pub result: Vec<PoolView>,
    pub executor_count: u32,
    /// Sessions admitted and not yet released.
    pub running: usize,
    /// Sessions waiting for machines.
    pub waiting: usize,
}

/// `pool.list` takes no field.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListPools {}

/// Parses a `session.schedule` body (or a session file) and lists every problem at once, each
/// with where it is: unknown fields, each component that does not parse, and every rule of
/// `SessionSpec::problems` (`reserved`: the variables the control plane sets).
pub fn parse_schedule(
    body: &serde_json::Map<String, serde_json::Value>,
    reserved: &[&str],
) -> Result<ScheduleSession, Vec<Problem>> {
    let mut problems = Vec::new();
    let problem = |at: &str, message: String| Problem {
        at: at.to_owned(),
        message,
    };
    for field in body.keys() {
        if !matches!(field.as_str(), "id" | "components" | "timeout_ms") {
            problems.push(problem(
                field,
                "unknown field; expected id, components or timeout_ms".to_owned(),
            ));
        }
    }
    let id = match body.get("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => match SessionId::new(id.clone()) {
            Ok(id) => Some(id),
            Err(err) => {
                problems.push(problem("id", err.to_string()));
                None
            }
        },
        Some(_) => {
            problems.push(problem("id", "must be a string".to_owned()));
            None
        }
    };
    let timeout_ms = match body.get("timeout_ms") {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(0) | None => {
                problems.push(problem(
                    "timeout_ms",
                    "must be a whole number of milliseconds, at least 1".to_owned(),
                ));
                None
            }
            Some(ms) if ms > u64::try_from(MAX_TIMEOUT.as_millis()).unwrap_or(u64::MAX) => {
                problems.push(problem(
                    "timeout_ms",
                    format!("is more than {} s", MAX_TIMEOUT.as_secs()),
                ));
                None
            }
            Some(ms) => Some(ms),
        },
    };
    let mut components = Vec::new();
    // Where each parsed component was in the list.
    let mut positions = Vec::new();
    let mut unparsed = false;
    match body.get("components") {
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match serde_json::from_value::<ComponentSpec>(item.clone()) {
                    Ok(component) => {
                        components.push(component);
                        positions.push(i);
                    }
                    Err(err) => {
                        unparsed = true;
                        problems.push(problem(&format!("components[{i}]"), err.to_string()));
                    }
                }
            }
        }
        Some(_) => problems.push(problem("components", "must be a list".to_owned())),
        None => problems.push(problem(
            "components",
            "is missing: a session needs a driver".to_owned(),
        )),
    }
    let spec = SessionSpec { components };
    for found in spec.problems(reserved) {
        // Rules about the whole list (one driver) wait until every component parses.
        let Some(rest) = found.at.strip_prefix("components[") else {
            if !unparsed {
                problems.push(found);
            }
            continue;
        };
        let (index, field) = rest.split_once(']').unwrap_or((rest, ""));
        let position = index
            .parse::<usize>()
            .ok()
            .and_then(|j| positions.get(j))
            .map_or_else(|| index.to_owned(), ToString::to_string);
        // A duplicate's message names the other component by its index, too.
        let message = remap(&found.message, &positions);
        problems.push(problem(&format!("components[{position}]{field}"), message));
    }
    problems.sort_by(|a, b| a.at.cmp(&b.at));
    if problems.is_empty() {
        Ok(ScheduleSession {
            id,
            components: spec.components,
            timeout_ms,
        })
    } else {
        Err(problems)
    }
}

/// Rewrites each `components[j]` in `text` to `components[positions[j]]`.
fn remap(text: &str, positions: &[usize]) -> String {
    const MARK: &str = "components[";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at + MARK.len()]);
        rest = &rest[at + MARK.len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        match rest[..digits]
            .parse::<usize>()
            .ok()
            .and_then(|j| positions.get(j))
        {
            Some(position) => out.push_str(&position.to_string()),
            None => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_bad_session_file_gets_every_problem_with_where_it_is() {
        let problems = parse_schedule(
            &body(serde_json::json!({
                "id": "",
                "timeout_ms": 0,
                "colour": "blue",
                "components": [
                    {"name": "Bad Name", "kind": "server", "pool": "local", "command": "x"},
                    {"name": "s", "kind": "server", "pool": "local", "command": "x", "env": {"PORT": "1"}},
                    {"name": "s", "kind": "driver", "pool": "local", "command": "x", "comand": "y"},
                    {"name": "d", "kind": "driver", "pool": "local", "command": ""}
                ]
            })),
            &["PORT"],
        )
        .unwrap_err();
        let at: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "colour",
                "components[0]",
                "components[1].env.PORT",
                "components[2]",
                "components[3].command",
                "id",
                "timeout_ms"
            ],
            "{problems:#?}"
        );
        assert!(
            problems[3].message.contains("unknown field `comand`"),
            "{problems:#?}"
        );
    }

    #[test]
    fn indices_in_messages_name_the_component_in_the_file() {
        let problems = parse_schedule(
            &body(serde_json::json!({
                "components": [
                    {"name": "x", "kind": "nope", "pool": "local", "command": "x"},
                    {"name": "s", "kind": "server", "pool": "local", "command": "x"},
                    {"name": "s", "kind": "driver", "pool": "local", "command": "x"}
                ]
            })),
            &[],
        )
        .unwrap_err();
        assert_eq!(problems[1].at, "components[2].name");
        assert_eq!(
            problems[1].message,
            "\"s\" is also the name of components[1]"
        );
    }

    #[test]
    fn a_good_body_parses() {
        let parsed = parse_schedule(
            &body(serde_json::json!({
                "id": "s1",
                "timeout_ms": 1000,
                "components": [
                    {"name": "d", "kind": "driver", "pool": "local", "command": "true",
                     "readiness": {"tcp": {}}}
                ]
            })),
            &[],
        )
        .unwrap();
        assert_eq!(parsed.id.unwrap().as_str(), "s1");
        assert_eq!(parsed.timeout_ms, Some(1000));
    }
}
