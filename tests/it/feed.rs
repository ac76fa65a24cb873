//! The event feed: one reader of the stream for every read model. Each rebuilds and follows
//! live from it, a kind with no events is ready at once, and a read model that is busy does
//! not hold up the others.

use std::time::Duration;

use switchyard::domain::counter::Counter;
use switchyard::domain::switchboard::MeetingPoint;
use switchyard::metrics::Metrics;
use switchyard::runtime::feed::Feed;
use switchyard::runtime::{EntityTable, ProjectionHandle};

use crate::harness::{store, wait_for};
use crate::store::{append, created, id};

const LIMIT: Duration = Duration::from_secs(10);

async fn rows(table: &ProjectionHandle<EntityTable<Counter>>) -> usize {
    table.ask(|t, _| t.len()).await.unwrap()
}

#[actix_rt::test]
async fn one_feed_serves_every_read_model_and_a_busy_one_holds_up_none() {
    let fx = store().await;
    for i in 0..50 {
        append(&fx.store, &id(&format!("old-{i}")), 0, 1, &[created()])
            .await
            .unwrap();
    }
    let mut feed = Feed::new(fx.store.clone());
    let start = |feed: &mut Feed| {
        ProjectionHandle::start_on(
            EntityTable::<Counter>::default(),
            feed,
            fx.store.clone(),
            Metrics::new(),
        )
    };
    let busy = start(&mut feed);
    let other = start(&mut feed);
    let empty = ProjectionHandle::start_on(
        EntityTable::<MeetingPoint>::default(),
        &mut feed,
        fx.store.clone(),
        Metrics::new(),
    );
    feed.start();
    for table in [&busy, &other] {
        wait_for("a rebuild", LIMIT, || async {
            table.is_ready().then_some(())
        })
        .await;
        assert_eq!(rows(table).await, 50);
    }
    wait_for("the table of a kind with no events", LIMIT, || async {
        empty.is_ready().then_some(())
    })
    .await;
    assert_eq!(empty.ask(|t, _| t.len()).await.unwrap(), 0);

    // Hold `busy`'s thread while commits land: `other` keeps following.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let held = busy.clone();
    actix_rt::spawn(async move {
        held.ask(move |_, _| released.recv().ok()).await.unwrap();
    });
    for i in 0..100 {
        append(&fx.store, &id(&format!("new-{i}")), 0, 1, &[created()])
            .await
            .unwrap();
    }
    wait_for("the other table to follow", LIMIT, || async {
        (rows(&other).await == 150).then_some(())
    })
    .await;

    // Released, the busy table gets everything it missed, in order.
    release.send(()).unwrap();
    wait_for("the busy table to catch up", LIMIT, || async {
        (rows(&busy).await == 150).then_some(())
    })
    .await;
    let position = busy.ask(|_, position| position).await.unwrap();
    assert_eq!(position, fx.store.last_sequence().await.unwrap());
}
