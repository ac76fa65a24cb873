//! The lessons' routes: `lesson.list`, `get`, `reload`, `request`; `livelesson.get`, `list`,
//! `keep_alive`, `kill`; `livesession.create`, `get`, `list`, `set_persistent`, `kill`.

use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::Lessons;
use super::protocol::{
    CreateLiveSession, GetLesson, KeepAlive, LessonList, LessonReply, LessonRequested, ListLessons,
    ListLiveLessons, LiveLessonRequest, LiveSessionCreated, LiveSessionKilled, LiveSessionRequest,
    ReloadCatalog, Reloaded, RequestLesson, SetPersistent,
};
use crate::api::routes::{
    self, CommandReply, GetReply, ListReply, MAX_PAGE, Mode, RouteSpec, json,
};
use crate::api::{ApiError, ApiRequest, Services};
use crate::domain::lessons::catalog::{PresentationKind, summary};
use crate::domain::lessons::livelesson::{KillReason, LiveLessonCommand, LiveLessonView};
use crate::domain::lessons::livesession::LiveSessionCommand;
use crate::domain::lessons::{CatalogId, LiveLesson, LiveLessonId, LiveSession, LiveSessionId};
use crate::domain::{Aggregate, ErrorKind};
use crate::runtime::{CommandMeta, derived_command_id, error_chain};

const DEFAULT_PAGE: usize = 100;

/// Every lessons route.
pub fn specs() -> Vec<RouteSpec> {
    fn lessons(services: &Services) -> Option<Lessons> {
        services.get::<Lessons>()
    }
    vec![
        routes::custom::<ListLessons, LessonList, _>(
            "lesson",
            "list",
            Mode::Query,
            "List the lessons of the catalog in force, with its digest",
            lessons,
            list_lessons,
        ),
        routes::custom::<GetLesson, LessonReply, _>(
            "lesson",
            "get",
            Mode::Query,
            "Read one lesson of the catalog whole: endpoints, connections, stages, guides and scripts",
            lessons,
            get_lesson,
        ),
        routes::custom::<ReloadCatalog, CommandReply<Reloaded>, _>(
            "lesson",
            "reload",
            Mode::Command,
            "Read the configured curriculum again and put it in force if every lesson is valid (invalid lists every problem; nothing changes)",
            lessons,
            reload,
        ),
        routes::custom::<RequestLesson, CommandReply<LessonRequested>, _>(
            "lesson",
            "request",
            Mode::Command,
            "Request a lesson for a live session: create its live lesson, keep it alive, or change its stage",
            lessons,
            request,
        )
        .with_entity(|request| routes::body_field(request, "session")),
        routes::custom::<LiveLessonRequest, GetReply<LiveLessonView>, _>(
            LiveLesson::KIND,
            "get",
            Mode::Query,
            "Read one live lesson: status, reachability, endpoints and how to reach them, the error and its output",
            lessons,
            get_live_lesson,
        )
        .with_entity(|request| routes::body_field(request, "id")),
        routes::custom::<ListLiveLessons, ListReply<LiveLessonId, LiveLessonView>, _>(
            LiveLesson::KIND,
            "list",
            Mode::Query,
            "List live lessons in id order, optionally one session's or those in one status",
            lessons,
            list_live_lessons,
        ),
        routes::command::<KeepAlive>("Keep a live lesson alive: garbage collection counts from now"),
        routes::command::<LiveLessonRequest>(
            "Kill a live lesson: the scheduler deletes everything the backend has of it",
        ),
        routes::custom::<CreateLiveSession, CommandReply<LiveSessionCreated>, _>(
            LiveSession::KIND,
            "create",
            Mode::Command,
            "Create a live session (capacity/session_limit past lessons.session_limit for its source)",
            lessons,
            create_session,
        )
        .with_entity(|request| routes::body_field(request, "id")),
        routes::get::<LiveSession>("Read one live session: its lessons, TTL and persistence"),
        routes::list::<LiveSession>("List live sessions in id order"),
        routes::command::<SetPersistent>("Set whether a live session's lessons outlive their TTL"),
        routes::custom::<LiveSessionRequest, CommandReply<LiveSessionKilled>, _>(
            LiveSession::KIND,
            "kill",
            Mode::Command,
            "End a live session and kill every lesson it holds",
            lessons,
            kill_session,
        )
        .with_entity(|request| routes::body_field(request, "id")),
    ]
}

/// A command id of its own for each command a request makes, derived from the request's, so
/// a retried request repeats none of them.
fn derived(meta: &CommandMeta, step: &str) -> CommandMeta {
    let name = format!(
        "{}\n{}\n{step}",
        meta.command_id,
        meta.digest.as_deref().unwrap_or_default()
    );
    CommandMeta::new(derived_command_id(&name), meta.principal.clone())
}

