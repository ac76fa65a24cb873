//! `switchyard session ...` and `switchyard pool list`: schedule a session from a file, follow
//! it to its end, read its logs, as a table for people or JSON for scripts. Exit status 2 when
//! the control plane answers with an error (or the file has problems), 3 when a watched session
//! ends other than DONE.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::protocol::{
    ListPools, ListSessions, LogChunk, PoolList, Scheduled, SessionLogs, SessionRequest,
    parse_schedule,
};
use crate::api::routes::{CommandReply, GetReply, ListReply};
use crate::cli::{Output, Status, print_rows, print_value};
use crate::client::{ApiClient, ClientError};
use crate::domain::sessions::session::{SessionReply, SessionView};
use crate::domain::sessions::{ComponentName, SessionId, Status as SessionStatus};

/// How often `watch` and `logs --follow` look again.
const POLL: Duration = Duration::from_millis(250);

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Schedule the session in FILE (YAML or JSON; - for standard input). Every problem of a
    /// bad file is listed, and nothing is scheduled.
    Schedule {
        file: PathBuf,
        /// The session's id (else the file's `id`, else a new UUID).
        #[arg(long)]
        id: Option<SessionId>,
        /// How long it may run once admitted (else the file's `timeout_ms`, else the control
        /// plane's default).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Then follow it to its end, as `watch` does.
        #[arg(long)]
        watch: bool,
    },
    /// Show one session: status, components, and why it waits.
    Get { id: SessionId },
    /// List sessions.
    List {
        /// Only those in this status (QUEUED, ACCEPTED, PROVISIONING, RUNNING, DONE, ERROR,
        /// INTERNAL_ERROR).
        #[arg(long)]
        status: Option<String>,
    },
    /// Cancel a session.
    Cancel { id: SessionId },
    /// Print a component's output (the driver's by default).
    Logs {
        id: SessionId,
        #[arg(long)]
        component: Option<ComponentName>,
        /// Keep printing as it grows, until the session has ended.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print the session's states as they change, until it has ended.
    Watch { id: SessionId },
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// The pools: capacity, reserved, free, and what waiting sessions need.
    List,
}

/// The variables a component may not set, as the default configuration has them; the control
/// plane checks again with its own.
const RESERVED: [&str; 4] = [
    "PORT",
    "SWITCHYARD_SESSION",
    "SWITCHYARD_COMPONENT",
    "QPS_WORKERS",
];

pub async fn session(
    api: &ApiClient,
    command: SessionCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        SessionCommand::Schedule {
            file,
            id,
            timeout,
            watch,
        } => {
            let mut body = match read_session_file(&file) {
                Ok(body) => body,
                Err(problems) => {
                    for problem in problems {
                        let _ = writeln!(out, "{}: {problem}", file.display());
                    }
                    return Ok(2);
                }
            };
            if let Some(id) = id {
                body.insert("id".into(), serde_json::Value::String(id.to_string()));
            }
            if let Some(timeout) = timeout {
                body.insert(
                    "timeout_ms".into(),
                    serde_json::Value::from(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                );
            }
            if let Err(problems) = parse_schedule(&body, &RESERVED) {
                for problem in problems {
                    let _ = writeln!(out, "{}: {problem}", file.display());
                }
                return Ok(2);
            }
            let reply: CommandReply<Scheduled> = api.call("session.schedule", &body).await?;
            let id = reply.result.id.clone();
            print_value(out, output, &reply.result, || {
                format!("scheduled {} ({})", id, reply.result.status.as_str())
            })?;
            if watch {
                return follow_states(api, &id, output, out).await;
            }
            Ok(0)
        }
        SessionCommand::Get { id } => {
            let reply: GetReply<SessionView> =
                api.call("session.get", &SessionRequest { id }).await?;
            print_session(out, output, &reply.result)
        }
        SessionCommand::List { status } => {
            let status = match status {
                Some(text) => match serde_json::from_value::<SessionStatus>(
                    serde_json::Value::String(text.to_uppercase()),
                ) {
                    Ok(status) => Some(status),
                    Err(_) => {
                        let _ = writeln!(
                            out,
                            "unknown status {text:?}: QUEUED, ACCEPTED, PROVISIONING, RUNNING, DONE, ERROR or INTERNAL_ERROR"
                        );
                        return Ok(2);
                    }
                },
                None => None,
            };
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let body = ListSessions {
                    status,
                    after,
                    limit: Some(crate::api::routes::MAX_PAGE),
                };
                let page: ListReply<SessionId, SessionView> =
                    api.call("session.list", &body).await?;
                all.extend(page.result);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            print_sessions(out, output, &all)
        }
        SessionCommand::Cancel { id } => {
            let reply: CommandReply<SessionReply> = api
                .call("session.cancel", &SessionRequest { id: id.clone() })
                .await?;
            print_value(out, output, &reply.result, || {
                format!("{id}: {}", reply.result.status.as_str())
            })
        }
        SessionCommand::Logs {
            id,
            component,
            follow,
        } => {
            let mut offset = 0;
            loop {
                let body = SessionLogs {
                    id: id.clone(),
                    component: component.clone(),
                    offset,
                    max_bytes: None,
                };
                let chunk: LogChunk = api.call("session.logs", &body).await?;
                match output {
                    Output::Table => {
                        let _ = write!(out, "{}", chunk.data);
                    }
                    Output::Json => {
                        if !chunk.data.is_empty() {
                            let _ = writeln!(
                                out,
                                "{}",
                                serde_json::to_string(&chunk).unwrap_or_default()
                            );
                        }
                    }
                }
                let _ = out.flush();
                let more = chunk.next_offset > offset;
                offset = chunk.next_offset;
                if chunk.complete || (!follow && !more) {
                    return Ok(0);
                }
                if !more {
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        SessionCommand::Watch { id } => follow_states(api, &id, output, out).await,
    }
}

pub async fn pool(
    api: &ApiClient,
    command: PoolCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        PoolCommand::List => {
            let reply: PoolList = api.call("pool.list", &ListPools {}).await?;
            let rows = reply
                .result
                .iter()
                .map(|p| {
                    vec![
                        p.name.to_string(),
                        p.capacity.to_string(),
                        p.reserved.to_string(),
                        p.free.to_string(),
                        p.waiting.to_string(),
                    ]
                })
                .collect();
            let status = print_rows(
                out,
                output,
                &reply.result,
                &["POOL", "CAPACITY", "RESERVED", "FREE", "WAITING FOR"],
                rows,
            )?;
            if let Output::Table = output {
                let _ = writeln!(
                    out,
                    "\n{} of {} executors busy, {} sessions waiting",
                    reply.running, reply.executor_count, reply.waiting
                );
            }
            Ok(status)
        }
    }
}

/// Reads a session file (YAML, of which JSON is a part) into a request body.
fn read_session_file(
    file: &std::path::Path,
) -> Result<serde_json::Map<String, serde_json::Value>, Vec<String>> {
    let text = if file == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| vec![format!("cannot read standard input: {e}")])?;
        text
    } else {
        std::fs::read_to_string(file).map_err(|e| vec![format!("cannot read it: {e}")])?
    };
    match serde_yaml_ng::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(body)) => Ok(body),
        Ok(_) => Err(vec![
            "a session file is a mapping with components (and optionally id, timeout_ms)".into(),
        ]),
        Err(err) => Err(vec![format!("not YAML or JSON: {err}")]),
    }
}

