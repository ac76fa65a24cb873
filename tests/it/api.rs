//! The command API against a real nats-server: replies, typed errors that change nothing,
//! idempotent retries, bounded mailboxes, concurrent writers, the micro service, and
//! fire-and-forget commands.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Reply, TestApp, call, http_get, request, start_app, wait_for};

async fn last_seq(test: &TestApp) -> u64 {
    test.app.store().last_sequence().await.unwrap()
}

#[actix_rt::test]
async fn commands_and_queries_round_trip() {
    let test = start_app(|_| {}).await;
    let created = call(
        &test,
        "counter.create",
        json!({"id": "skia-rpi-001.example.com", "limit": 10}),
    )
    .await
    .ok();
    assert_eq!(created["result"]["counter"]["value"], 0);
    assert_eq!(created["version"], 1);
    let added = call(
        &test,
        "counter.add",
        json!({"id": "skia-rpi-001.example.com", "amount": 4}),
    )
    .await
    .ok();
    assert_eq!(added["result"]["counter"]["value"], 4);
    assert_eq!(added["version"], 2);
    assert!(added["sequence"].as_u64().unwrap() > created["sequence"].as_u64().unwrap());

    let got = call(
        &test,
        "counter.get",
        json!({"id": "skia-rpi-001.example.com"}),
    )
    .await
    .ok();
    assert_eq!(got["result"]["value"], 4);
    assert_eq!(got["result"]["limit"], 10);
    assert_eq!(got["version"], 2);

    let sequence = added["sequence"].as_u64().unwrap();
    let listed = wait_for(
        "the list to include the add",
        Duration::from_secs(5),
        || async {
            let listed = call(&test, "counter.list", json!({})).await.ok();
            (listed["position"].as_u64().unwrap() >= sequence).then_some(listed)
        },
    )
    .await;
    assert_eq!(listed["result"][0]["id"], "skia-rpi-001.example.com");
    assert_eq!(listed["result"][0]["value"], 4);
    assert!(listed.get("next").is_none());

    let deleted = call(
        &test,
        "counter.delete",
        json!({"id": "skia-rpi-001.example.com"}),
    )
    .await
    .ok();
    assert_eq!(deleted["result"]["counter"], Value::Null);
    assert_eq!(
        call(
            &test,
            "counter.get",
            json!({"id": "skia-rpi-001.example.com"})
        )
        .await
        .code(),
        "not_found"
    );
}

#[actix_rt::test]
async fn bad_input_gets_a_typed_error_and_writes_nothing() {
    let test = start_app(|config| config.api.max_payload = 1024).await;
    call(&test, "counter.create", json!({"id": "c", "limit": 1}))
        .await
        .ok();
    let before = last_seq(&test).await;

    let raw = |route: &'static str, body: &'static [u8]| request(&test.client, route, body, None);
    let cases: Vec<(&str, Reply)> = vec![
        ("malformed JSON", raw("counter.add", b"{\"id\": ").await),
        ("not an object", raw("counter.add", b"[1, 2]").await),
        (
            "wrong field type",
            call(&test, "counter.add", json!({"id": "c", "amount": "three"})).await,
        ),
        (
            "negative amount",
            call(&test, "counter.add", json!({"id": "c", "amount": -1})).await,
        ),
        (
            "missing field",
            call(&test, "counter.add", json!({"id": "c"})).await,
        ),
        (
            "unknown field",
            call(
                &test,
                "counter.add",
                json!({"id": "c", "amount": 1, "amuont": 1}),
            )
            .await,
        ),
        (
            "control character in id",
            call(&test, "counter.add", json!({"id": "a\u{7}b", "amount": 1})).await,
        ),
        (
            "empty id",
            call(&test, "counter.add", json!({"id": "", "amount": 1})).await,
        ),
        (
            "id too long",
            call(
                &test,
                "counter.add",
                json!({"id": "x".repeat(300), "amount": 1}),
            )
            .await,
        ),
        (
            "bad command id",
            call(
                &test,
                "counter.add",
                json!({"id": "c", "amount": 1, "command_id": 5}),
            )
            .await,
        ),
        (
            "zero amount",
            call(&test, "counter.add", json!({"id": "c", "amount": 0})).await,
        ),
        (
            "oversized",
            call(
                &test,
                "counter.add",
                json!({"id": "c", "amount": 1, "pad": "x".repeat(2000)}),
            )
            .await,
        ),
    ];
    for (what, reply) in cases {
        match reply {
            Reply::Err {
                code,
                message,
                status,
                ..
            } => {
                assert_eq!(code, "invalid", "{what}: {message}");
                assert_eq!(status, "400", "{what}");
                assert!(!message.is_empty(), "{what}");
            }
            Reply::Ok(value) => panic!("{what}: accepted: {value}"),
        }
    }
    assert_eq!(
        call(&test, "counter.frobnicate", json!({"id": "c"}))
            .await
            .code(),
        "not_found"
    );
    assert_eq!(
        call(&test, "teapot.add", json!({})).await.code(),
        "not_found"
    );
    assert_eq!(
        call(&test, "counter.add", json!({"id": "nope", "amount": 1}))
            .await
            .code(),
        "not_found"
    );
    assert_eq!(
        call(&test, "counter.create", json!({"id": "c"}))
            .await
            .code(),
        "already_exists"
    );
    assert_eq!(
        call(&test, "counter.add", json!({"id": "c", "amount": 2}))
            .await
            .code(),
        "capacity"
    );
    assert_eq!(
        call(&test, "counter.list", json!({"limit": 0}))
            .await
            .code(),
        "invalid"
    );
    assert_eq!(last_seq(&test).await, before, "nothing was written");
}

