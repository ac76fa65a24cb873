//! Live lessons (seed 002, antidote): the capability. The catalog, live sessions and live
//! lessons are entities (their rules in `domain::lessons`); the [`scheduler`] is a reaction that
//! delegates each lesson's create, modify and delete to the configured [`backend`]; garbage
//! collection and orphan pruning run here; [`routes`] serve `lesson.*`, `livelesson.*` and
//! `livesession.*`.

pub mod backend;
pub mod cli;
pub mod curriculum;
pub mod kubernetes;
pub mod protocol;
pub mod routes;
pub mod scheduler;
pub mod ssh;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::Instrument;

use crate::api::catalog::{Capability, KindSpec, Starter};
use crate::config::{LessonBackendKind, LessonsConfig};
use crate::domain::lessons::catalog::{Catalog, CatalogCommand, Lesson};
use crate::domain::lessons::livelesson::{KillReason, LiveLessonCommand};
use crate::domain::lessons::livesession::{LiveSession as Session, LiveSessionCommand};
use crate::domain::lessons::{CatalogId, LiveLesson, LiveLessonId, LiveSessionId};
use crate::domain::{EntityId, Principal};
use crate::kubernetes::Kube;
use crate::runtime::{
    Clock, CommandMeta, Entities, EntityTable, ProjectionHandle, derived_command_id, error_chain,
};
use backend::{LessonBackend, LocalBackend};
use kubernetes::KubernetesBackend;
use scheduler::{Scheduler, Shared};

/// Handles to everything the routes use; cheap to clone.
#[derive(Clone)]
pub struct Lessons {
    pub catalog: Entities<Catalog>,
    pub sessions: Entities<Session>,
    pub lessons: Entities<LiveLesson>,
    pub session_table: ProjectionHandle<EntityTable<Session>>,
    pub lesson_table: ProjectionHandle<EntityTable<LiveLesson>>,
    pub backend: Arc<dyn LessonBackend>,
    pub config: LessonsConfig,
    pub store: crate::store::EventStore,
}

/// Live lessons: `catalog`, `livesession` and `livelesson` entities, the scheduler, garbage
/// collection and the orphan pruner.
pub fn capability() -> Capability {
    Capability {
        name: "lessons",
        kinds: || {
            vec![
                KindSpec::of::<Catalog>(),
                KindSpec::of::<Session>(),
                KindSpec::of::<LiveLesson>(),
            ]
        },
        routes: routes::specs,
        start,
    }
}

fn start(cx: &mut Starter<'_>) {
    let catalog = cx.entities::<Catalog>();
    let sessions = cx.entities::<Session>();
    let lessons = cx.entities::<LiveLesson>();
    let session_table = cx.table::<Session>();
    let lesson_table = cx.table::<LiveLesson>();
    let config = cx.config.lessons.clone();
    let curriculum = match &config.curriculum {
        Some(dir) => match curriculum::load(dir) {
            Ok(lessons) => Some((dir.display().to_string(), lessons)),
            Err(err) => {
                cx.invalid(format!("lessons.curriculum: {}", error_chain(&err)));
                None
            }
        },
        None => None,
    };
    // Every resource carries the instance: the stream prefix names this Switchyard.
    let instance = cx.store.config().stream_prefix.to_lowercase();
    let backend: Arc<dyn LessonBackend> = match config.backend {
        LessonBackendKind::Local => {
            Arc::new(LocalBackend::new(&config.dir, &instance, config.stop_grace))
        }
        LessonBackendKind::Kubernetes => match Kube::new(cx.config.kubernetes.clone()) {
            Ok(kube) => Arc::new(KubernetesBackend::new(kube, &config.dir, &instance)),
            Err(err) => {
                cx.invalid(err.to_string());
                Arc::new(LocalBackend::new(&config.dir, &instance, config.stop_grace))
            }
        },
    };
    let clock = cx.clock();
    let shared = Arc::new(Shared {
        lessons: lessons.clone(),
        sessions: sessions.clone(),
        backend: backend.clone(),
        config: config.clone(),
        clock: clock.clone(),
    });
    cx.reaction(Scheduler::new(shared.clone()));
    let (stop, stopped) = watch::channel(false);
    cx.on_shutdown(move || {
        let _ = stop.send(true);
    });
    if let Some((source, loaded)) = curriculum {
        tokio::spawn(record_catalog(
            catalog.clone(),
            source,
            loaded,
            stopped.clone(),
        ));
    }
    let handle = Lessons {
        catalog,
        sessions,
        lessons,
        session_table,
        lesson_table,
        backend,
        config,
        store: cx.store.clone(),
    };
    tokio::spawn(collect_garbage(handle.clone(), clock, stopped.clone()));
    tokio::spawn(prune(shared, stopped));
    cx.provide(handle);
}

/// The command that puts `lessons` in force: named after their digest, so every replica
/// loading the same curriculum writes it once.
pub fn load_command(source: String, lessons: Vec<Lesson>) -> (CommandMeta, CatalogCommand) {
    let digest = crate::domain::lessons::catalog::digest(&lessons);
    let meta = CommandMeta::new(
        derived_command_id(&format!("catalog\nload\n{digest}")),
        Principal::system(),
    );
    (meta, CatalogCommand::Load { source, lessons })
}

