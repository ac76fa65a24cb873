//! The counter capability: the small entity that exercises the whole runtime (its rules are
//! `domain::counter`).

use crate::api::catalog::{Capability, KindSpec, Starter};
use crate::api::routes::{self, RouteSpec};
use crate::domain::counter::{AddToCounter, Counter, CreateCounter, DeleteCounter};

pub fn capability() -> Capability {
    Capability {
        name: "counter",
        kinds: || vec![KindSpec::of::<Counter>()],
        routes,
        start,
    }
}

fn routes() -> Vec<RouteSpec> {
    vec![
        routes::command::<CreateCounter>(
            "Create a counter at zero, with an optional limit and idle TTL",
        ),
        routes::command::<AddToCounter>("Add a positive amount to a counter, within its limit"),
        routes::command::<DeleteCounter>("Delete a counter; deleting a missing one succeeds"),
        routes::get::<Counter>("Read one counter"),
        routes::list::<Counter>("List counters in id order, a page at a time"),
    ]
}

fn start(cx: &mut Starter<'_>) {
    let counters = cx.entities::<Counter>();
    let table = cx.table::<Counter>();
    cx.reaper(&table, &counters);
}
