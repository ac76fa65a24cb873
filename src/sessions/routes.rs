//! The sessions' routes: `session.schedule`, `cancel`, `get`, `list`, `logs`, and `pool.list`.

use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::Sessions;
use super::protocol::{
    ListPools, ListSessions, LogChunk, PoolList, ScheduleSession, Scheduled, SessionLogs,
    SessionRequest, parse_schedule,
};
use crate::api::routes::{
    self, CommandReply, GetReply, ListReply, MAX_PAGE, Mode, RouteSpec, json,
};
use crate::api::{ApiError, ApiRequest, Services};
use crate::domain::sessions::scheduler::{SchedulerView, UNKNOWN_POOL};
use crate::domain::sessions::session::{Session, SessionCommand, SessionView, Status};
use crate::domain::sessions::spec::describe;
use crate::domain::sessions::{ComponentKind, SchedulerId, SessionId};
use crate::domain::{Aggregate, ErrorKind};

const DEFAULT_PAGE: usize = 100;
const DEFAULT_LOG_CHUNK: usize = 64 * 1024;
const MAX_LOG_CHUNK: usize = 1024 * 1024;

/// Every sessions route.
pub fn specs() -> Vec<RouteSpec> {
    fn sessions(services: &Services) -> Option<Sessions> {
        services.get::<Sessions>()
    }
    vec![
        routes::custom::<ScheduleSession, CommandReply<Scheduled>, _>(
            Session::KIND,
            "schedule",
            Mode::Command,
            "Schedule a session; it runs once every machine it needs is free (not_found/unknown_pool, capacity/exceeds_pool_capacity if it never could)",
            sessions,
            schedule,
        )
        .with_entity(|request| routes::body_field(request, "id")),
        routes::command::<SessionRequest>(
            "Cancel a session: at once if it waits, through log collection and cleanup if it runs",
        ),
        routes::custom::<SessionRequest, GetReply<SessionView>, _>(
            Session::KIND,
            "get",
            Mode::Query,
            "Read one session, with its place in the queue and why it waits",
            sessions,
            get,
        )
        .with_entity(|request| routes::body_field(request, "id")),
        routes::custom::<ListSessions, ListReply<SessionId, SessionView>, _>(
            Session::KIND,
            "list",
            Mode::Query,
            "List sessions in id order, optionally those in one status",
            sessions,
            list,
        ),
        routes::custom::<SessionLogs, LogChunk, _>(
            Session::KIND,
            "logs",
            Mode::Query,
            "Read a component's output (the driver's by default) from an offset, live while it runs",
            sessions,
            logs,
        )
        .with_entity(|request| routes::body_field(request, "id")),
        routes::custom::<ListPools, PoolList, _>(
            "pool",
            "list",
            Mode::Query,
            "List the pools: capacity, machines reserved and free, and what waiting sessions need",
            sessions,
            pools,
        ),
    ]
}

/// The variables a component may not set: Switchyard sets them.
pub fn reserved(sessions: &Sessions) -> [&str; 4] {
    [
        "PORT",
        "SWITCHYARD_SESSION",
        "SWITCHYARD_COMPONENT",
        sessions.config.workers_env.as_str(),
    ]
}

async fn scheduler_view(sessions: &Sessions) -> Result<SchedulerView, ApiError> {
    let (view, _) = sessions.scheduler.read(SchedulerId::sessions()).await?;
    Ok(view.unwrap_or(SchedulerView {
        pools: vec![],
        executor_count: 0,
        running: vec![],
        queue: vec![],
    }))
}

