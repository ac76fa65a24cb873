//! `lessons`: live lessons (seed 002, antidote).
//!
//! A **curriculum** is a directory of lesson definitions; [`catalog::validate`] turns their
//! files into lessons or into the full list of what is wrong with them, and the **catalog**
//! entity records each curriculum it is given as an event, so the audit shows which one a
//! lesson was created from. A **live session** is one learner's; it holds at most one **live
//! lesson** per lesson. A live lesson goes INITIALIZED → BOOTING → CONFIGURATION → READY (or
//! ERROR, with why and the output that explains it); the scheduler (a reaction,
//! `crate::lessons`) takes it there through a backend, and [`plan`] is what it does next,
//! decided from the lesson's events and what the backend observes.

pub mod catalog;
pub mod livelesson;
pub mod livesession;
pub mod plan;

use crate::domain::ids::{EntityId, IdError};
use crate::text_id;

pub use catalog::{Catalog, Lesson};
pub use livelesson::{LiveLesson, LiveLessonCommand, LiveLessonEvent, Status};
pub use livesession::{LiveSession, LiveSessionCommand, LiveSessionEvent};

/// The longest lesson slug or endpoint name.
pub const MAX_NAME: usize = 40;

text_id!(
    /// Names a lesson in the catalog: a DNS label.
    LessonSlug,
    "lesson slug",
    MAX_NAME,
    dns_label
);

text_id!(
    /// Names an endpoint (or a presentation) within its lesson: a DNS label.
    EndpointName,
    "endpoint name",
    MAX_NAME,
    dns_label
);

text_id!(
    /// Names a live session: a DNS label, so a lesson's resources can carry it.
    LiveSessionId,
    "live session id",
    32,
    dns_label
);

text_id!(
    /// Names a live lesson: `<session>-<lesson>-<n>`, a DNS label.
    LiveLessonId,
    "live lesson id",
    120,
    dns_label
);

text_id!(
    /// Names the catalog entity; there is one, [`CATALOG`].
    CatalogId,
    "catalog id",
    MAX_NAME,
    dns_label
);

/// The id of the one catalog.
pub const CATALOG: &str = "lessons";

impl CatalogId {
    pub fn lessons() -> Self {
        Self(CATALOG.to_owned())
    }
}

macro_rules! entity_ids {
    ($($name:ident),*) => {$(
        impl EntityId for $name {
            fn parse(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
            fn as_str(&self) -> &str {
                &self.0
            }
        }
    )*};
}

entity_ids!(LiveSessionId, LiveLessonId, CatalogId);
