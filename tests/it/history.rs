//! What an entity's history may hold besides the store's own commits: a foreign message (a
//! stray publish), which is skipped, reported and repairable, and an event of a newer
//! Switchyard, which stops the read models that meet it instead of leaving a hole.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::harness::{TestApp, call, http_get, start_app, wait_for};

async fn last_seq(test: &TestApp) -> u64 {
    test.app.store().last_sequence().await.unwrap()
}

/// Publishes `payload` with `headers` straight onto `subject` (core NATS, as any client with
/// access could) and waits for the stream to store it; returns its sequence.
async fn publish_raw(
    test: &TestApp,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: &'static [u8],
) -> u64 {
    let before = last_seq(test).await;
    test.client
        .publish_with_headers(subject.to_owned(), headers, Bytes::from_static(payload))
        .await
        .unwrap();
    test.client.flush().await.unwrap();
    wait_for("the stream to store it", Duration::from_secs(5), || async {
        let last = last_seq(test).await;
        (last > before).then_some(last)
    })
    .await
}

async fn readyz(test: &TestApp) -> (u16, Value) {
    let (status, body) = http_get(test.app.http_addr(), "/readyz").await;
    (status, serde_json::from_str(&body).unwrap())
}

/// Found by hand: eight garbage bytes published to `sy.evt.counter.forged` made every later
/// command to that counter answer `internal`, reads serve the state from before, `/readyz`
/// stay green, and nothing could undo it (the stream denies deletes).
#[actix_rt::test]
async fn a_garbage_publish_is_skipped_reported_and_repaired_by_an_operator() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "forged"}))
        .await
        .ok();
    call(&test, "counter.add", json!({"id": "forged", "amount": 1}))
        .await
        .ok();
    let garbage = publish_raw(
        &test,
        "sy.evt.counter.forged",
        async_nats::HeaderMap::new(),
        b"\x8f\x01\xff\x00\x13\x37\xba\xad",
    )
    .await;

    let added = call(&test, "counter.add", json!({"id": "forged", "amount": 2}))
        .await
        .ok();
    assert_eq!(
        added["result"]["counter"]["value"], 3,
        "the entity is not wedged"
    );
    assert_eq!(added["version"], 3, "the foreign message is no event");
    let got = call(&test, "counter.get", json!({"id": "forged"}))
        .await
        .ok();
    assert_eq!(got["result"]["value"], 3);

    // Reported, not failed: the API still serves.
    let (status, body) = wait_for("the report", Duration::from_secs(5), || async {
        let (status, body) = readyz(&test).await;
        body.get("foreign_messages")
            .is_some()
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["foreign_messages"]["count"], 1);
    assert_eq!(body["foreign_messages"]["latest"][0]["seq"], garbage);
    assert_eq!(
        body["foreign_messages"]["latest"][0]["subject"],
        "sy.evt.counter.forged"
    );
    let (_, metrics) = http_get(test.app.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("switchyard_foreign_messages 1"),
        "{metrics}"
    );
    let sequence = added["sequence"].as_u64().unwrap();
    let listed = wait_for("the list", Duration::from_secs(5), || async {
        let listed = call(&test, "counter.list", json!({})).await.ok();
        (listed["position"].as_u64().unwrap() >= sequence).then_some(listed)
    })
    .await;
    assert_eq!(listed["result"][0]["value"], 3);

    // Bad repairs change nothing.
    let before = last_seq(&test).await;
    for bad in [
        json!({"id": "forged", "note": " "}),
        json!({"id": "forged", "note": "x", "seqs": [before + 100]}),
        json!({"id": "forged", "note": "x", "extra": 1}),
    ] {
        assert_eq!(
            call(&test, "counter.acknowledge_foreign", bad.clone())
                .await
                .code(),
            "invalid",
            "{bad}"
        );
    }
    assert_eq!(last_seq(&test).await, before);

    let repaired = call(
        &test,
        "counter.acknowledge_foreign",
        json!({"id": "forged", "note": "a stray publish from a test", "command_id": "ack-1"}),
    )
    .await
    .ok();
    assert_eq!(repaired["acknowledged"], json!([garbage]));
    assert_eq!(repaired["remaining"], json!([]));
    wait_for("the report to clear", Duration::from_secs(5), || async {
        readyz(&test)
            .await
            .1
            .get("foreign_messages")
            .is_none()
            .then_some(())
    })
    .await;
    // A retry is the same acknowledgement; another finds nothing left.
    let retried = call(
        &test,
        "counter.acknowledge_foreign",
        json!({"id": "forged", "note": "a stray publish from a test", "command_id": "ack-1"}),
    )
    .await
    .ok();
    assert_eq!(retried["acknowledged"], json!([garbage]));
    assert_eq!(retried["sequence"], repaired["sequence"]);
    let again = call(
        &test,
        "counter.acknowledge_foreign",
        json!({"id": "forged", "note": "again"}),
    )
    .await
    .ok();
    assert_eq!(again["acknowledged"], json!([]));

    // The audit shows both, and who acknowledged.
    let mut records = Vec::new();
    let filter = switchyard::audit::Filter {
        kind: Some("counter".into()),
        entity: Some("forged".into()),
        ..Default::default()
    };
    switchyard::audit::replay(test.app.store(), &filter, |record| {
        records.push(record);
        Ok(())
    })
    .await
    .unwrap();
    let foreign = records.iter().find(|r| r.seq == garbage).unwrap();
    assert!(foreign.foreign.is_some(), "{foreign:?}");
    let ack = records.iter().find(|r| r.record.is_some()).unwrap();
    assert_eq!(ack.record.as_ref().unwrap()["type"], "acknowledge_foreign");
    assert_eq!(ack.principal.as_deref(), Some("anonymous"));

    // A new process rebuilds the same state and reports nothing acknowledged.
    let test = test.restart().await;
    assert!(readyz(&test).await.1.get("foreign_messages").is_none());
    let got = call(&test, "counter.get", json!({"id": "forged"}))
        .await
        .ok();
    assert_eq!(got["result"]["value"], 3);
    let added = call(&test, "counter.add", json!({"id": "forged", "amount": 1}))
        .await
        .ok();
    assert_eq!(added["result"]["counter"]["value"], 4);
}

