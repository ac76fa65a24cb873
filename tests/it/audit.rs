//! `switchyard audit`: the log replayed by entity, kind, sequence and time range, decoded to JSON
//! whatever the stored encoding, and entities rebuilt as of any point.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard::audit::{self, AuditRecord, Filter};
use switchyard::domain::Timestamp;

use crate::harness::{call, start_app};

async fn records(store: &switchyard::store::EventStore, filter: Filter) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    audit::replay(store, &filter, |record| {
        out.push(record);
        Ok(())
    })
    .await
    .unwrap();
    out
}

#[actix_rt::test]
async fn the_log_replays_by_entity_kind_sequence_and_time() {
    // JSON-encoded events, to show the audit decodes whatever was stored.
    let test = start_app(|config| config.store.encoding = switchyard::codec::Encoding::Json).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Switchyard-Principal", "alice");
    crate::harness::request(
        &test.client,
        "counter.create",
        json!({"id": "a.b/c"}).to_string(),
        Some(headers),
    )
    .await
    .ok();
    let middle = (switchyard::runtime::system_clock())();
    tokio::time::sleep(Duration::from_millis(20)).await;
    call(&test, "counter.create", json!({"id": "other"}))
        .await
        .ok();
    call(
        &test,
        "counter.add",
        json!({"id": "a.b/c", "amount": 5, "command_id": "five"}),
    )
    .await
    .ok();
    call(&test, "counter.delete", json!({"id": "a.b/c"}))
        .await
        .ok();
    let store = test.app.store();

    let all = records(store, Filter::default()).await;
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(all[0].principal.as_deref(), Some("alice"));
    assert_eq!(all[0].entity, "a.b/c");
    assert_eq!(all[0].events[0].event_type, "counter.created");
    assert_eq!(all[2].command_id.as_deref(), Some("five"));
    assert_eq!(all[2].events[0].data["amount"], 5);
    assert_eq!(all[3].events[0].data["reason"], "requested");

    let one = Filter {
        kind: Some("counter".into()),
        entity: Some("a.b/c".into()),
        ..Filter::default()
    };
    assert_eq!(
        records(store, one.clone())
            .await
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    let range = Filter {
        from_seq: Some(2),
        to_seq: Some(3),
        ..Filter::default()
    };
    assert_eq!(
        records(store, range)
            .await
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    let since = Filter {
        since: Some(middle),
        ..Filter::default()
    };
    assert_eq!(
        records(store, since)
            .await
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let until = Filter {
        until: Some(middle),
        ..Filter::default()
    };
    assert_eq!(
        records(store, until)
            .await
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        vec![1]
    );
    let limited = Filter {
        limit: Some(2),
        ..Filter::default()
    };
    assert_eq!(records(store, limited).await.len(), 2);
    let unknown = Filter {
        kind: Some("teapot".into()),
        ..Filter::default()
    };
    assert!(audit::replay(store, &unknown, |_| Ok(())).await.is_err());

    // The entity as of each point of its history.
    let at = |seq| audit::state_as_of(store, "counter", "a.b/c", Some(seq));
    assert_eq!(at(1).await.unwrap().view.unwrap()["value"], 0);
    assert_eq!(at(3).await.unwrap().view.unwrap()["value"], 5);
    assert_eq!(at(3).await.unwrap().version, 2);
    assert_eq!(at(4).await.unwrap().view, None);
    assert_eq!(Timestamp::EPOCH.unix_nanos(), 0);
}

#[actix_rt::test]
async fn the_audit_command_prints_json_lines_and_tables() {
    let test = start_app(|_| {}).await;
    call(&test, "counter.create", json!({"id": "printed"}))
        .await
        .ok();
    call(&test, "counter.add", json!({"id": "printed", "amount": 2}))
        .await
        .ok();
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .arg("audit")
            .arg("--server")
            .arg(test.server.url())
            .args(args);
        command.output().unwrap()
    };
    let output = run(&["--format", "json", "--entity", "counter/printed"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["events"][0]["type"], "counter.added");
    assert_eq!(lines[1]["events"][0]["data"]["amount"], 2);

    let output = run(&[]);
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("counter.added@1"), "{table}");
    assert!(table.contains("(2 messages)"), "{table}");

    let output = run(&["--entity", "counter/printed", "--state", "--to-seq", "1"]);
    let state: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(state["view"]["value"], 0);

    let output = run(&["--kind", "teapot"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown kind"));
}
