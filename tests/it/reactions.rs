//! The reaction runtime on its own, with a reaction written here: `mirror` copies every change
//! of a counter `x` to a counter `x-copy`, one command per event it saw, named after that
//! event's stream sequence. It shows the runtime's guarantees: a checkpoint that survives a
//! restart (the log is not folded again from the start), and a log delivered again, or two
//! instances at once, write each effect once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchyard::domain::counter::{Counter, CounterCommand, CounterEvent, CounterId};
use switchyard::domain::{Aggregate, Principal, Timestamp};
use switchyard::runtime::reaction::{Due, Observed, Reaction, ReactionHandle, ReactionSettings};
use switchyard::runtime::{CommandMeta, Entities, derived_command_id};
use switchyard::store::StoreError;

use crate::harness::{TestApp, call, http_get, start_app, wait_for};

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Copy {
    Create,
    Add(u64),
}

#[derive(Default, Serialize, Deserialize)]
struct MirrorState {
    /// By the sequence of the event to copy: the copy's id, what to do, and the command id
    /// that does it (so the copy's own event says it is done).
    pending: BTreeMap<u64, (String, Copy, String)>,
}

struct Mirror {
    counters: Entities<Counter>,
    folded: Arc<AtomicUsize>,
    /// Never notes a copy as done: every job runs again at every tick, as after endless
    /// redeliveries, and only the derived command ids keep the effects single.
    forgetful: bool,
}

fn command_name(seq: u64) -> String {
    format!("mirror\n{seq}")
}

impl Reaction for Mirror {
    const NAME: &'static str = "mirror";
    const STATE_VERSION: u16 = 1;
    type State = MirrorState;
    type Job = (String, Vec<(u64, Copy)>);

