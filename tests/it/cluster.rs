//! Ownership across replicas: one owner per shard, requests forwarded to it, reads that see
//! every acknowledged write, timers run by the owner only, hand-over on stop, and fail-over on
//! a 3-node NATS cluster with real processes killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use switchyard::app::App;
use switchyard::store::StoredMessage;

use crate::harness::{Reply, TestApp, call, http_get, start_app, wait_for};

/// Waits until the replicas' shards are disjoint, cover every shard, and each has some.
async fn settled(apps: &[&App]) {
    wait_for(
        "every shard to have one owner",
        Duration::from_secs(20),
        || async {
            let shards = apps[0].ownership().shards();
            let owned: Vec<Vec<u32>> = apps.iter().map(|a| a.ownership().owned()).collect();
            let all: Vec<u32> = owned.iter().flatten().copied().collect();
            let distinct: BTreeSet<u32> = all.iter().copied().collect();
            (all.len() == shards as usize
                && distinct.len() == shards as usize
                && owned.iter().all(|o| !o.is_empty()))
            .then_some(())
        },
    )
    .await;
}

async fn second_replica(test: &TestApp) -> App {
    App::start(&test.config, switchyard::runtime::system_clock())
        .await
        .expect("a second replica starts")
}

fn history(messages: &[StoredMessage]) -> Vec<(u32, u64, String)> {
    messages
        .iter()
        .filter_map(|m| {
            Some((
                m.header("Switchyard-Shard")?.parse().ok()?,
                m.header("Switchyard-Fence")?.parse().ok()?,
                m.header("Switchyard-Replica")?.to_owned(),
            ))
        })
        .collect()
}

/// No two replicas ever acted as owner of one shard at once, from the log alone: within a
/// shard, fencing tokens never go down in stream order, and each token is one replica's.
fn assert_one_owner_at_a_time(messages: &[StoredMessage]) {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut holder: BTreeMap<(u32, u64), String> = BTreeMap::new();
    for (shard, token, replica) in history(messages) {
        let previous = last.insert(shard, token).unwrap_or(0);
        assert!(
            token >= previous,
            "shard {shard}: a commit under token {token} after one under {previous}"
        );
        let owner = holder
            .entry((shard, token))
            .or_insert_with(|| replica.clone());
        assert_eq!(
            owner, &replica,
            "shard {shard} token {token} written by two replicas"
        );
    }
}

#[actix_rt::test]
async fn two_replicas_share_the_shards_and_every_read_sees_the_write_before_it() {
    let test = start_app(|_| {}).await;
    let second = second_replica(&test).await;
    settled(&[&test.app, &second]).await;
    for i in 0..30 {
        call(&test, "counter.create", json!({"id": format!("raw-{i}")}))
            .await
            .ok();
    }
    // The queue group hands each request to either replica; without one owner per entity,
    // about half of these reads came from a warm actor that had not seen the write.
    let mut stale = Vec::new();
    for i in 0..300 {
        let id = format!("raw-{}", i % 30);
        let wrote = call(&test, "counter.add", json!({"id": id, "amount": 1}))
            .await
            .ok();
        let read = call(&test, "counter.get", json!({"id": id})).await.ok();
        if read["version"].as_u64() < wrote["version"].as_u64() {
            stale.push((id, wrote["version"].clone(), read["version"].clone()));
        }
    }
    assert!(
        stale.is_empty(),
        "reads that missed the write before them: {stale:?}"
    );
    let forwarded = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("switchyard_forwarded_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (_, one) = http_get(test.app.http_addr(), "/metrics").await;
    let (_, two) = http_get(second.http_addr(), "/metrics").await;
    assert!(
        forwarded(&one) + forwarded(&two) > 0.0,
        "requests reached non-owners and were forwarded"
    );
    assert!(one.contains("switchyard_shard_owned{shard=\"0\"}"));
    // Every commit names its shard's owner, and the owners never overlapped.
    let mut messages = Vec::new();
    for i in 0..30 {
        let subject = test
            .app
            .store()
            .subjects()
            .event("counter", &format!("raw-{i}"));
        messages.extend(
            test.app
                .store()
                .read_subject(&subject, 1, None)
                .await
                .unwrap(),
        );
    }
    messages.sort_by_key(|m| m.seq);
    assert!(history(&messages).len() >= 330);
    assert_one_owner_at_a_time(&messages);
    // $SRV.INFO says which shards each replica owns.
    let mut owned = BTreeSet::new();
    let inbox_subject = test.client.new_inbox();
    let mut inbox = test.client.subscribe(inbox_subject.clone()).await.unwrap();
    test.client
        .publish_with_reply("$SRV.INFO.switchyard", inbox_subject, "".into())
        .await
        .unwrap();
    for _ in 0..2 {
        let info =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut inbox))
                .await
                .unwrap()
                .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
        for shard in info["metadata"]["owned_shards"]
            .as_str()
            .unwrap()
            .split(',')
        {
            assert!(owned.insert(shard.to_owned()), "shard {shard} owned twice");
        }
    }
    assert_eq!(owned.len(), 32);
    second.shutdown().await;
}

