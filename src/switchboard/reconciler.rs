//! The reconciler: makes port leases and meeting points agree again after a crash between the
//! two steps of a reservation, an expired meeting point, or an expired pod. Level-triggered:
//! each tick reads both read models and sends the repairs `reconcile::repairs` finds; each is a
//! conditional command, so a stale read is harmless.

use std::time::Duration;

use actix::prelude::*;
use futures::future::join_all;

use super::Switchboard;
use crate::domain::Principal;
use crate::domain::switchboard::meeting_point::{ClearReason, Expect, MeetingPoint};
use crate::domain::switchboard::pod::{Pod, PodCommand, ReleaseReason};
use crate::domain::switchboard::reconcile::{LeaseRow, PlaceRow, Repair, repairs};
use crate::domain::switchboard::{MachineId, MeetingPointCommand};
use crate::metrics::Metrics;
use crate::runtime::{CommandMeta, derived_command_id, error_chain};

pub struct Reconciler {
    board: Switchboard,
    interval: Duration,
    grace: Duration,
    busy: bool,
}

impl Reconciler {
    pub fn new(board: Switchboard, interval: Duration, grace: Duration) -> Self {
        Self {
            board,
            interval,
            grace,
            busy: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy
            || !self.board.pod_table.is_ready()
            || !self.board.meeting_point_table.is_ready()
        {
            return;
        }
        self.busy = true;
        let board = self.board.clone();
        let grace = self.grace;
        let sweep = async move {
            let now = (board.clock)();
            let leases = board.pod_table.ask(|table, _| {
                table
                    .rows()
                    .filter_map(|(pod, row)| match &row.state {
                        Pod::Present(registered) => Some((pod, registered, row.last_seq)),
                        Pod::Absent => None,
                    })
                    .flat_map(|(pod, registered, observed)| {
                        registered.leases.iter().map(move |(port, lease)| LeaseRow {
                            pod: pod.clone(),
                            port: *port,
                            lease: lease.clone(),
                            observed,
                        })
                    })
                    .collect::<Vec<_>>()
            });
            let places = board.meeting_point_table.ask(|table, _| {
                table
                    .rows()
                    .filter_map(|(machine, row)| match &row.state {
                        MeetingPoint::Present(reserved) => Some(PlaceRow {
                            machine: machine.clone(),
                            place: reserved.place.clone(),
                            reserved_at: reserved.reserved_at,
                            observed: row.last_seq,
                        }),
                        MeetingPoint::Absent => None,
                    })
                    .collect::<Vec<_>>()
            });
            let (Ok(leases), Ok(places)) = futures::join!(leases, places) else {
                return;
            };
            // Each replica repairs only what its own shards hold: one repair, by one owner.
            join_all(
                repairs(&leases, &places, now, grace)
                    .into_iter()
                    .filter(|repair| match repair {
                        Repair::ReleaseLease { pod, .. } => board.pods.owns(pod),
                        Repair::ClearMeetingPoint { machine, .. } => {
                            board.meeting_points.owns(machine)
                        }
                    })
                    .map(|repair| apply(&board, repair)),
            )
            .await;
        };
        ctx.spawn(sweep.into_actor(self).map(|(), me, _| me.busy = false));
    }
}

async fn apply(board: &Switchboard, repair: Repair) {
    let principal = Principal::system();
    let (what, result) = match &repair {
        // Named by what the repair saw (the row's last sequence never repeats), so a later
        // lease or meeting point with the same ids gets its own repair, not the old reply.
        Repair::ReleaseLease {
            pod,
            port,
            lease,
            observed,
        } => {
            let name = format!(
                "reconcile\nrelease\n{}\n{port}\n{lease}\n{observed}",
                pod.as_str()
            );
            let meta = CommandMeta::new(derived_command_id(&name), principal);
            let command = PodCommand::Release {
                port: *port,
                lease: Some(lease.clone()),
                reason: ReleaseReason::Orphaned,
            };
            let result = board.pods.execute(pod.clone(), command, meta).await;
            ("release_lease", result.map(|_| ()))
        }
        Repair::ClearMeetingPoint {
            machine,
            lease,
            observed,
        } => {
            let result = clear(board, machine, lease, *observed, principal).await;
            ("clear_meeting_point", result)
        }
    };
    match result {
        Ok(()) => {
            tracing::info!(?repair, "reconciled");
            board
                .metrics
                .repairs
                .get_or_create(&Metrics::kind(what))
                .inc();
        }
        Err(err) => {
            tracing::warn!(?repair, error = %error_chain(&err), "repair failed; retrying next tick");
        }
    }
}

async fn clear(
    board: &Switchboard,
    machine: &MachineId,
    lease: &crate::domain::CommandId,
    observed: u64,
    principal: Principal,
) -> Result<(), crate::runtime::CommandError> {
    let name = format!(
        "reconcile\nclear\n{}\n{lease}\n{observed}",
        machine.as_str()
    );
    let meta = CommandMeta::new(derived_command_id(&name), principal);
    let command = MeetingPointCommand::Clear {
        expect: Expect::lease(lease.clone()),
        reason: ClearReason::LeaseLost,
    };
    board
        .meeting_points
        .execute(machine.clone(), command, meta)
        .await
        .map(|_| ())
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |me, ctx| me.tick(ctx));
    }
}

impl Handler<crate::runtime::Stop> for Reconciler {
    type Result = ();

    fn handle(&mut self, _: crate::runtime::Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