#[actix_rt::test]
async fn a_retried_command_gets_its_first_reply_and_writes_once() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "c"})).await.ok();
    let first = call(
        &test,
        "counter.add",
        json!({"id": "c", "amount": 2, "command_id": "add-1"}),
    )
    .await
    .ok();
    call(&test, "counter.add", json!({"id": "c", "amount": 5}))
        .await
        .ok();
    let retry = call(
        &test,
        "counter.add",
        json!({"id": "c", "amount": 2, "command_id": "add-1"}),
    )
    .await
    .ok();
    assert_eq!(
        retry, first,
        "the retry gets the first reply, not the current state"
    );
    assert_eq!(retry["result"]["counter"]["value"], 2);
    // The id may also come as a header.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Switchyard-Command-Id", "add-1");
    let by_header = request(
        &test.client,
        "counter.add",
        json!({"id": "c", "amount": 2}).to_string(),
        Some(headers),
    )
    .await
    .ok();
    assert_eq!(by_header, first);
    assert_eq!(last_seq(&test).await, 3, "create and two adds");
    let got = call(&test, "counter.get", json!({"id": "c"})).await.ok();
    assert_eq!(got["result"]["value"], 7);
}

/// A retry was recognised only while its id was among the entity's last 64 commands or within
/// JetStream's duplicate window (2 minutes); an outside drill found every retry older than 120 s
/// on a busy entity applied a second time. And a reused id with another body got the old reply.
#[actix_rt::test]
async fn a_retry_is_recognised_for_the_idempotency_window_however_busy_the_entity() {
    let test = start_app(|config| {
        // The server's own deduplication ends quickly here, so only the index can answer.
        config.store.duplicate_window = Duration::from_secs(1);
    })
    .await;
    call(&test, "counter.create", json!({"id": "busy"}))
        .await
        .ok();
    let first = call(
        &test,
        "counter.add",
        json!({"id": "busy", "amount": 5, "command_id": "early"}),
    )
    .await
    .ok();
    for _ in 0..100 {
        call(&test, "counter.add", json!({"id": "busy", "amount": 1}))
            .await
            .ok();
    }
    // Past the server's duplicate window (a bounded wait for a server timer, not for an effect).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = last_seq(&test).await;
    let retry = call(
        &test,
        "counter.add",
        json!({"id": "busy", "amount": 5, "command_id": "early"}),
    )
    .await
    .ok();
    assert_eq!(retry, first, "answered with its first reply");
    assert_eq!(last_seq(&test).await, before, "applied once");
    let reused = call(
        &test,
        "counter.add",
        json!({"id": "busy", "amount": 7, "command_id": "early"}),
    )
    .await;
    assert_eq!(reused.code_and_reason(), "conflict/command_id_reused");
    assert_eq!(last_seq(&test).await, before);
    // From a fresh process too: the index is durable.
    let test = test.restart().await;
    let retry = call(
        &test,
        "counter.add",
        json!({"id": "busy", "amount": 5, "command_id": "early"}),
    )
    .await
    .ok();
    assert_eq!(retry, first);
    let got = call(&test, "counter.get", json!({"id": "busy"})).await.ok();
    assert_eq!(got["result"]["value"], 105);
}