fn schedule(
    sessions: Sessions,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body = parse_schedule(&request.body, &reserved(&sessions)).map_err(|problems| {
            ApiError::invalid(format!(
                "the session has {} problem{}: {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                describe(&problems)
            ))
        })?;
        let id = match body.id {
            Some(id) => id,
            None => SessionId::new(uuid::Uuid::now_v7().to_string())
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?,
        };
        let spec = crate::domain::sessions::SessionSpec {
            components: body.components,
        };
        // Refused now if it could never run: the original queued such a session for ever.
        let scheduler = scheduler_view(&sessions).await?.scheduler();
        if let Err(err) = scheduler.check_fits(&spec.demand()) {
            let reason = crate::domain::Rejection::reason(&err);
            let mut error = ApiError::new(crate::domain::Rejection::kind(&err), err.to_string());
            if let Some(reason) = reason {
                error = error.with_reason(reason);
            }
            if reason == Some(UNKNOWN_POOL) && scheduler.pools.is_empty() {
                error
                    .message
                    .push_str(" (no pool is configured: see [sessions] pools)");
            }
            return Err(error);
        }
        let timeout = body
            .timeout_ms
            .map_or(sessions.config.timeout, Duration::from_millis);
        let outcome = sessions
            .sessions
            .execute(
                id.clone(),
                SessionCommand::Schedule { spec, timeout },
                request.meta,
            )
            .await?;
        json(CommandReply {
            result: Scheduled {
                id,
                status: outcome.reply.status,
            },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

fn get(sessions: Sessions, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: SessionRequest = crate::api::body_as(&request)?;
        let (view, version) = sessions.sessions.read(body.id.clone()).await?;
        let Some(mut view) = view else {
            return Err(ApiError::not_found(format!(
                "session {:?} does not exist",
                body.id.as_str()
            )));
        };
        if view.status == Status::Queued {
            view.waiting = scheduler_view(&sessions)
                .await?
                .scheduler()
                .explain(&view.id);
        }
        json(GetReply {
            result: view,
            version,
        })
    })
}

fn list(sessions: Sessions, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: ListSessions = crate::api::body_as(&request)?;
        let limit = body.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::invalid(format!(
                "limit must be 1 to {MAX_PAGE}, not {limit}"
            )));
        }
        routes::caught_up(&sessions.table)?;
        let (result, next, position) = sessions
            .table
            .ask(move |table, position| {
                let start = body
                    .after
                    .as_ref()
                    .map_or(Bound::Unbounded, Bound::Excluded);
                let (views, next) = crate::api::routes::page(
                    table
                        .range(start)
                        .filter_map(|(id, row)| row.state.view(id))
                        .filter(|view| body.status.is_none_or(|status| view.status == status)),
                    limit,
                    |v: &SessionView| v.id.clone(),
                );
                (views, next, position)
            })
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("the session read model is not running: {e}"))
            })?;
        json(ListReply {
            result,
            next,
            position,
        })
    })
}

fn logs(sessions: Sessions, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: SessionLogs = crate::api::body_as(&request)?;
        let max = body.max_bytes.unwrap_or(DEFAULT_LOG_CHUNK);
        if !(1..=MAX_LOG_CHUNK).contains(&max) {
            return Err(ApiError::invalid(format!(
                "max_bytes must be 1 to {MAX_LOG_CHUNK}, not {max}"
            )));
        }
        let (view, _) = sessions.sessions.read(body.id.clone()).await?;
        let Some(view) = view else {
            return Err(ApiError::not_found(format!(
                "session {:?} does not exist",
                body.id.as_str()
            )));
        };
        let component = match body.component {
            Some(name) => view
                .components
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.name.clone())
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "session {:?} has no component {:?}",
                        body.id.as_str(),
                        name.as_str()
                    ))
                })?,
            None => view
                .components
                .iter()
                .find(|c| c.kind == ComponentKind::Driver)
                .map(|c| c.name.clone())
                .ok_or_else(|| ApiError::not_found("the session has no driver"))?,
        };
        let ended = view.cleaned_up_at.is_some();
        let chunk = |data: Vec<u8>, length: u64, source: &str, complete: bool| {
            let next_offset = body.offset + data.len() as u64;
            LogChunk {
                component: component.clone(),
                offset: body.offset,
                data: String::from_utf8_lossy(&data).into_owned(),
                next_offset,
                complete: complete && next_offset >= length,
                source: source.to_owned(),
            }
        };
        if let Some(stored) = view.logs.get(&component) {
            let data = sessions
                .logs
                .get(&stored.object)
                .await
                .map_err(|e| ApiError::unavailable(crate::runtime::error_chain(&e)))?
                .unwrap_or_default();
            let length = data.len() as u64;
            let start = usize::try_from(body.offset.min(length)).unwrap_or(usize::MAX);
            let end = start.saturating_add(max).min(data.len());
            return json(chunk(data[start..end].to_vec(), length, "store", true));
        }
        let read = sessions
            .backend
            .output(&body.id, &component, body.offset, max)
            .await
            .map_err(|e| ApiError::unavailable(crate::runtime::error_chain(&e)))?;
        match read {
            Some((data, length)) => json(chunk(data, length, "process", false)),
            // Not started, or gone with nothing kept: nothing more will come once it ended.
            None => json(chunk(Vec::new(), 0, "process", ended)),
        }
    })
}

fn pools(sessions: Sessions, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let _: ListPools = crate::api::body_as(&request)?;
        let view = scheduler_view(&sessions).await?;
        json(PoolList {
            executor_count: view.executor_count,
            running: view.running.len(),
            waiting: view.queue.len(),
            result: view.pools,
        })
    })
}