#[actix_rt::test]
async fn only_the_owner_of_its_shard_reaps_an_entity() {
    let test = start_app(|_| {}).await;
    let second = second_replica(&test).await;
    settled(&[&test.app, &second]).await;
    // Counters on both replicas' shards, each due for deletion 300 ms after its creation.
    let ids: Vec<String> = (0..20).map(|i| format!("idle-{i}")).collect();
    for id in &ids {
        call(
            &test,
            "counter.create",
            json!({"id": id, "idle_ttl_ms": 300}),
        )
        .await
        .ok();
    }
    for id in &ids {
        wait_for(
            "the counter to be reaped",
            Duration::from_secs(10),
            || async {
                match call(&test, "counter.get", json!({"id": id})).await {
                    Reply::Err { code, .. } if code == "not_found" => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
    let mut reaped_by = BTreeMap::new();
    for id in &ids {
        let subject = test.app.store().subjects().event("counter", id);
        let messages = test
            .app
            .store()
            .read_subject(&subject, 1, None)
            .await
            .unwrap();
        let expiries: Vec<&StoredMessage> = messages
            .iter()
            .filter(|m| m.header("Switchyard-Event-Type") == Some("counter.deleted"))
            .collect();
        assert_eq!(expiries.len(), 1, "{id}: one deletion in the log");
        let shard = test.app.ownership().shard_of("counter", id);
        let writer = expiries[0].header("Switchyard-Replica").unwrap().to_owned();
        let owner = if test.app.ownership().owns(shard) {
            test.app.ownership().replica()
        } else {
            second.ownership().replica()
        };
        assert_eq!(writer, owner, "{id}: reaped by the owner of shard {shard}");
        *reaped_by.entry(writer).or_insert(0) += 1;
    }
    // Each replica reaped its own, and counted only those: the other did not even try.
    let reaped = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("switchyard_reaped_total{kind=\"counter\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    };
    let (_, one) = http_get(test.app.http_addr(), "/metrics").await;
    let (_, two) = http_get(second.http_addr(), "/metrics").await;
    let mine = |app: &App| {
        reaped_by
            .get(app.ownership().replica())
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(reaped(&one), mine(&test.app));
    assert_eq!(reaped(&two), mine(&second));
    assert_eq!(reaped(&one) + reaped(&two), ids.len());
    second.shutdown().await;
}

#[actix_rt::test]
async fn a_stopped_replica_hands_its_shards_over_at_once() {
    // Leases that would take half a minute to lapse: only a hand-over is this quick.
    let test = start_app(|config| config.cluster.lease_ttl = Duration::from_secs(30)).await;
    let second = second_replica(&test).await;
    settled(&[&test.app, &second]).await;
    let theirs = second.ownership().owned();
    assert!(!theirs.is_empty());
    // A counter on a shard the second replica owns, written through it.
    let id = (0..)
        .map(|i| format!("moving-{i}"))
        .find(|id| theirs.contains(&second.ownership().shard_of("counter", id)))
        .unwrap();
    call(&test, "counter.create", json!({"id": id})).await.ok();
    call(&test, "counter.add", json!({"id": id, "amount": 2}))
        .await
        .ok();
    second.shutdown().await;
    wait_for(
        "the survivor to own every shard",
        Duration::from_secs(10),
        || async { (test.app.ownership().owned().len() == 32).then_some(()) },
    )
    .await;
    let read = call(&test, "counter.get", json!({"id": id})).await.ok();
    assert_eq!(read["result"]["value"], 2);
    let wrote = call(&test, "counter.add", json!({"id": id, "amount": 1}))
        .await
        .ok();
    assert_eq!(wrote["result"]["counter"]["value"], 3);
}
