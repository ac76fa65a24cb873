//! Ownership across replicas: one owner per shard, requests forwarded to it, reads that see
//! every acknowledged write, timers run by the owner only, hand-over on stop, and fail-over on
//! a 3-node NATS cluster with real processes killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use switchyard::app::App;
use switchyard::store::StoredMessage;

use crate::harness::{Reply, TestApp, call, http_get, start_app, wait_for};

/// Waits until every shard is owned by the replica that prefers it.
async fn settled(apps: &[&App]) {
    crate::harness::wait_balanced(apps).await;
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

/// What one load client saw.
#[derive(Debug, Default)]
struct Load {
    acked: Vec<String>,
    stale_reads: Vec<String>,
}

/// Adds 1 to its own counter, one command at a time, each retried with its id until it is
/// acknowledged; after each, reads the counter (from whichever replica the queue group picks)
/// and notes a read that misses the write.
async fn load(
    client: async_nats::Client,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Load {
    let id = format!("load-{n}");
    let send = |route: &'static str, body: serde_json::Value| {
        let client = client.clone();
        async move {
            loop {
                let reply = tokio::time::timeout(
                    Duration::from_secs(3),
                    client.request(format!("sy.api.{route}"), body.to_string().into()),
                )
                .await;
                if let Ok(Ok(message)) = reply
                    && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&message.payload)
                {
                    match Reply::from_message(&message, value) {
                        Reply::Ok(value) => return value,
                        Reply::Err { code, .. } if code != "unavailable" && code != "internal" => {
                            panic!("{route} {body}: refused with {code}")
                        }
                        Reply::Err { .. } => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    send(
        "counter.create",
        json!({"id": id, "command_id": format!("create-{n}")}),
    )
    .await;
    let mut seen = Load::default();
    let mut k = 0;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let command_id = format!("c{n}-{k}");
        let wrote = send(
            "counter.add",
            json!({"id": id, "amount": 1, "command_id": command_id}),
        )
        .await;
        seen.acked.push(command_id.clone());
        let read = send("counter.get", json!({"id": id})).await;
        if read["version"].as_u64() < wrote["version"].as_u64() {
            seen.stale_reads.push(command_id);
        }
        k += 1;
    }
    seen
}

/// Which replicas answer `$SRV.INFO`, and the shards each says it owns.
async fn owners(client: &async_nats::Client) -> BTreeMap<String, Vec<u32>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.INFO.switchyard", inbox, "".into())
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    while let Ok(Some(reply)) = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut replies),
    )
    .await
    {
        // "No responders" comes back as an empty status message.
        let Ok(info) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
            continue;
        };
        let owned = info["metadata"]["owned_shards"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect();
        out.insert(
            info["metadata"]["replica"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            owned,
        );
    }
    out
}

fn one_owner_each(owners: &BTreeMap<String, Vec<u32>>, replicas: usize) -> bool {
    let all: Vec<u32> = owners.values().flatten().copied().collect();
    let distinct: BTreeSet<u32> = all.iter().copied().collect();
    owners.len() == replicas && all.len() == 32 && distinct.len() == 32
}

#[actix_rt::test]
async fn three_replicas_on_three_servers_survive_kill_9_of_a_replica_and_of_the_stream_leader() {
    use crate::crash::Switchyard;
    let mut cluster =
        switchyard::nats_server::NatsCluster::start(&crate::harness::nats_binary(), 3, None)
            .unwrap();
    let urls = cluster.urls();
    let servers = serde_json::to_string(&urls).unwrap();
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(urls.clone())
        .await
        .unwrap();
    assert!(
        switchyard::nats_server::wait_for_jetstream(&client, Duration::from_secs(30)).await,
        "the cluster elects a JetStream leader"
    );
    let logs = tempfile::tempdir().unwrap();
    let spawn = |name: &str| {
        Switchyard::spawn_with(
            &urls[0],
            &logs.path().join(format!("{name}.log")),
            &[
                ("SWITCHYARD_NATS__SERVERS", servers.as_str()),
                ("SWITCHYARD_STORE__REPLICAS", "3"),
                ("SWITCHYARD_CLUSTER__REPLICA", name),
                ("SWITCHYARD_NATS__RETRY_ON_INITIAL_CONNECT", "true"),
            ],
        )
    };
    // One first, which creates the streams and buckets; then the others join it.
    let mut replicas = vec![spawn("r0")];
    crate::crash::wait_serving(&client).await;
    replicas.extend(["r1", "r2"].iter().map(|n| spawn(n)));
    let started = std::time::Instant::now();
    while !one_owner_each(&owners(&client).await, 3) {
        if started.elapsed() > Duration::from_secs(60) {
            let logs: Vec<String> = ["r0", "r1", "r2"]
                .iter()
                .map(|n| {
                    std::fs::read_to_string(logs.path().join(format!("{n}.log")))
                        .unwrap_or_default()
                })
                .collect();
            panic!(
                "three replicas never shared every shard: {:?}\n{}",
                owners(&client).await,
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|n| tokio::spawn(load(client.clone(), n, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[0].kill_9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let js = async_nats::jetstream::new(client.clone());
    let leader = js
        .get_stream("SWITCHYARD_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("the event stream has a leader");
    let node: usize = leader.trim_start_matches('n').parse().unwrap();
    cluster.nodes[node].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.nodes[node].restart().unwrap();
    replicas[0] = spawn("r0");
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut loads = Vec::new();
    for client in clients {
        loads.push(client.await.unwrap());
    }

    // Every shard has one owner again, the restarted replica among them.
    wait_for(
        "every shard to have one owner again",
        Duration::from_secs(30),
        || async { one_owner_each(&owners(&client).await, 3).then_some(()) },
    )
    .await;
    let store = EventStoreReader::new(&client).await;
    let mut everything = Vec::new();
    for (n, seen) in loads.iter().enumerate() {
        assert!(
            seen.acked.len() > 10,
            "client {n} made progress: {}",
            seen.acked.len()
        );
        assert!(
            seen.stale_reads.is_empty(),
            "client {n}: reads missed writes: {:?}",
            seen.stale_reads
        );
        let messages = store.entity("counter", &format!("load-{n}")).await;
        // Each acknowledged command is in the log once, and the state counts each once.
        let mut ids: Vec<&str> = messages
            .iter()
            .filter_map(|m| m.command_id())
            .filter(|id| id.starts_with(&format!("c{n}-")))
            .collect();
        ids.sort_unstable();
        let mut acked: Vec<&str> = seen.acked.iter().map(String::as_str).collect();
        acked.sort_unstable();
        assert_eq!(
            ids, acked,
            "client {n}: the log holds each acknowledged command once"
        );
        let read = crate::harness::request(
            &client,
            "counter.get",
            json!({"id": format!("load-{n}")}).to_string(),
            None,
        )
        .await
        .ok();
        assert_eq!(read["result"]["value"], seen.acked.len(), "client {n}");
        everything.extend(messages);
    }
    everything.sort_by_key(|m| m.seq);
    eprintln!(
        "acknowledged per client: {:?}",
        loads.iter().map(|l| l.acked.len()).collect::<Vec<_>>()
    );
    assert_one_owner_at_a_time(&everything);
    let writers: BTreeSet<String> = history(&everything)
        .into_iter()
        .map(|(_, _, r)| r)
        .collect();
    assert!(
        writers.len() >= 2,
        "several replicas owned the load's shards over time: {writers:?}"
    );
}

/// Reads entities' histories straight from the stream, as an auditor would.
struct EventStoreReader {
    store: switchyard::store::EventStore,
}

impl EventStoreReader {
    async fn new(client: &async_nats::Client) -> Self {
        let config = switchyard::config::StoreConfig {
            replicas: 3,
            ..Default::default()
        };
        let store =
            switchyard::store::EventStore::attach(client.clone(), &config, Duration::from_secs(5))
                .await
                .unwrap();
        Self { store }
    }

    async fn entity(&self, kind: &str, id: &str) -> Vec<StoredMessage> {
        let subject = self.store.subjects().event(kind, id);
        self.store.read_subject(&subject, 1, None).await.unwrap()
    }
}

#[actix_rt::test]
async fn a_replicas_own_subjects_refuse_bad_input_and_change_nothing() {
    let test = start_app(|_| {}).await;
    let me = test.app.ownership().replica().to_owned();
    let ask = |subject: String, body: &'static [u8]| {
        let client = test.client.clone();
        async move {
            let reply = client.request(subject, body.into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let entity = format!("sy.replica.{me}.entity.counter");
    for (body, why) in [
        (&b"not json"[..], "not an entity request"),
        (&br#"{"op":"execute","id":"x","command":{"Nope":{}},"meta":{"command_id":"a","principal":"p","digest":null,"fresh":false}}"#[..], "invalid command"),
        (&br#"{"op":"read","id":""}"#[..], "invalid counter id"),
        (&br#"{"op":"execute","id":"x","command":{"Add":{"amount":1}},"meta":{"command_id":"","principal":"p","digest":null,"fresh":false}}"#[..], "command id"),
    ] {
        let reply = ask(entity.clone(), body).await;
        assert_eq!(reply["err"]["kind"], "invalid", "{why}: {reply}");
        assert!(
            reply["err"]["message"].as_str().unwrap().contains(why),
            "{why}: {reply}"
        );
    }
    let reply = ask(format!("sy.replica.{me}.entity.nosuchkind"), b"{}").await;
    assert_eq!(reply["err"]["kind"], "not_found", "{reply}");
    // A forwarded API request is the API: its bad input gets the API's typed errors.
    let reply = test
        .client
        .request(format!("sy.replica.{me}.api.counter.add"), "{".into())
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(Reply::from_message(&reply, value).code(), "invalid");
    // Nothing was written.
    let last = test.app.store().last_sequence().await.unwrap();
    assert_eq!(last, 0, "the log is empty");
    // A well-formed request for a shard this replica owns runs; there is just one replica.
    let reply = ask(entity.clone(), br#"{"op":"read","id":"x"}"#).await;
    assert_eq!(reply["ok"]["version"], 0, "{reply}");
}

/// An earlier owner of the shard may have written the entity's snapshot since this actor
/// read it: the actor's compare-and-set then fails, and it must learn the new revision rather
/// than never snapshot again.
#[actix_rt::test]
async fn an_actor_whose_snapshot_was_superseded_snapshots_again() {
    let test = start_app(|config| config.store.snapshot_every = 2).await;
    let key = switchyard::subject::snapshot_key("counter", "snap");
    let snapshots = test.app.store().snapshots();
    call(&test, "counter.create", json!({"id": "snap"}))
        .await
        .ok();
    call(&test, "counter.add", json!({"id": "snap", "amount": 1}))
        .await
        .ok();
    wait_for("the first snapshot", Duration::from_secs(5), || async {
        snapshots.get(&key).await.map(|_| ())
    })
    .await;
    // Another writer replaces it behind the actor's back.
    snapshots
        .put_raw(&key, b"written by someone else".to_vec())
        .await
        .unwrap();
    for _ in 0..6 {
        call(&test, "counter.add", json!({"id": "snap", "amount": 1}))
            .await
            .ok();
    }
    let (record, _) = wait_for(
        "a snapshot after the other writer's",
        Duration::from_secs(5),
        || async {
            snapshots
                .get(&key)
                .await
                .filter(|(record, _)| record.version >= 6)
        },
    )
    .await;
    assert!(record.version >= 6, "{}", record.version);
}

/// An idle replica renews its leases once a round (every eighth of a TTL), no more: its own
/// presence renewal once woke the keeper for another round at once, a loop of thousands of
/// lease writes a second that took a third of a core from nats-server doing nothing.
#[actix_rt::test]
async fn an_idle_replica_writes_its_leases_once_a_round() {
    let test = start_app(|_| {}).await;
    let mut writes = test
        .client
        .subscribe("$KV.SWITCHYARD_SHARDS.>")
        .await
        .unwrap();
    let window = Duration::from_secs(3);
    let mut count = 0usize;
    let _ = tokio::time::timeout(window, async {
        while futures::StreamExt::next(&mut writes).await.is_some() {
            count += 1;
        }
    })
    .await;
    // A round renews the presence and the 32 leases; a round every 250 ms (TTL 2 s) is 12
    // rounds in 3 s, about 400 writes. The loop wrote over 5,000 a second.
    let rounds = window.as_millis() / (test.config.cluster.lease_ttl.as_millis() / 8);
    let most = (rounds as usize + 4) * (test.config.cluster.shards as usize + 1);
    assert!(
        count <= most,
        "{count} lease writes in {window:?} (at most {most} expected)"
    );
    assert!(count > 0, "the leases are renewed");
}