async fn catalog(
    lessons: &Lessons,
) -> Result<crate::domain::lessons::catalog::CatalogView, ApiError> {
    let (view, _) = lessons.catalog.read(CatalogId::lessons()).await?;
    view.ok_or_else(|| {
        ApiError::not_found(
            "no curriculum is loaded: set lessons.curriculum (switchyard dev loads deploy/dev/curriculum)",
        )
    })
}

fn list_lessons(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let _: ListLessons = crate::api::body_as(&request)?;
        let (view, _) = lessons.catalog.read(CatalogId::lessons()).await?;
        json(match view {
            Some(view) => LessonList {
                catalog: Some(view.digest),
                source: Some(view.source),
                result: view.lessons.iter().map(summary).collect(),
            },
            None => LessonList {
                catalog: None,
                source: None,
                result: Vec::new(),
            },
        })
    })
}

fn get_lesson(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: GetLesson = crate::api::body_as(&request)?;
        let view = catalog(&lessons).await?;
        let lesson = view
            .lessons
            .into_iter()
            .find(|l| l.slug == body.slug)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "lesson {:?} is not in the catalog",
                    body.slug.as_str()
                ))
            })?;
        json(LessonReply {
            catalog: view.digest,
            result: lesson,
        })
    })
}

fn reload(lessons: Lessons, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let _: ReloadCatalog = crate::api::body_as(&request)?;
        let Some(dir) = lessons.config.curriculum.clone() else {
            return Err(ApiError::invalid(
                "no curriculum directory is configured (lessons.curriculum)",
            ));
        };
        let loaded = tokio::task::spawn_blocking(move || super::curriculum::load(&dir))
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
            .map_err(|e| ApiError::invalid(error_chain(&e)))?;
        let source = lessons
            .config
            .curriculum
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let (_, command) = super::load_command(source, loaded);
        let (_, before) = lessons.catalog.read(CatalogId::lessons()).await?;
        let outcome = lessons
            .catalog
            .execute(CatalogId::lessons(), command, request.meta)
            .await?;
        json(CommandReply {
            result: Reloaded {
                catalog: outcome.reply.digest.unwrap_or_default(),
                lessons: outcome.reply.lessons,
                changed: outcome.version > before,
            },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

fn request(lessons: Lessons, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: RequestLesson = crate::api::body_as(&request)?;
        let stage = body.stage.unwrap_or(1);
        let view = catalog(&lessons).await?;
        let Some(lesson) = view.lessons.into_iter().find(|l| l.slug == body.lesson) else {
            return Err(ApiError::not_found(format!(
                "lesson {:?} is not in the catalog",
                body.lesson.as_str()
            )));
        };
        if lesson.stage(stage).is_none() {
            return Err(ApiError::invalid(format!(
                "lesson {:?} has no stage {stage}: its stages are 1 to {}",
                body.lesson.as_str(),
                lesson.stages.len()
            )));
        }
        let attach = LiveSessionCommand::Attach {
            lesson: body.lesson.clone(),
            limit: lessons.config.lesson_limit,
        };
        let attached = lessons
            .sessions
            .execute(
                body.session.clone(),
                attach,
                derived(&request.meta, "attach"),
            )
            .await?;
        let Some(id) = attached.reply.live_lesson else {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "live session {:?} no longer holds lesson {:?}; request it again",
                    body.session.as_str(),
                    body.lesson.as_str()
                ),
            ));
        };
        let command = LiveLessonCommand::Request {
            session: body.session,
            lesson: Box::new(lesson),
            catalog: view.digest,
            stage,
        };
        let outcome = lessons
            .lessons
            .execute(id.clone(), command, derived(&request.meta, "request"))
            .await?;
        json(CommandReply {
            result: LessonRequested {
                id,
                status: outcome.reply.status,
                stage: outcome.reply.stage,
            },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

fn get_live_lesson(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: LiveLessonRequest = crate::api::body_as(&request)?;
        let (view, version) = lessons.lessons.read(body.id.clone()).await?;
        let Some(mut view) = view else {
            return Err(ApiError::not_found(format!(
                "live lesson {:?} does not exist",
                body.id.as_str()
            )));
        };
        if view.deleted_at.is_none() {
            let id = view.id.clone();
            for endpoint in &mut view.endpoints {
                let address = endpoint
                    .presentations
                    .iter()
                    .find(|p| p.kind == PresentationKind::Ssh)
                    .and_then(|p| p.address.clone());
                endpoint.ssh = address.map(|a| lessons.backend.ssh_command(&id, &a));
            }
        }
        json(GetReply {
            result: view,
            version,
        })
    })
}

fn page(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be 1 to {MAX_PAGE}, not {limit}"
        )));
    }
    Ok(limit)
}