#[actix_rt::test]
async fn a_retry_is_recognised_after_a_restart_of_the_control_plane() {
    let test = start_app(|_| {}).await;
    call(
        &test,
        "counter.create",
        json!({"id": "c", "command_id": "create-c"}),
    )
    .await
    .ok();
    let first = call(
        &test,
        "counter.add",
        json!({"id": "c", "amount": 3, "command_id": "add-c"}),
    )
    .await
    .ok();
    let test = test.restart().await;
    let retry = call(
        &test,
        "counter.add",
        json!({"id": "c", "amount": 3, "command_id": "add-c"}),
    )
    .await
    .ok();
    assert_eq!(retry, first);
    let again = call(
        &test,
        "counter.create",
        json!({"id": "c", "command_id": "create-c"}),
    )
    .await
    .ok();
    assert_eq!(
        again["version"], 1,
        "the create is answered as it was, not with already_exists"
    );
    assert_eq!(last_seq(&test).await, 2);
}

/// A control plane that joined its queue group before its read models had rebuilt answered
/// lists with partial pages (and placed reservations from half a pod table) during a restart.
#[actix_rt::test]
async fn a_restarting_control_plane_takes_no_request_before_its_read_models_caught_up() {
    use switchyard::domain::counter::{Added, Counter, CounterEvent, CounterId, Created};
    use switchyard::domain::{Aggregate, Principal, Timestamp};
    use switchyard::store::Commit;

    let test = start_app(|_| {}).await;
    // A log long enough that rebuilding it takes a while: 500 counters of 200 events each,
    // then the one pod, last.
    let events: Vec<CounterEvent> = std::iter::once(CounterEvent::Created(Created {
        limit: None,
        idle_ttl_ms: None,
        at: Timestamp::from_unix_nanos(1),
    }))
    .chain((1..200).map(|_| {
        CounterEvent::Added(Added {
            amount: 1,
            at: Timestamp::from_unix_nanos(2),
        })
    }))
    .collect();
    let store = test.app.store().clone();
    futures::stream::iter(0..500)
        .for_each_concurrent(64, |n| {
            let (store, events) = (store.clone(), &events);
            async move {
                let id = CounterId::new(format!("bulk-{n}")).unwrap();
                store
                    .append(Commit {
                        fence: None,
                        kind: Counter::KIND,
                        entity: id.as_str(),
                        expected: 0,
                        entity_version: events.len() as u64,
                        command_id: &switchyard::runtime::new_command_id(),
                        principal: &Principal::anonymous(),
                        digest: None,
                        generated_id: false,
                        recorded_at: Timestamp::from_unix_nanos(3),
                        events,
                    })
                    .await
                    .unwrap();
            }
        })
        .await;
    call(&test, "pod.add", json!({"pod": "p0"})).await.ok();
    let TestApp {
        server,
        app,
        client,
        config,
        cleanup: _cleanup,
    } = test;
    app.shutdown().await;

    let starting = actix_rt::spawn({
        let config = config.clone();
        async move {
            switchyard::app::App::start(&config, switchyard::runtime::system_clock())
                .await
                .unwrap()
        }
    });
    let mut answered = 0;
    while answered < 20 {
        match client.request("sy.api.pod.list", "{}".into()).await {
            Ok(message) => {
                let listed: Value = serde_json::from_slice(&message.payload).unwrap();
                assert_eq!(
                    listed["result"][0]["name"], "p0",
                    "reply {answered} lists the whole pod table: {listed}"
                );
                answered += 1;
            }
            // Not serving yet.
            Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(err) => panic!("request failed: {err}"),
        }
    }
    let app = starting.await.unwrap();
    assert!(app.is_ready());
    drop(server);
}