    fn kinds(&self) -> Vec<&'static str> {
        vec![Counter::KIND]
    }

    fn observe(&self, state: &mut MirrorState, seen: &Observed<'_>) -> Result<(), StoreError> {
        self.folded.fetch_add(1, Ordering::SeqCst);
        if seen.id.ends_with("-copy") {
            if self.forgetful {
                return Ok(());
            }
            let done = seen.message.command_id().unwrap_or_default().to_owned();
            state.pending.retain(|_, (_, _, id)| *id != done);
            return Ok(());
        }
        let copy = format!("{}-copy", seen.id);
        let id = derived_command_id(&command_name(seen.seq())).to_string();
        for event in seen.events::<Counter>()?.unwrap_or_default() {
            let action = match event {
                CounterEvent::Created(_) => Copy::Create,
                CounterEvent::Added(added) => Copy::Add(added.amount),
                CounterEvent::Deleted(_) => continue,
            };
            state
                .pending
                .insert(seen.seq(), (copy.clone(), action, id.clone()));
        }
        Ok(())
    }

    fn due(&self, state: &MirrorState, _: Timestamp) -> Vec<Due<Self::Job>> {
        let mut by_copy: BTreeMap<&str, Vec<(u64, Copy)>> = BTreeMap::new();
        for (seq, (copy, action, _)) in &state.pending {
            by_copy
                .entry(copy)
                .or_default()
                .push((*seq, action.clone()));
        }
        by_copy
            .into_iter()
            .map(|(copy, steps)| Due {
                kind: Counter::KIND,
                id: copy.to_owned(),
                job: (copy.to_owned(), steps),
            })
            .collect()
    }

    fn run(&self, (copy, steps): Self::Job) -> BoxFuture<'static, Result<(), String>> {
        let counters = self.counters.clone();
        Box::pin(async move {
            for (seq, action) in steps {
                let command = match action {
                    Copy::Create => CounterCommand::Create {
                        limit: None,
                        idle_ttl: None,
                    },
                    Copy::Add(amount) => CounterCommand::Add { amount },
                };
                let meta =
                    CommandMeta::new(derived_command_id(&command_name(seq)), Principal::system());
                counters
                    .execute(CounterId::new(&copy).unwrap(), command, meta)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}

fn start_mirror(test: &TestApp, folded: Arc<AtomicUsize>) -> ReactionHandle {
    start(test, folded, false)
}

fn start(test: &TestApp, folded: Arc<AtomicUsize>, forgetful: bool) -> ReactionHandle {
    let app = &test.app;
    switchyard::runtime::reaction::start(
        Mirror {
            counters: app.services().entities::<Counter>().unwrap(),
            folded,
            forgetful,
        },
        app.store().clone(),
        app.ownership().clone(),
        ReactionSettings {
            interval: Duration::from_millis(100),
            checkpoint_every: Duration::from_millis(50),
            max_lag: 10_000,
        },
        switchyard::runtime::system_clock(),
        app.metrics().clone(),
    )
}

async fn value(test: &TestApp, id: &str) -> Option<u64> {
    match call(test, "counter.get", json!({"id": id})).await {
        crate::harness::Reply::Ok(reply) => reply["result"]["value"].as_u64(),
        crate::harness::Reply::Err { .. } => None,
    }
}

/// The command ids of the copy's commits, in order.
async fn copy_commands(test: &TestApp, copy: &str) -> Vec<String> {
    let store = test.app.store();
    store
        .read_subject(&store.subjects().event("counter", copy), 1, None)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| m.command_id().map(str::to_owned))
        .collect()
}

async fn add(test: &TestApp, id: &str, amount: u64) {
    call(test, "counter.add", json!({"id": id, "amount": amount}))
        .await
        .ok();
}

#[actix_rt::test]
async fn a_reaction_acts_once_per_event_and_resumes_from_its_checkpoint() {
    let test = start_app(|_| {}).await;
    let first_fold = Arc::new(AtomicUsize::new(0));
    let first = start_mirror(&test, first_fold.clone());
    call(&test, "counter.create", json!({"id": "x"})).await.ok();
    for amount in 1..=5 {
        add(&test, "x", amount).await;
    }
    wait_for("the copy to catch up", Duration::from_secs(10), || async {
        (value(&test, "x-copy").await == Some(15)).then_some(())
    })
    .await;
    let commands = copy_commands(&test, "x-copy").await;
    assert_eq!(commands.len(), 6, "a create and five adds, once each");
    let (_, metrics) = http_get(test.app.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("switchyard_reaction_position{reaction=\"mirror\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("switchyard_reaction_lag{reaction=\"mirror\"} 0"));
    // Stopped (its checkpoint written), then started again: it folds on from there.
    first.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = test.app.store().last_sequence().await.unwrap();
    add(&test, "x", 100).await;
    let second_fold = Arc::new(AtomicUsize::new(0));
    let second = start_mirror(&test, second_fold.clone());
    wait_for(
        "the copy to see the new add",
        Duration::from_secs(10),
        || async { (value(&test, "x-copy").await == Some(115)).then_some(()) },
    )
    .await;
    assert!(
        second_fold.load(Ordering::SeqCst) <= 3,
        "folded {} messages of {}: not from the start",
        second_fold.load(Ordering::SeqCst),
        total + 2
    );
    assert_eq!(copy_commands(&test, "x-copy").await.len(), 7);
    second.stop();
}

#[actix_rt::test]
async fn a_log_delivered_again_to_two_instances_at_once_writes_each_effect_once() {
    let test = start_app(|_| {}).await;
    let first = start_mirror(&test, Arc::default());
    for id in ["a", "b"] {
        call(&test, "counter.create", json!({"id": id})).await.ok();
        for amount in 1..=3 {
            add(&test, id, amount).await;
        }
    }
    wait_for("both copies", Duration::from_secs(10), || async {
        (value(&test, "a-copy").await == Some(6) && value(&test, "b-copy").await == Some(6))
            .then_some(())
    })
    .await;
    first.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Lose the checkpoint: the next instances fold the whole log again and find every event
    // "to do" once more, and forget nothing is done, so their jobs run again and again; two of
    // them race.
    let js = test.app.store().jetstream();
    let bucket = js.get_key_value("SWITCHYARD_REACTIONS").await.unwrap();
    bucket.purge("mirror").await.unwrap();
    let folds = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let again: Vec<ReactionHandle> = folds
        .iter()
        .map(|fold| start(&test, fold.clone(), true))
        .collect();
    let last = test.app.store().last_sequence().await.unwrap();
    wait_for(
        "both to fold the whole log",
        Duration::from_secs(10),
        || async {
            folds
                .iter()
                .all(|f| f.load(Ordering::SeqCst) as u64 >= last)
                .then_some(())
        },
    )
    .await;
    // Let their jobs run again and again, then check nothing was written twice.
    async fn runs(test: &TestApp) -> u64 {
        let (_, metrics) = http_get(test.app.http_addr(), "/metrics").await;
        metrics
            .lines()
            .find(|l| {
                l.starts_with("switchyard_reaction_jobs_total{reaction=\"mirror\",outcome=\"ok\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    }
    let before = runs(&test).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(runs(&test).await >= before + 4, "the jobs ran again");
    for copy in ["a-copy", "b-copy"] {
        assert_eq!(value(&test, copy).await, Some(6), "{copy}");
        let commands = copy_commands(&test, copy).await;
        let distinct: std::collections::BTreeSet<&String> = commands.iter().collect();
        assert_eq!(commands.len(), 4, "{copy}: {commands:?}");
        assert_eq!(distinct.len(), 4);
    }
    for handle in again {
        handle.stop();
    }
}
