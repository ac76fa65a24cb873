//! The switchboard's running parts: pod and meeting point actors with their read models and
//! reapers, the placement that spreads reservations, and the reconciler. The rules live in
//! `domain::switchboard`; the routes in [`routes`].

pub mod placement;
pub mod protocol;
pub mod reconciler;
pub mod reserve;
pub mod routes;

use std::sync::Arc;

use crate::api::catalog::{Capability, KindSpec, Starter};
use crate::config::SwitchboardConfig;
use crate::domain::switchboard::{MeetingPoint, Pod};
use crate::metrics::Metrics;
use crate::runtime::{Clock, Entities, EntityTable, ProjectionHandle};
use crate::store::EventStore;

pub use placement::Placement;
pub use reconciler::Reconciler;

/// Handles to everything the switchboard routes use; cheap to clone.
#[derive(Clone)]
pub struct Switchboard {
    pub pods: Entities<Pod>,
    pub pod_table: ProjectionHandle<EntityTable<Pod>>,
    pub meeting_points: Entities<MeetingPoint>,
    pub meeting_point_table: ProjectionHandle<EntityTable<MeetingPoint>>,
    pub placement: Arc<Placement>,
    pub store: EventStore,
    pub clock: Clock,
    pub metrics: Metrics,
    pub config: SwitchboardConfig,
}

impl Switchboard {
    /// Starts the pods and meeting points, their read models and reapers, and the
    /// reconciler; the handles are provided to the routes.
    fn start(cx: &mut Starter<'_>) {
        let pods = cx.entities::<Pod>();
        let pod_table = cx.table::<Pod>();
        let meeting_points = cx.entities::<MeetingPoint>();
        let meeting_point_table = cx.table::<MeetingPoint>();
        cx.reaper(&pod_table, &pods);
        cx.reaper(&meeting_point_table, &meeting_points);
        let config = cx.config.switchboard.clone();
        let board = Self {
            pods,
            pod_table,
            meeting_points,
            meeting_point_table,
            placement: Arc::default(),
            store: cx.store.clone(),
            clock: cx.clock(),
            metrics: cx.metrics.clone(),
            config: config.clone(),
        };
        let reconciler = actix::Actor::start(Reconciler::new(
            board.clone(),
            config.reconcile_interval,
            config.reconcile_grace,
        ));
        cx.stop_on_shutdown(reconciler);
        cx.provide(board);
    }
}

/// The switchboard: pods, meeting points, and the routes of seed 000.
pub fn capability() -> Capability {
    Capability {
        name: "switchboard",
        kinds: || vec![KindSpec::of::<Pod>(), KindSpec::of::<MeetingPoint>()],
        routes: routes::specs,
        start: Switchboard::start,
    }
}