/// Commit headers as the store writes them, for a hand-made commit of a newer Switchyard.
fn commit_headers(types: &str, entity_version: u64, command_id: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Switchyard-Event-Type", types);
    headers.insert("Switchyard-Schema-Version", "3");
    headers.insert(
        "Switchyard-Entity-Version",
        entity_version.to_string().as_str(),
    );
    headers.insert("Switchyard-Command-Id", command_id);
    headers.insert("Switchyard-Principal", "newer-replica");
    headers.insert("Content-Type", "application/json");
    headers
}

/// In a rolling upgrade that adds an event version, an old replica's read model skipped the
/// events it could not decode; its reconciler then saw a live lease without its meeting point
/// and released it. Now the read model stops, says why, and the reconciler waits.
#[actix_rt::test]
async fn an_event_of_a_newer_version_stops_the_read_model_and_the_reconciler_waits() {
    use switchyard::domain::Aggregate;
    use switchyard::domain::switchboard::pod::{Pod, PodEvent, PortLeased};
    use switchyard::domain::switchboard::{MachineId, PodName};
    use switchyard::store::Commit;

    let test = start_app(|config| {
        config.switchboard.reconcile_interval = Duration::from_millis(20);
        config.switchboard.reconcile_grace = Duration::from_millis(100);
    })
    .await;
    call(&test, "pod.add", json!({"pod": "p0"})).await.ok();
    // A newer replica reserves for m2: it leases a port with an event both versions read...
    let store = test.app.store();
    let pod = store
        .load::<Pod>(&PodName::new("p0").unwrap())
        .await
        .unwrap();
    let lease = switchyard::domain::CommandId::new("newer-r1").unwrap();
    store
        .append(Commit {
            fence: None,
            kind: Pod::KIND,
            entity: "p0",
            expected: pod.last_seq,
            entity_version: pod.version + 1,
            command_id: &switchyard::runtime::new_command_id(),
            principal: &switchyard::domain::Principal::new("newer-replica").unwrap(),
            digest: None,
            generated_id: false,
            recorded_at: switchyard::runtime::system_clock()(),
            events: &[PodEvent::PortLeased(PortLeased {
                port: 10000,
                machine: MachineId::new("m2").unwrap(),
                lease: lease.clone(),
                at: switchyard::runtime::system_clock()(),
            })],
        })
        .await
        .unwrap();
    // (The pod's keep-alive makes this replica's warm pod actor see that write.)
    call(&test, "pod.keep_alive", json!({"pod": "p0"}))
        .await
        .ok();
    // ...and records the meeting point with a version this build does not read.
    let newer = publish_raw(
        &test,
        "sy.evt.meeting_point.m2",
        commit_headers("meeting_point.reserved", 1, "newer-r1"),
        br#"[{"type":"meeting_point.reserved","version":3,"data":{"place":{"pod":"p0","port":10000,"lease":"newer-r1"}}}]"#,
    )
    .await;
    let (status, body) = wait_for("the read model to stop", Duration::from_secs(5), || async {
        let (status, body) = readyz(&test).await;
        (status == 503).then_some((status, body))
    })
    .await;
    let check = body["checks"]["meeting_point_table"].as_str().unwrap();
    assert!(
        check.starts_with("stopped:")
            && check.contains(&newer.to_string())
            && check.contains("meeting_point.reserved version 3"),
        "{status} {body}"
    );
    assert_eq!(
        call(&test, "meeting_point.list", json!({}))
            .await
            .code_and_reason(),
        "unavailable/read_model_stopped"
    );
    // The entity itself refuses to act on a history it cannot read, and says so.
    assert_eq!(
        call(&test, "meeting_point.keep_alive", json!({"machine": "m2"}))
            .await
            .code_and_reason(),
        "unavailable/newer_event_version"
    );
    // The live lease stays held: give the reconciler many ticks and grace periods.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Read from the log: this replica's warm pod actor has not seen the other's write.
    let pod = store
        .load::<Pod>(&PodName::new("p0").unwrap())
        .await
        .unwrap();
    let Pod::Present(registered) = pod.state else {
        panic!("the pod is gone")
    };
    assert_eq!(
        registered.port_of(&lease),
        Some(10000),
        "the lease of {lease} is still held"
    );
}
