//! Clients written by others: nats-py (from PyPI, installed by `scripts/setup`) drives the API
//! as any non-Rust publisher would.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{call, start_app, wait_for};

pub fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing; run scripts/setup",
        python.display()
    );
    python
}

#[actix_rt::test]
async fn a_nats_py_client_sends_commands_and_reads_replies() {
    let test = start_app(|_| {}).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/nats_py_client.py");
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .arg(test.server.url())
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nats-py client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8, "{stdout}");

    assert_eq!(lines[0]["body"]["result"]["counter"]["id"], "py/counter.1");
    assert_eq!(lines[1]["body"]["result"]["counter"]["value"], 2);
    // The typed error arrives in the body and in the micro headers.
    assert_eq!(lines[2]["body"]["error"]["code"], "capacity");
    assert_eq!(lines[2]["headers"]["Nats-Service-Error-Code"], "429");
    assert_eq!(lines[2]["headers"]["Switchyard-Error"], "capacity");
    assert_eq!(lines[3]["body"]["result"]["value"], 2);
    assert_eq!(lines[4]["queued"]["stream"], "SWITCHYARD_COMMANDS");
    assert_eq!(lines[5]["body"]["result"]["pod"]["name"], "py-pod-0");
    let reserved = &lines[6]["body"]["result"];
    assert_eq!(reserved["pod"], "py-pod-0");
    assert_eq!(reserved["username"], "chrome-bot");
    assert_eq!(&lines[7]["body"]["result"], reserved);

    // The principal it named is on the event; the queued command is applied.
    wait_for("the queued command", Duration::from_secs(5), || async {
        let got = call(&test, "counter.get", json!({"id": "py/counter.1"}))
            .await
            .ok();
        (got["result"]["value"] == 3).then_some(())
    })
    .await;
    let subject = test.app.store().subjects().event("counter", "py/counter.1");
    let history = test
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    assert_eq!(history[1].principal(), Some("nats-py"));
    assert_eq!(history[2].command_id(), Some("py-ff-1"));
}

/// A lesson portal in Python creates a live session, requests the sample lesson and waits for
/// READY on the lesson's event subject, then kills it and sees it deleted.
#[actix_rt::test]
async fn a_nats_py_portal_requests_a_lesson_and_waits_for_ready_on_its_events() {
    let test =
        start_app(|c| crate::lessons::with_lessons(c, &crate::lessons::sample_curriculum())).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/nats_py_lessons.py");
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .arg(test.server.url())
        .arg("ssh-basics")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nats-py portal failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    let events: Vec<&str> = lines[2]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for expected in [
        "livelesson.requested",
        "livelesson.booting",
        "livelesson.configuring",
        "livelesson.ready",
    ] {
        assert!(events.contains(&expected), "{expected} in {events:?}");
    }
    assert_eq!(lines[3]["status"], "READY", "{stdout}");
    assert!(
        lines[3]["ssh"][0].as_str().unwrap().starts_with("ssh -i "),
        "{stdout}"
    );
    assert!(
        lines[4]["events"]
            .as_array()
            .unwrap()
            .contains(&json!("livelesson.deleted")),
        "{stdout}"
    );
    assert!(crate::lessons::processes_under(&test.config.lessons.dir).is_empty());
}
