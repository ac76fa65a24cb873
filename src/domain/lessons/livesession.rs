//! A live session: one learner's, from one source, holding at most one live lesson per lesson.
//!
//! It is the gate for its lessons: a request attaches the lesson to the session first (which
//! names the live lesson, `<session>-<lesson>-<n>`, and enforces the per-session limit), then
//! asks the live lesson. A lesson deleted is detached, and the next request for that lesson gets
//! a new live lesson. A session past its TTL with no lessons is ended by garbage collection; a
//! persistent one keeps its lessons past their TTL.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LessonSlug, LiveLessonId, LiveSessionId};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

/// The longest a live session may live.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest source text.
pub const MAX_SOURCE: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LiveSession {
    #[default]
    Absent,
    Present(Box<Record>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub source: String,
    pub persistent: bool,
    pub ttl: Duration,
    pub created_at: Timestamp,
    /// The live lesson of each lesson it holds.
    pub lessons: BTreeMap<LessonSlug, LiveLessonId>,
    /// Live lessons named so far: the next is `<session>-<lesson>-<named>`.
    pub named: u64,
    /// When each held live lesson was attached: garbage collection lets go of one whose
    /// request never followed (a caller that gave up between the two commands).
    pub attached_at: BTreeMap<LiveLessonId, Timestamp>,
    pub ended: Option<Ended>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Killed,
    /// Past its TTL with no lessons.
    Expired,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Ended {
    pub reason: EndReason,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LiveSessionCommand {
    Create {
        source: String,
        persistent: bool,
        ttl: Duration,
    },
    SetPersistent {
        persistent: bool,
    },
    /// Holds `lesson` (naming its live lesson), unless it is held already; `limit` (0: none) is
    /// how many lessons a session may hold.
    Attach {
        lesson: LessonSlug,
        limit: u32,
    },
    /// Lets go of a live lesson that was deleted.
    Detach {
        live_lesson: LiveLessonId,
    },
    Kill,
    /// Garbage collection: ends it if it is past its TTL and holds no lesson.
    Expire,
}

event_set! {
    pub enum LiveSessionEvent {
        Created(Created) = "livesession.created" @ 1,
        PersistenceSet(PersistenceSet) = "livesession.persistence_set" @ 1,
        LessonAttached(LessonAttached) = "livesession.lesson_attached" @ 1,
        LessonDetached(LessonDetached) = "livesession.lesson_detached" @ 1,
        Ended(EndedEvent) = "livesession.ended" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Created {
    pub source: String,
    pub persistent: bool,
    pub ttl_ms: u64,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PersistenceSet {
    pub persistent: bool,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LessonAttached {
    pub lesson: LessonSlug,
    pub live_lesson: LiveLessonId,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LessonDetached {
    pub lesson: LessonSlug,
    pub live_lesson: LiveLessonId,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EndedEvent {
    pub reason: EndReason,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveSessionError {
    /// The text portals show: antidote's front end relies on "Invalid session ID".
    #[error("Invalid session ID {session:?}: no such live session")]
    NotFound { session: String },
    #[error("live session {session:?} exists already")]
    AlreadyExists { session: String },
    #[error("live session {session:?} has ended")]
    Ended { session: String },
    #[error("live session {session:?} holds {limit} lessons, its limit")]
    Limit { session: String, limit: u32 },
    #[error("the TTL must be 1 s to {} days", MAX_TTL.as_secs() / 86_400)]
    Ttl,
    #[error("the source must be 1 to {MAX_SOURCE} bytes of printable text")]
    Source,
    #[error("live session {session:?} is not past its TTL, or still holds lessons")]
    NotExpired { session: String },
}

impl Rejection for LiveSessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            LiveSessionError::NotFound { .. } => ErrorKind::NotFound,
            LiveSessionError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            LiveSessionError::Ended { .. } | LiveSessionError::NotExpired { .. } => {
                ErrorKind::Conflict
            }
            LiveSessionError::Limit { .. } => ErrorKind::Capacity,
            LiveSessionError::Ttl | LiveSessionError::Source => ErrorKind::Invalid,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            LiveSessionError::Limit { .. } => Some("lesson_limit"),
            LiveSessionError::Ended { .. } => Some("session_ended"),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LiveSessionView {
    pub id: LiveSessionId,
    pub source: String,
    pub persistent: bool,
    pub ttl_ms: u64,
    pub created_at: Timestamp,
    /// When garbage collection ends it, if it holds no lesson then.
    pub expires_at: Timestamp,
    /// The live lesson of each lesson it holds.
    pub lessons: BTreeMap<LessonSlug, LiveLessonId>,
    pub ended: Option<Ended>,
}

/// The reply to every live-session command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LiveSessionReply {
    /// For `Attach`: the live lesson that holds the lesson.
    #[serde(default)]
    pub live_lesson: Option<LiveLessonId>,
    pub ended: bool,
}

impl Record {
    pub fn expires_at(&self) -> Timestamp {
        self.created_at.saturating_add(self.ttl)
    }
}

fn name_lesson(id: &LiveSessionId, lesson: &LessonSlug, n: u64) -> Option<LiveLessonId> {
    LiveLessonId::new(format!("{id}-{lesson}-{n}")).ok()
}

impl Aggregate for LiveSession {
    const KIND: &'static str = "livesession";
    const SNAPSHOT_VERSION: u16 = 2;

    type Id = LiveSessionId;
    type Command = LiveSessionCommand;
    type Event = LiveSessionEvent;
    type Reply = LiveSessionReply;
    type View = LiveSessionView;
    type Error = LiveSessionError;

    fn decide(
        &self,
        id: &LiveSessionId,
        command: &LiveSessionCommand,
        cx: &Context,
    ) -> Result<Vec<LiveSessionEvent>, LiveSessionError> {
        let at = cx.now;
        let session = || id.to_string();
        let record = match (self, command) {
            (
                LiveSession::Absent,
                LiveSessionCommand::Create {
                    source,
                    persistent,
                    ttl,
                },
            ) => {
                if ttl.as_secs() < 1 || *ttl > MAX_TTL {
                    return Err(LiveSessionError::Ttl);
                }
                if source.is_empty()
                    || source.len() > MAX_SOURCE
                    || source.chars().any(char::is_control)
                {
                    return Err(LiveSessionError::Source);
                }
                return Ok(vec![LiveSessionEvent::Created(Created {
                    source: source.clone(),
                    persistent: *persistent,
                    ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    at,
                })]);
            }
            (LiveSession::Present(_), LiveSessionCommand::Create { .. }) => {
                return Err(LiveSessionError::AlreadyExists { session: session() });
            }
            (LiveSession::Absent, _) => {
                return Err(LiveSessionError::NotFound { session: session() });
            }
            (LiveSession::Present(record), _) => record,
        };
        let ended = record.ended.is_some();
        match command {
            LiveSessionCommand::Create { .. } => Ok(vec![]),
            LiveSessionCommand::Kill | LiveSessionCommand::Expire if ended => Ok(vec![]),
            _ if ended && !matches!(command, LiveSessionCommand::Detach { .. }) => {
                Err(LiveSessionError::Ended { session: session() })
            }
            LiveSessionCommand::SetPersistent { persistent } => {
                if record.persistent == *persistent {
                    return Ok(vec![]);
                }
                Ok(vec![LiveSessionEvent::PersistenceSet(PersistenceSet {
                    persistent: *persistent,
                    at,
                })])
            }
            LiveSessionCommand::Attach { lesson, limit } => {
                if record.lessons.contains_key(lesson) {
                    return Ok(vec![]);
                }
                if *limit > 0 && record.lessons.len() >= *limit as usize {
                    return Err(LiveSessionError::Limit {
                        session: session(),
                        limit: *limit,
                    });
                }
                let live_lesson =
                    name_lesson(id, lesson, record.named + 1).ok_or(LiveSessionError::Source)?;
                Ok(vec![LiveSessionEvent::LessonAttached(LessonAttached {
                    lesson: lesson.clone(),
                    live_lesson,
                    at,
                })])
            }
            LiveSessionCommand::Detach { live_lesson } => Ok(record
                .lessons
                .iter()
                .filter(|(_, held)| *held == live_lesson)
                .map(|(lesson, _)| {
                    LiveSessionEvent::LessonDetached(LessonDetached {
                        lesson: lesson.clone(),
                        live_lesson: live_lesson.clone(),
                        at,
                    })
                })
                .collect()),
            LiveSessionCommand::Kill => Ok(vec![LiveSessionEvent::Ended(EndedEvent {
                reason: EndReason::Killed,
                at,
            })]),
            LiveSessionCommand::Expire => {
                if at < record.expires_at() || !record.lessons.is_empty() {
                    return Err(LiveSessionError::NotExpired { session: session() });
                }
                Ok(vec![LiveSessionEvent::Ended(EndedEvent {
                    reason: EndReason::Expired,
                    at,
                })])
            }
        }
    }

    fn apply(&mut self, event: &LiveSessionEvent) {
        if let LiveSessionEvent::Created(e) = event {
            *self = LiveSession::Present(Box::new(Record {
                source: e.source.clone(),
                persistent: e.persistent,
                ttl: Duration::from_millis(e.ttl_ms),
                created_at: e.at,
                lessons: BTreeMap::new(),
                named: 0,
                attached_at: BTreeMap::new(),
                ended: None,
            }));
            return;
        }
        let LiveSession::Present(record) = self else {
            return;
        };
        match event {
            LiveSessionEvent::Created(_) => {}
            LiveSessionEvent::PersistenceSet(e) => record.persistent = e.persistent,
            LiveSessionEvent::LessonAttached(e) => {
                record.named += 1;
                record
                    .lessons
                    .insert(e.lesson.clone(), e.live_lesson.clone());
                record.attached_at.insert(e.live_lesson.clone(), e.at);
            }
            LiveSessionEvent::LessonDetached(e) => {
                if record.lessons.get(&e.lesson) == Some(&e.live_lesson) {
                    record.lessons.remove(&e.lesson);
                }
                record.attached_at.remove(&e.live_lesson);
            }
            LiveSessionEvent::Ended(e) => {
                record.ended = Some(Ended {
                    reason: e.reason,
                    at: e.at,
                });
            }
        }
    }

    fn reply(&self, _: &LiveSessionId, command: &LiveSessionCommand) -> LiveSessionReply {
        let LiveSession::Present(record) = self else {
            return LiveSessionReply {
                live_lesson: None,
                ended: false,
            };
        };
        LiveSessionReply {
            live_lesson: match command {
                LiveSessionCommand::Attach { lesson, .. } => record.lessons.get(lesson).cloned(),
                _ => None,
            },
            ended: record.ended.is_some(),
        }
    }

    fn view(&self, id: &LiveSessionId) -> Option<LiveSessionView> {
        let LiveSession::Present(record) = self else {
            return None;
        };
        Some(LiveSessionView {
            id: id.clone(),
            source: record.source.clone(),
            persistent: record.persistent,
            ttl_ms: u64::try_from(record.ttl.as_millis()).unwrap_or(u64::MAX),
            created_at: record.created_at,
            expires_at: record.expires_at(),
            lessons: record.lessons.clone(),
            ended: record.ended.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cx(seconds: i64) -> Context {
        Context {
            now: Timestamp::from_unix_nanos(seconds * 1_000_000_000),
        }
    }

    fn run(
        state: &mut LiveSession,
        command: LiveSessionCommand,
        at: i64,
    ) -> Result<LiveSessionReply, LiveSessionError> {
        let id = LiveSessionId::new("abc").unwrap();
        for event in state.decide(&id, &command, &cx(at))? {
            state.apply(&event);
        }
        Ok(state.reply(&id, &command))
    }

    fn create(ttl: u64) -> LiveSessionCommand {
        LiveSessionCommand::Create {
            source: "127.0.0.1".into(),
            persistent: false,
            ttl: Duration::from_secs(ttl),
        }
    }

    fn attach(lesson: &str, limit: u32) -> LiveSessionCommand {
        LiveSessionCommand::Attach {
            lesson: LessonSlug::new(lesson).unwrap(),
            limit,
        }
    }

    #[test]
    fn a_lesson_is_named_once_and_the_limit_holds() {
        let mut s = LiveSession::default();
        run(&mut s, create(60), 0).unwrap();
        let first = run(&mut s, attach("one", 2), 1)
            .unwrap()
            .live_lesson
            .unwrap();
        assert_eq!(first.as_str(), "abc-one-1");
        let again = run(&mut s, attach("one", 2), 2)
            .unwrap()
            .live_lesson
            .unwrap();
        assert_eq!(again, first);
        run(&mut s, attach("two", 2), 3).unwrap();
        let err = run(&mut s, attach("three", 2), 4).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Capacity);
        run(&mut s, LiveSessionCommand::Detach { live_lesson: first }, 5).unwrap();
        let next = run(&mut s, attach("one", 2), 6)
            .unwrap()
            .live_lesson
            .unwrap();
        assert_eq!(next.as_str(), "abc-one-3");
    }

    #[test]
    fn it_expires_only_past_its_ttl_and_empty() {
        let mut s = LiveSession::default();
        run(&mut s, create(60), 0).unwrap();
        let lesson = run(&mut s, attach("one", 0), 1)
            .unwrap()
            .live_lesson
            .unwrap();
        assert!(run(&mut s, LiveSessionCommand::Expire, 30).is_err());
        assert!(run(&mut s, LiveSessionCommand::Expire, 61).is_err());
        run(
            &mut s,
            LiveSessionCommand::Detach {
                live_lesson: lesson,
            },
            62,
        )
        .unwrap();
        assert!(run(&mut s, LiveSessionCommand::Expire, 63).unwrap().ended);
        let err = run(&mut s, attach("one", 0), 64).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
    }

    #[test]
    fn unknown_sessions_say_invalid_session_id() {
        let mut s = LiveSession::default();
        let err = run(&mut s, attach("one", 0), 0).unwrap_err();
        assert!(err.to_string().starts_with("Invalid session ID"));
        assert!(run(&mut s, create(0), 0).is_err());
    }
}