/// Records the configured curriculum, retrying until it lands: the catalog's shard may not
/// have an owner yet at start.
async fn record_catalog(
    catalog: Entities<Catalog>,
    source: String,
    lessons: Vec<Lesson>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        let (meta, command) = load_command(source.clone(), lessons.clone());
        match catalog.execute(CatalogId::lessons(), command, meta).await {
            Ok(outcome) => {
                tracing::info!(catalog = ?outcome.reply.digest, lessons = outcome.reply.lessons, %source, "the curriculum is in force");
                return;
            }
            Err(err) => {
                tracing::info!(error = %error_chain(&err), "cannot record the curriculum yet; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return,
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Each `gc_interval`: fails a READY lesson whose endpoint died; kills lessons inactive past
/// their TTL (unless their session is persistent) and lessons whose session ended; lets sessions go of lessons that are gone;
/// ends sessions past their TTL that hold no lesson. Only entities of this replica's shards.
async fn collect_garbage(lessons: Lessons, clock: Clock, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(lessons.config.gc_interval) => {}
            _ = stopped.changed() => return,
        }
        let span = tracing::debug_span!("lessons.gc");
        if let Err(err) = gc_once(&lessons, clock()).instrument(span).await {
            tracing::warn!(error = %err, "garbage collection of live lessons failed; retrying at the next round");
        }
    }
}

/// A lesson attached to its session this long ago and never requested was abandoned.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// One round of garbage collection.
pub async fn gc_once(lessons: &Lessons, now: crate::domain::Timestamp) -> Result<(), String> {
    let ttl = lessons.config.lesson_ttl;
    // One pass over the lesson table: the lessons not being deleted (id, last sequence,
    // session, idle since), those deleted, and every id it has.
    type Live = (LiveLessonId, u64, LiveSessionId, crate::domain::Timestamp);
    type Ids = std::collections::BTreeSet<LiveLessonId>;
    let (live, gone, known): (Vec<Live>, Ids, Ids) = lessons
        .lesson_table
        .ask(|table, _| {
            let mut live = Vec::new();
            let mut gone = Ids::new();
            let mut known = Ids::new();
            for (id, row) in table.range(std::ops::Bound::Unbounded) {
                known.insert(id.clone());
                match &row.state {
                    LiveLesson::Present(r) if r.is_deleted() => {
                        gone.insert(id.clone());
                    }
                    LiveLesson::Present(r) if r.kill.is_none() => {
                        live.push((id.clone(), row.last_seq, r.session.clone(), r.idle_since()));
                    }
                    LiveLesson::Present(_) => {}
                    LiveLesson::Absent => {
                        gone.insert(id.clone());
                    }
                }
            }
            (live, gone, known)
        })
        .await
        .map_err(|e| format!("the live lesson read model is not running: {e}"))?;
    for (id, version, session, idle_since) in live {
        if !lessons.lessons.owns(&id) {
            continue;
        }
        check_ready(lessons, &id, version).await;
        let reason = match lessons.sessions.read(session.clone()).await {
            Ok((Some(view), _)) if view.ended.is_some() => Some(KillReason::SessionEnded),
            Ok((None, _)) => Some(KillReason::SessionEnded),
            Ok((Some(view), _)) => {
                (!view.persistent && now.since(idle_since) >= ttl).then_some(KillReason::Expired)
            }
            // A session that cannot be read does not stop the rest (antidote's #171).
            Err(err) => {
                tracing::info!(lesson = %id, error = %error_chain(&err), "cannot read a lesson's session; skipping it this round");
                None
            }
        };
        let Some(reason) = reason else {
            continue;
        };
        let meta = CommandMeta::new(
            derived_command_id(&format!("lessons_gc\n{id}\n{version}")),
            Principal::system(),
        );
        match lessons
            .lessons
            .execute(id.clone(), LiveLessonCommand::Kill { reason }, meta)
            .await
        {
            Ok(_) => {
                tracing::info!(lesson = %id, ?reason, "garbage collection deletes a live lesson")
            }
            Err(err) => {
                tracing::info!(lesson = %id, error = %error_chain(&err), "cannot kill an expired lesson; retrying at the next round")
            }
        }
    }
    // (id, last sequence, held lessons with when each was attached, past its TTL)
    type Open = (
        LiveSessionId,
        u64,
        Vec<(LiveLessonId, crate::domain::Timestamp)>,
        bool,
    );
    let open: Vec<Open> = lessons
        .session_table
        .ask(move |table, _| {
            table
                .range(std::ops::Bound::Unbounded)
                .filter_map(|(id, row)| match &row.state {
                    Session::Present(r) if r.ended.is_none() => Some((
                        id.clone(),
                        row.last_seq,
                        r.lessons
                            .values()
                            .map(|l| (l.clone(), r.attached_at.get(l).copied().unwrap_or(now)))
                            .collect(),
                        now >= r.expires_at(),
                    )),
                    _ => None,
                })
                .collect()
        })
        .await
        .map_err(|e| format!("the live session read model is not running: {e}"))?;
    for (id, version, held, expired) in open {
        if !lessons.sessions.owns(&id) {
            continue;
        }
        let mut holding = held.len();
        for (lesson, attached) in held {
            // Deleted; or never requested, long after it was attached (the caller gave up
            // between attaching and requesting it; a lesson on its way is seconds old at most).
            let abandoned = !known.contains(&lesson) && now.since(attached) >= ABANDONED_AFTER;
            if !gone.contains(&lesson) && !abandoned {
                continue;
            }
            let meta = CommandMeta::new(
                derived_command_id(&format!("lessons_gc\ndetach\n{id}\n{lesson}")),
                Principal::system(),
            );
            let detach = LiveSessionCommand::Detach {
                live_lesson: lesson.clone(),
            };
            if lessons
                .sessions
                .execute(id.clone(), detach, meta)
                .await
                .is_ok()
            {
                holding -= 1;
            }
        }
        if expired && holding == 0 {
            let meta = CommandMeta::new(
                derived_command_id(&format!("lessons_gc\nexpire\n{id}\n{version}")),
                Principal::system(),
            );
            match lessons
                .sessions
                .execute(id.clone(), LiveSessionCommand::Expire, meta)
                .await
            {
                Ok(_) => {
                    tracing::info!(session = %id, "garbage collection ends a live session past its TTL")
                }
                Err(err) => {
                    tracing::debug!(session = %id, error = %error_chain(&err), "a live session is not ready to expire")
                }
            }
        }
    }
    Ok(())
}

/// A READY lesson has no scheduler job; an endpoint of it that exited or vanished since is
/// found here, and the lesson fails with what the backend says of it (its output).
async fn check_ready(lessons: &Lessons, id: &LiveLessonId, seq: u64) {
    let Ok((LiveLesson::Present(record), _)) = lessons.lessons.inspect_here(id.clone()).await
    else {
        return;
    };
    if record.status != crate::domain::lessons::Status::Ready || record.kill.is_some() {
        return;
    }
    let seen = match lessons.backend.observe(id, &record.lesson).await {
        Ok(seen) => seen,
        Err(err) => {
            tracing::info!(lesson = %id, error = %error_chain(&err), "cannot observe a ready lesson's endpoints");
            return;
        }
    };
    for endpoint in &record.lesson.endpoints {
        let reason = match seen.get(&endpoint.name) {
            Some(crate::domain::lessons::plan::Seen::Failed { why, output }) => {
                (format!("endpoint {}: {why}", endpoint.name), output.clone())
            }
            None => (
                format!("endpoint {} is gone from the backend", endpoint.name),
                String::new(),
            ),
            Some(_) => continue,
        };
        let meta = CommandMeta::new(
            derived_command_id(&format!("lessons_gc\nfail\n{id}\n{seq}")),
            Principal::system(),
        );
        let (reason, output) = reason;
        tracing::warn!(lesson = %id, %reason, "a ready lesson lost an endpoint");
        let fail = LiveLessonCommand::Fail {
            step: "endpoint".to_owned(),
            reason,
            output,
        };
        if let Err(err) = lessons.lessons.execute(id.clone(), fail, meta).await {
            tracing::info!(lesson = %id, error = %error_chain(&err), "cannot record a ready lesson's lost endpoint");
        }
        return;
    }
}

/// Removes what the backend has of lessons that are deleted (or that the log never had): left
/// by a crash between the backend's delete and its record, or by a Switchyard whose log was
/// wiped. Only lessons of this replica's shards, only once unchanged for the grace. Live
/// lessons are never touched: a restart leaves them running.
async fn prune(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let every = shared.config.prune_interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stopped.changed() => return,
        }
        let found = match shared.backend.lessons().await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot list what the lesson backend has");
                continue;
            }
        };
        // File ages: both times are this machine's wall clock.
        #[allow(clippy::disallowed_methods)]
        let now = SystemTime::now();
        for (name, modified) in found {
            if now.duration_since(modified).unwrap_or_default() < shared.config.prune_grace {
                continue;
            }
            let Ok(id) = LiveLessonId::parse(&name) else {
                tracing::warn!(resource = %name, "the lesson backend has something that is not a lesson's; leaving it");
                continue;
            };
            if !shared.lessons.owns(&id) {
                continue;
            }
            let live = match shared.lessons.inspect_here(id.clone()).await {
                Ok((LiveLesson::Present(record), _)) => !record.is_deleted(),
                Ok((LiveLesson::Absent, _)) => false,
                Err(_) => continue,
            };
            if live {
                continue;
            }
            match shared.backend.delete(&id).await {
                Ok(()) => {
                    tracing::info!(lesson = %id, "removed what the backend had of a lesson that is gone")
                }
                Err(err) => {
                    tracing::warn!(lesson = %id, error = %error_chain(&err), "cannot remove an orphaned lesson")
                }
            }
        }
    }
}
