//! The switchboard's running parts: pod and meeting point actors with their read models and
//! reapers, the placement that spreads reservations, and the reconciler. The rules live in
//! `domain::switchboard`; the routes in [`routes`].

pub mod placement;
pub mod reconciler;
pub mod routes;

use std::sync::Arc;

use actix::Addr;

use crate::config::SwitchboardConfig;
use crate::domain::switchboard::{MeetingPoint, Pod};
use crate::metrics::Metrics;
use crate::runtime::feed::Feed;
use crate::runtime::{Clock, Entities, EntityTable, ProjectionHandle, Reaper, Settings, Stop};
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

/// The switchboard's timers, stopped on shutdown.
#[derive(Clone)]
pub struct Timers {
    pod_reaper: Addr<Reaper<Pod>>,
    meeting_point_reaper: Addr<Reaper<MeetingPoint>>,
    reconciler: Addr<Reconciler>,
}

impl Switchboard {
    pub fn start(
        store: &EventStore,
        feed: &mut Feed,
        settings: &Arc<Settings>,
        reaper_interval: std::time::Duration,
        config: &SwitchboardConfig,
        metrics: &Metrics,
    ) -> (Self, Timers) {
        let pods = Entities::<Pod>::start(store.clone(), settings.clone(), metrics.clone());
        let pod_table = ProjectionHandle::start_on(
            EntityTable::<Pod>::default(),
            feed,
            store.clone(),
            metrics.clone(),
        );
        let meeting_points =
            Entities::<MeetingPoint>::start(store.clone(), settings.clone(), metrics.clone());
        let meeting_point_table = ProjectionHandle::start_on(
            EntityTable::<MeetingPoint>::default(),
            feed,
            store.clone(),
            metrics.clone(),
        );
        let board = Self {
            pods,
            pod_table,
            meeting_points,
            meeting_point_table,
            placement: Arc::default(),
            store: store.clone(),
            clock: settings.clock.clone(),
            metrics: metrics.clone(),
            config: config.clone(),
        };
        let timers = Timers {
            pod_reaper: actix::Actor::start(Reaper::new(
                board.pod_table.clone(),
                board.pods.clone(),
                board.clock.clone(),
                reaper_interval,
                metrics.clone(),
            )),
            meeting_point_reaper: actix::Actor::start(Reaper::new(
                board.meeting_point_table.clone(),
                board.meeting_points.clone(),
                board.clock.clone(),
                reaper_interval,
                metrics.clone(),
            )),
            reconciler: actix::Actor::start(Reconciler::new(
                board.clone(),
                config.reconcile_interval,
                config.reconcile_grace,
            )),
        };
        (board, timers)
    }

    /// Stops the timers and read models, then every actor.
    pub async fn shutdown(&self, timers: &Timers, grace: std::time::Duration) {
        timers.pod_reaper.do_send(Stop);
        timers.meeting_point_reaper.do_send(Stop);
        timers.reconciler.do_send(Stop);
        self.pod_table.stop();
        self.meeting_point_table.stop();
        futures::join!(
            self.pods.shutdown(grace),
            self.meeting_points.shutdown(grace)
        );
    }

    pub fn readiness(
        &self,
    ) -> Vec<(
        String,
        tokio::sync::watch::Receiver<crate::runtime::Readiness>,
    )> {
        vec![
            (self.pod_table.name().to_owned(), self.pod_table.readiness()),
            (
                self.meeting_point_table.name().to_owned(),
                self.meeting_point_table.readiness(),
            ),
        ]
    }
}