/// Prints the session whenever it changes, until it has ended and been cleaned up.
async fn follow_states(
    api: &ApiClient,
    id: &SessionId,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    let mut last = String::new();
    loop {
        let reply: GetReply<SessionView> = api
            .call("session.get", &SessionRequest { id: id.clone() })
            .await?;
        let view = reply.result;
        let line = match output {
            Output::Json => serde_json::to_string(&view).unwrap_or_default(),
            Output::Table => progress(&view),
        };
        if line != last {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            last = line;
        }
        if view.cleaned_up_at.is_some() {
            return Ok(if view.status == SessionStatus::Done {
                0
            } else {
                3
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line: status, each component's health, why it waits or why it ended.
fn progress(view: &SessionView) -> String {
    let components: Vec<String> = view
        .components
        .iter()
        .map(|c| {
            format!(
                "{}={}",
                c.name,
                serde_json::to_value(c.health)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )
        })
        .collect();
    let mut line = format!(
        "{} {}  {}",
        view.id,
        view.status.as_str(),
        components.join(" ")
    );
    if let Some(waiting) = &view.waiting {
        line.push_str(&format!(
            "  (waiting, {} of {}: {})",
            waiting.position, waiting.of, waiting.reason
        ));
    }
    if let Some(reason) = &view.reason {
        line.push_str(&format!("  ({reason})"));
    }
    if view.status.is_finished() && view.cleaned_up_at.is_none() {
        line.push_str("  cleaning up");
    }
    line
}

fn print_session(
    out: &mut impl Write,
    output: Output,
    view: &SessionView,
) -> Result<Status, ClientError> {
    if let Output::Json = output {
        return print_value(out, output, view, String::new);
    }
    let _ = writeln!(out, "{}", progress(view));
    let rows = view
        .components
        .iter()
        .map(|c| {
            vec![
                c.name.to_string(),
                c.kind.to_string(),
                c.pool.to_string(),
                c.machine
                    .as_ref()
                    .map_or_else(|| "-".into(), ToString::to_string),
                c.address.clone().unwrap_or_else(|| "-".into()),
                serde_json::to_value(c.health)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                c.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let _ = writeln!(out);
    print_rows(
        out,
        output,
        &view.components,
        &[
            "COMPONENT",
            "KIND",
            "POOL",
            "MACHINE",
            "ADDRESS",
            "HEALTH",
            "DETAIL",
        ],
        rows,
    )
}

fn print_sessions(
    out: &mut impl Write,
    output: Output,
    sessions: &[SessionView],
) -> Result<Status, ClientError> {
    let rows = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.status.as_str().to_owned(),
                s.components.len().to_string(),
                s.queued_at.to_string(),
                s.finished_at.map_or_else(|| "-".into(), |t| t.to_string()),
                s.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_rows(
        out,
        output,
        sessions,
        &[
            "SESSION",
            "STATUS",
            "COMPONENTS",
            "QUEUED",
            "FINISHED",
            "REASON",
        ],
        rows,
    )
}
