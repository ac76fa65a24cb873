//! Reapers: timers that expire things. Level-triggered: each tick reads the entity table and
//! sends the command each entity's state says is due (`Aggregate::due`), whatever woke it. The
//! entity decides again with the current time, so a stale table is harmless.

use std::time::Duration;

use actix::prelude::*;
use futures::future::join_all;
use tracing::Instrument;

use super::projection::Due;
use super::{
    Clock, CommandMeta, Entities, EntityTable, ProjectionHandle, derived_command_id, error_chain,
};
use crate::domain::{Aggregate, EntityId, Principal};
use crate::metrics::Metrics;
use crate::telemetry;

pub struct Reaper<A: Aggregate> {
    table: ProjectionHandle<EntityTable<A>>,
    entities: Entities<A>,
    clock: Clock,
    interval: Duration,
    metrics: Metrics,
    busy: bool,
}

impl<A: Aggregate> Reaper<A> {
    pub fn new(
        table: ProjectionHandle<EntityTable<A>>,
        entities: Entities<A>,
        clock: Clock,
        interval: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            table,
            entities,
            clock,
            interval,
            metrics,
            busy: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        // One sweep at a time; a slow sweep is not stacked up behind itself.
        if self.busy || !self.table.is_ready() {
            return;
        }
        self.busy = true;
        let now = (self.clock)();
        let table = self.table.clone();
        let entities = self.entities.clone();
        let metrics = self.metrics.clone();
        let sweep = async move {
            let due = table
                .ask(move |table, _| table.due(now))
                .await
                .unwrap_or_default();
            // Only the entities of shards this replica owns: their owner alone acts on them.
            let due = due.into_iter().filter(|due| entities.owns(&due.id));
            join_all(due.map(|due| {
                let entities = entities.clone();
                let metrics = metrics.clone();
                async move {
                    let Due { id, command, seq, traceparent } = due;
                    // The same entity seen at the same message gives the same command id, so
                    // two reapers (or two ticks) acting on one observation write once. The
                    // sequence, unlike the entity's version, never repeats: a re-created
                    // entity's expiry is a new command, not a retry of its last life's.
                    let name = format!("reaper\n{}\n{}\n{seq}", A::KIND, id.as_str());
                    let meta = CommandMeta::new(derived_command_id(&name), Principal::system());
                    // A new trace, linked to the command that made the entity due: the expiry
                    // happens long after that request ended.
                    let span = tracing::debug_span!("reaper", kind = A::KIND, id = %id);
                    telemetry::link_traceparent(&span, traceparent.as_deref());
                    let result = entities.execute(id.clone(), command, meta).instrument(span).await;
                    match result {
                        Ok(_) => {
                            metrics.reaped.get_or_create(&Metrics::kind(A::KIND)).inc();
                        }
                        Err(err) => {
                            tracing::warn!(kind = A::KIND, id = %id, error = %error_chain(&err), "reaper command failed; retrying next tick");
                        }
                    }
                }
            }))
            .await;
        };
        ctx.spawn(
            sweep
                .into_actor(self)
                .map(|(), reaper, _| reaper.busy = false),
        );
    }
}

impl<A: Aggregate> Actor for Reaper<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |reaper, ctx| reaper.tick(ctx));
    }
}

/// Wakes a reaper now rather than at its next tick.
pub struct Poke;

impl Message for Poke {
    type Result = ();
}

impl<A: Aggregate> Handler<Poke> for Reaper<A> {
    type Result = ();

    fn handle(&mut self, _: Poke, ctx: &mut Context<Self>) {
        self.tick(ctx);
    }
}

impl<A: Aggregate> Handler<super::Stop> for Reaper<A> {
    type Result = ();

    fn handle(&mut self, _: super::Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