#[actix_rt::test]
async fn a_full_mailbox_answers_unavailable_and_drops_nothing() {
    let test = start_app(|config| config.runtime.mailbox_capacity = 2).await;
    call(&test, "counter.create", json!({"id": "hot"}))
        .await
        .ok();
    let replies = futures::future::join_all(
        (0..200).map(|_| call(&test, "counter.add", json!({"id": "hot", "amount": 1}))),
    )
    .await;
    let mut ok = 0;
    let mut unavailable = 0;
    for reply in replies {
        match reply {
            Reply::Ok(_) => ok += 1,
            Reply::Err { code, .. } if code == "unavailable" => unavailable += 1,
            Reply::Err { code, message, .. } => panic!("{code}: {message}"),
        }
    }
    assert!(unavailable > 0, "a mailbox of 2 cannot hold 200 requests");
    assert_eq!(ok + unavailable, 200, "every request was answered");
    let got = call(&test, "counter.get", json!({"id": "hot"})).await.ok();
    assert_eq!(
        got["result"]["value"], ok,
        "every success counted once, every refusal not at all"
    );
}

#[actix_rt::test]
async fn two_control_planes_writing_one_entity_stay_consistent() {
    let test = start_app(|config| {
        config.runtime.conflict_retries = 50;
        config.runtime.mailbox_capacity = 1000;
    })
    .await;
    // A second instance on the same NATS: requests are spread across both by the queue group.
    let second = switchyard::app::App::start(&test.config, switchyard::runtime::system_clock())
        .await
        .unwrap();
    call(&test, "counter.create", json!({"id": "shared"}))
        .await
        .ok();
    let replies = futures::future::join_all(
        (0..200).map(|_| call(&test, "counter.add", json!({"id": "shared", "amount": 1}))),
    )
    .await;
    for reply in replies {
        reply.ok();
    }
    let subject = test.app.store().subjects().event("counter", "shared");
    let history = test
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    assert_eq!(history.len(), 201);
    let versions: Vec<u64> = history
        .iter()
        .map(|m| m.entity_version().unwrap())
        .collect();
    assert_eq!(versions, (1..=201).collect::<Vec<_>>());
    let state = test
        .app
        .store()
        .load::<switchyard::domain::counter::Counter>(&"shared".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(state.version, 201);
    // Both instances served some of the adds, so they really did race on the entity.
    for app in [&test.app, &second] {
        let metrics = app.metrics().render();
        assert!(
            metrics
                .contains("switchyard_requests_total{kind=\"counter\",verb=\"add\",code=\"ok\"}"),
            "{metrics}"
        );
    }
    second.shutdown().await;
}

#[actix_rt::test]
async fn the_micro_service_answers_ping_info_and_stats() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "c"})).await.ok();
    call(&test, "counter.create", json!({"id": "c"}))
        .await
        .code();
    let ping: Value = serde_json::from_slice(
        &test
            .client
            .request("$SRV.PING.switchyard", "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "switchyard");
    let info: Value = serde_json::from_slice(
        &test
            .client
            .request("$SRV.INFO", "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert!(subjects.contains(&"sy.api.counter.add"), "{subjects:?}");
    let id = ping["id"].as_str().unwrap();
    let stats: Value = serde_json::from_slice(
        &test
            .client
            .request(format!("$SRV.STATS.switchyard.{id}"), "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    let create = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "counter-create")
        .unwrap();
    assert_eq!(create["num_requests"], 2);
    assert_eq!(create["num_errors"], 1);
    assert!(create["last_error"].as_str().unwrap().starts_with("409:"));
}

#[actix_rt::test]
async fn fire_and_forget_commands_wait_for_a_control_plane_that_is_down() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "queued"}))
        .await
        .ok();
    let TestApp {
        server,
        app,
        client,
        config,
        cleanup,
    } = test;
    app.shutdown().await;

    // The control plane is down; a publisher's commands are kept by the work-queue stream.
    let js = async_nats::jetstream::new(client.clone());
    for i in 0..10 {
        let body = json!({"id": "queued", "amount": 1, "command_id": format!("ff-{i}")});
        #[allow(clippy::disallowed_methods)] // a publisher's publish, not the control plane's
        let ack = js
            .publish("sy.cmd.counter.add", body.to_string().into())
            .await
            .unwrap();
        ack.await.unwrap();
    }
    // A duplicate (same command id) and a malformed command.
    #[allow(clippy::disallowed_methods)]
    let ack = js
        .publish(
            "sy.cmd.counter.add",
            json!({"id": "queued", "amount": 1, "command_id": "ff-3"})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    ack.await.unwrap();
    let mut results = client.subscribe("sy.result.>").await.unwrap();
    #[allow(clippy::disallowed_methods)]
    let ack = js
        .publish("sy.cmd.counter.add", "not json".into())
        .await
        .unwrap();
    ack.await.unwrap();

    let app = switchyard::app::App::start(&config, switchyard::runtime::system_clock())
        .await
        .unwrap();
    let test = TestApp {
        server,
        app,
        client,
        config,
        cleanup,
    };
    let value = wait_for(
        "the queued commands to be applied",
        Duration::from_secs(10),
        || async {
            let got = call(&test, "counter.get", json!({"id": "queued"}))
                .await
                .ok();
            (got["result"]["value"] == 10).then_some(got)
        },
    )
    .await;
    assert_eq!(value["version"], 11, "ten adds, the duplicate applied once");
    // Every command's outcome is published, the malformed one as a typed error.
    let mut codes = Vec::new();
    while codes.len() < 12 {
        let message = tokio::time::timeout(Duration::from_secs(5), results.next())
            .await
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        codes.push(body["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "invalid").count(),
        1,
        "{codes:?}"
    );
    // The queue is empty: everything was acknowledged, including the malformed command.
    let js = async_nats::jetstream::new(test.client.clone());
    wait_for(
        "the work queue to drain",
        Duration::from_secs(5),
        || async {
            let stream = js.get_stream("SWITCHYARD_COMMANDS").await.unwrap();
            (stream.cached_info().state.messages == 0).then_some(())
        },
    )
    .await;
}

/// Tried by hand: two control planes, one hot counter, request/reply callers and a
/// fire-and-forget publisher. A fire-and-forget command whose entity stayed contended got
/// `conflict`, was acknowledged, and was gone (193 of 5,750); and nothing kept one entity's
/// commands in the order they were published.
#[actix_rt::test]
async fn contended_fire_and_forget_commands_are_all_applied_once_in_publish_order() {
    // No conflict retries inside the actor: every lost race is a contended outcome.
    let test = start_app(|config| {
        config.runtime.conflict_retries = 0;
        config.runtime.mailbox_capacity = 1000;
        config.api.command_retry_delay = Duration::from_millis(10);
    })
    .await;
    let second = switchyard::app::App::start(&test.config, switchyard::runtime::system_clock())
        .await
        .unwrap();
    crate::harness::wait_balanced(&[&test.app, &second]).await;
    call(&test, "counter.create", json!({"id": "hot"}))
        .await
        .ok();
    const FIRE_AND_FORGET: usize = 300;
    let js = async_nats::jetstream::new(test.client.clone());
    let publisher = async {
        for i in 0..FIRE_AND_FORGET {
            let body = json!({"id": "hot", "amount": 1, "command_id": format!("ff-{i:04}")});
            #[allow(clippy::disallowed_methods)] // a publisher's publish, not the control plane's
            let ack = js
                .publish("sy.cmd.counter.add", body.to_string().into())
                .await
                .unwrap();
            ack.await.unwrap();
        }
    };
    // Request/reply callers race the fire-and-forget commands on the same counter, through
    // both control planes.
    let callers = futures::future::join_all((0..16).map(|_| async {
        let mut applied = 0u64;
        for _ in 0..25 {
            if let Reply::Ok(_) =
                call(&test, "counter.add", json!({"id": "hot", "amount": 1})).await
            {
                applied += 1;
            }
        }
        applied
    }));
    let ((), applied) = futures::join!(publisher, callers);
    let applied: u64 = applied.iter().sum();
    let expected = applied + FIRE_AND_FORGET as u64;
    wait_for(
        "every fire-and-forget command to be applied",
        Duration::from_secs(30),
        || async {
            let got = call(&test, "counter.get", json!({"id": "hot"})).await.ok();
            (got["result"]["value"] == expected).then_some(())
        },
    )
    .await;
    let subject = test.app.store().subjects().event("counter", "hot");
    let history = test
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    let fired: Vec<&str> = history
        .iter()
        .filter_map(|m| m.command_id())
        .filter(|id| id.starts_with("ff-"))
        .collect();
    let in_order: Vec<String> = (0..FIRE_AND_FORGET).map(|i| format!("ff-{i:04}")).collect();
    assert_eq!(fired, in_order, "each applied once, in publish order");
    // Both control planes took requests, but one owner wrote every commit: the other sent
    // its requests on.
    let writers: std::collections::BTreeSet<&str> = history
        .iter()
        .filter_map(|m| m.header("Switchyard-Replica"))
        .collect();
    assert_eq!(writers.len(), 1, "one owner wrote the counter: {writers:?}");
    let (_, metrics) = http_get(test.app.http_addr(), "/metrics").await;
    let (_, other) = http_get(second.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("switchyard_forwarded_total{outcome=")
            || other.contains("switchyard_forwarded_total{outcome="),
        "requests reached the replica that does not own the counter, and were forwarded"
    );
    second.shutdown().await;
}

#[actix_rt::test]
async fn idle_entities_are_passivated_and_come_back_from_their_snapshot() {
    let test = start_app(|config| {
        config.runtime.passivate_after = Duration::from_millis(100);
        config.store.snapshot_every = 2;
    })
    .await;
    call(&test, "counter.create", json!({"id": "sleepy"}))
        .await
        .ok();
    for _ in 0..4 {
        call(&test, "counter.add", json!({"id": "sleepy", "amount": 1}))
            .await
            .ok();
    }
    wait_for(
        "the actor to be passivated",
        Duration::from_secs(5),
        || async {
            (test
                .app
                .services()
                .entities::<switchyard::domain::counter::Counter>()
                .unwrap()
                .active()
                .await
                == 0)
                .then_some(())
        },
    )
    .await;
    let got = call(&test, "counter.get", json!({"id": "sleepy"}))
        .await
        .ok();
    assert_eq!(got["result"]["value"], 4);
    assert_eq!(got["version"], 5);
    assert_eq!(
        test.app
            .services()
            .entities::<switchyard::domain::counter::Counter>()
            .unwrap()
            .active()
            .await,
        1
    );
}

#[actix_rt::test]
async fn lists_come_in_pages() {
    let test = start_app(|_| {}).await;
    let mut last = 0;
    for i in 0..25 {
        last = call(&test, "counter.create", json!({"id": format!("c{i:02}")}))
            .await
            .ok()["sequence"]
            .as_u64()
            .unwrap();
    }
    let mut ids = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = call(&test, "counter.list", json!({"limit": 10, "after": after}))
            .await
            .ok();
        if page["position"].as_u64().unwrap() < last {
            ids.clear();
            after = Value::Null;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        ids.extend(
            page["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        match page.get("next") {
            Some(next) => after = next.clone(),
            None => break,
        }
    }
    assert_eq!(ids, (0..25).map(|i| format!("c{i:02}")).collect::<Vec<_>>());
}

#[actix_rt::test]
async fn probes_report_health_readiness_and_metrics() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "m"})).await.ok();
    let (status, body) = http_get(test.app.http_addr(), "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(test.app.http_addr(), "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let readiness: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["checks"]["counter_table"], "caught up");
    let (status, body) = http_get(test.app.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("switchyard_requests_total{kind=\"counter\",verb=\"create\",code=\"ok\"} 1"),
        "{body}"
    );
    assert!(body.contains("switchyard_appends_total"), "{body}");
}

#[actix_rt::test]
async fn one_entity_actor_never_interleaves_two_commands() {
    let test = start_app(|config| config.runtime.mailbox_capacity = 500).await;
    call(&test, "counter.create", json!({"id": "serial"}))
        .await
        .ok();
    let replies = futures::future::join_all(
        (0..100).map(|_| call(&test, "counter.add", json!({"id": "serial", "amount": 1}))),
    )
    .await;
    let mut versions: Vec<u64> = replies
        .into_iter()
        .map(|r| r.ok()["version"].as_u64().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=101).collect::<Vec<_>>(),
        "each command saw the one before it"
    );
    // Had two commands of one actor interleaved, both would have appended against the same
    // expected sequence and one would have met a conflict.
    let metrics = test.app.metrics().render();
    assert!(
        metrics.contains("switchyard_appends_total{kind=\"counter\",outcome=\"ok\"} 101"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_appends_total{kind=\"counter\",outcome=\"conflict\"} 0"),
        "{metrics}"
    );
}