fn list_live_lessons(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: ListLiveLessons = crate::api::body_as(&request)?;
        let limit = page(body.limit)?;
        routes::caught_up(&lessons.lesson_table)?;
        let (result, next, position) = lessons
            .lesson_table
            .ask(move |table, position| {
                let start = body
                    .after
                    .as_ref()
                    .map_or(Bound::Unbounded, Bound::Excluded);
                let (views, next) = crate::api::routes::page(
                    table
                        .range(start)
                        .filter_map(|(id, row)| row.state.view(id))
                        .filter(|v| body.deleted || v.deleted_at.is_none())
                        .filter(|v| body.session.as_ref().is_none_or(|s| &v.session == s))
                        .filter(|v| body.status.is_none_or(|s| v.status == s)),
                    limit,
                    |v: &LiveLessonView| v.id.clone(),
                );
                (views, next, position)
            })
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("the live lesson read model is not running: {e}"))
            })?;
        json(ListReply {
            result,
            next,
            position,
        })
    })
}

/// How many open live sessions `source` holds, counted once the session read model has every
/// live-session event stored before this request (so a create acknowledged earlier is
/// counted; creates at the same moment may still not see each other).
async fn sessions_of(lessons: &Lessons, source: &str) -> Result<usize, ApiError> {
    let filter = lessons.store.subjects().events_of_kind(LiveSession::KIND);
    let last = lessons
        .store
        .last_sequence_of(&filter)
        .await
        .map_err(|e| ApiError::unavailable(error_chain(&e)))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counted = source.to_owned();
        let (position, held) = lessons
            .session_table
            .ask(move |table, position| {
                let held = table
                    .range(Bound::Unbounded)
                    .filter(|(_, row)| match &row.state {
                        LiveSession::Present(r) => r.ended.is_none() && r.source == counted,
                        LiveSession::Absent => false,
                    })
                    .count();
                (position, held)
            })
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("the live session read model is not running: {e}"))
            })?;
        if position >= last {
            return Ok(held);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(
                "the live session read model is behind; retry with the same command id",
            )
            .with_reason("catching_up"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 10 random lower-case letters and digits, as antidote named sessions.
fn random_id() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn create_session(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: CreateLiveSession = crate::api::body_as(&request)?;
        let source = body
            .source
            .clone()
            .unwrap_or_else(|| request.meta.principal.to_string());
        let limit = lessons.config.session_limit;
        if limit > 0 {
            routes::caught_up(&lessons.session_table)?;
            let held = sessions_of(&lessons, &source).await?;
            if held >= limit as usize {
                return Err(ApiError::new(
                    ErrorKind::Capacity,
                    format!("source {source:?} holds {held} live sessions, the limit (lessons.session_limit) is {limit}"),
                )
                .with_reason("session_limit"));
            }
        }
        let id = match body.id {
            Some(id) => id,
            None => LiveSessionId::new(random_id())
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?,
        };
        let ttl = body
            .ttl_ms
            .map_or(lessons.config.session_ttl, Duration::from_millis);
        let command = LiveSessionCommand::Create {
            source,
            persistent: body.persistent,
            ttl,
        };
        let outcome = lessons
            .sessions
            .execute(id.clone(), command, request.meta)
            .await?;
        json(CommandReply {
            result: LiveSessionCreated { id },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

fn kill_session(
    lessons: Lessons,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: LiveSessionRequest = crate::api::body_as(&request)?;
        let (view, _) = lessons.sessions.read(body.id.clone()).await?;
        let Some(view) = view else {
            return Err(ApiError::not_found(format!(
                "Invalid session ID {:?}: no such live session",
                body.id.as_str()
            )));
        };
        let held: Vec<LiveLessonId> = view.lessons.values().cloned().collect();
        for lesson in &held {
            let kill = LiveLessonCommand::Kill {
                reason: KillReason::SessionEnded,
            };
            lessons
                .lessons
                .execute(
                    lesson.clone(),
                    kill,
                    derived(&request.meta, &format!("kill\n{lesson}")),
                )
                .await?;
        }
        let outcome = lessons
            .sessions
            .execute(
                body.id.clone(),
                LiveSessionCommand::Kill,
                derived(&request.meta, "end"),
            )
            .await?;
        json(CommandReply {
            result: LiveSessionKilled {
                id: body.id,
                lessons: held,
            },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}
