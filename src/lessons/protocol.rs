//! The lessons' requests and replies, as callers send and receive them: shared by the routes
//! and the CLI. Nothing here imports the server.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::CommandRequest;
use crate::domain::lessons::catalog::{Lesson, LessonSummary, Problem};
use crate::domain::lessons::livelesson::{KillReason, LiveLessonCommand};
use crate::domain::lessons::livesession::LiveSessionCommand;
use crate::domain::lessons::{
    LessonSlug, LiveLesson, LiveLessonId, LiveSession, LiveSessionId, Status,
};

/// `lesson.list`: the lessons of the catalog in force.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListLessons {}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LessonList {
    /// The digest of the catalog in force; none while no curriculum was ever loaded.
    pub catalog: Option<String>,
    /// Where it was loaded from.
    pub source: Option<String>,
    pub result: Vec<LessonSummary>,
}

/// `lesson.get`: one lesson of the catalog, whole (stages, guides, scripts).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetLesson {
    pub slug: LessonSlug,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LessonReply {
    pub catalog: String,
    pub result: Lesson,
}

/// `lesson.reload`: reads the configured curriculum directory again and, if every lesson in
/// it is valid, puts it in force (a `catalog.loaded` event; nothing if it did not change).
/// If anything is wrong, the reply is `invalid` with every problem, and nothing changes.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadCatalog {}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Reloaded {
    pub catalog: String,
    pub lessons: usize,
    /// Whether this changed the catalog in force.
    pub changed: bool,
}

/// What is wrong with a curriculum (the `details` of `lesson.reload`'s `invalid`).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Problems {
    pub problems: Vec<Problem>,
}

/// `lesson.request`: the lesson for a live session. The first request creates its live
/// lesson (INITIALIZED, then provisioned); a request for the stage it is at keeps it alive;
/// another stage reconfigures it (only once READY: `conflict`/`busy` before). Refused with
/// `not_found` for an unknown session ("Invalid session ID") or lesson, `invalid` for a stage
/// the lesson lacks, `capacity`/`lesson_limit` past the session's limit, and
/// `conflict`/`failed` for a lesson in ERROR (kill it and request again).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestLesson {
    pub session: LiveSessionId,
    pub lesson: LessonSlug,
    /// From 1; 1 by default.
    #[serde(default)]
    pub stage: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LessonRequested {
    pub id: LiveLessonId,
    pub status: Status,
    pub stage: u32,
}

/// Names one live lesson: `livelesson.get`, `keep_alive`, `kill`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveLessonRequest {
    pub id: LiveLessonId,
}

/// `livelesson.kill`: delete it and everything the backend has of it. Killing a lesson being
/// deleted changes nothing.
impl CommandRequest for LiveLessonRequest {
    type Aggregate = LiveLesson;
    const VERB: &'static str = "kill";

    fn into_command(self) -> (LiveLessonId, LiveLessonCommand) {
        (
            self.id,
            LiveLessonCommand::Kill {
                reason: KillReason::Killed,
            },
        )
    }
}

/// `livelesson.keep_alive`: resets its inactivity clock (what garbage collection counts).
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepAlive {
    pub id: LiveLessonId,
}

impl CommandRequest for KeepAlive {
    type Aggregate = LiveLesson;
    const VERB: &'static str = "keep_alive";

    fn into_command(self) -> (LiveLessonId, LiveLessonCommand) {
        (self.id, LiveLessonCommand::Touch)
    }
}

/// `livelesson.list`: live lessons in id order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListLiveLessons {
    /// Only this session's.
    #[serde(default)]
    pub session: Option<LiveSessionId>,
    /// Only those in this status.
    #[serde(default)]
    pub status: Option<Status>,
    /// Deleted lessons too; false by default.
    #[serde(default)]
    pub deleted: bool,
    pub after: Option<LiveLessonId>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// `livesession.create`: a live session for one learner.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLiveSession {
    /// Its id; 10 random lower-case letters and digits if absent.
    #[serde(default)]
    pub id: Option<LiveSessionId>,
    /// Who it is for (a portal passes the learner's address); the caller's principal if
    /// absent. `lessons.session_limit` counts live sessions per source.
    #[serde(default)]
    pub source: Option<String>,
    /// Its lessons outlive their TTL; false by default.
    #[serde(default)]
    pub persistent: bool,
    /// How long it lives with no lesson; `lessons.session_ttl` (1440 minutes) if absent.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LiveSessionCreated {
    pub id: LiveSessionId,
}

/// Names one live session: `livesession.get`, `kill`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveSessionRequest {
    pub id: LiveSessionId,
}

/// `livesession.set_persistent`: whether its lessons outlive their TTL.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPersistent {
    pub id: LiveSessionId,
    pub persistent: bool,
}

impl CommandRequest for SetPersistent {
    type Aggregate = LiveSession;
    const VERB: &'static str = "set_persistent";

    fn into_command(self) -> (LiveSessionId, LiveSessionCommand) {
        (
            self.id,
            LiveSessionCommand::SetPersistent {
                persistent: self.persistent,
            },
        )
    }
}

/// The reply to `livesession.kill`: the lessons it held, now being deleted.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LiveSessionKilled {
    pub id: LiveSessionId,
    pub lessons: Vec<LiveLessonId>,
}
