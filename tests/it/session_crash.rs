//! Sessions through crashes, for real: `switchyard serve` killed with SIGKILL inside
//! provisioning (at a failpoint) and at a random moment, and a replica killed while it runs
//! sessions. Every session still ends, nothing is started twice, and no process is left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::crash::{Switchyard, wait_serving};
use crate::harness::{request, start_nats, wait_for};

/// A configuration file for `switchyard serve`: a pool of `capacity` on this host, with its
/// processes under `dir`.
fn config_file(dir: &Path, capacity: u32, executors: u32) -> PathBuf {
    let path = dir.join("switchyard.toml");
    let processes = dir.join("processes");
    std::fs::write(
        &path,
        format!(
            r#"
[runtime]
reaction_interval = "200ms"

[sessions]
executor_count = {executors}
poll_interval = "50ms"
stop_grace = "500ms"
process_dir = "{}"
pools = [{{ name = "local", capacity = {capacity} }}]
"#,
            processes.display()
        ),
    )
    .unwrap();
    path
}

/// A component that notes each start of it in `marks`, then runs `then`.
fn marked(name: &str, kind: &str, marks: &Path, then: &str) -> Value {
    json!({
        "name": name, "kind": kind, "pool": "local", "command": "sh",
        "args": ["-c", format!("echo {name} >> {}; {then}", marks.display())]
    })
}

async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .unwrap()
}

/// The session, if it exists and the request was answered: a read in flight to a replica as it
/// is killed is lost, and a caller asks again.
async fn get(client: &async_nats::Client, id: &str) -> Option<Value> {
    let reply = client
        .request("sy.api.session.get", json!({"id": id}).to_string().into())
        .await
        .ok()?;
    let value: Value = serde_json::from_slice(&reply.payload).ok()?;
    value.get("result").cloned()
}

async fn ended(client: &async_nats::Client, id: &str) -> Value {
    wait_for(
        &format!("session {id} to end"),
        Duration::from_secs(60),
        || async {
            get(client, id)
                .await
                .filter(|view| view["cleaned_up_at"].is_string())
        },
    )
    .await
}

/// How many times each component noted a start.
fn starts(marks: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(marks).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// Processes still running whose working directory is under `dir`: the session processes of
/// this test (the process backend starts each in its own directory).
pub fn leftovers(dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "Z"))
            })
            .unwrap_or(true);
        if !zombie
            && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        {
            found.push(pid);
        }
    }
    found
}

async fn pools(client: &async_nats::Client) -> Value {
    request(client, "pool.list", "{}", None).await.ok()
}

#[tokio::test]
async fn kill_9_inside_provisioning_then_restart_resumes_and_starts_nothing_twice() {
    for failpoint in ["session.after_intent", "session.after_start"] {
        let nats = start_nats();
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), 3, 1);
        let marks = dir.path().join("marks");
        let log = dir.path().join("switchyard.log");
        let env = [
            ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
            ("SWITCHYARD_FAILPOINTS", failpoint),
        ];
        let mut crashing = Switchyard::spawn_with(&nats.url(), &log, &env);
        let client = client(&nats.url()).await;
        wait_serving(&client).await;
        let body = json!({"id": "resumed", "components": [
            marked("driver", "driver", &marks, "sleep 0.5"),
            marked("server", "server", &marks, "sleep 30"),
        ]});
        request(&client, "session.schedule", body.to_string(), None)
            .await
            .ok();
        wait_for(
            "the crash at the failpoint",
            Duration::from_secs(20),
            || std::future::ready(crashing.has_exited().then_some(())),
        )
        .await;
        drop(crashing);
        let _restarted = Switchyard::spawn_with(&nats.url(), &log, &env[..1]);
        wait_serving(&client).await;
        let view = ended(&client, "resumed").await;
        assert_eq!(view["status"], "DONE", "{failpoint}: {view:#}");
        assert_eq!(
            starts(&marks),
            BTreeMap::from([("driver".to_owned(), 1), ("server".to_owned(), 1)]),
            "{failpoint}: each component started once"
        );
        assert!(
            leftovers(dir.path()).is_empty(),
            "{failpoint}: processes left"
        );
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(log.contains(&format!("failpoint {failpoint}")), "{log}");
    }
}

#[tokio::test]
async fn kill_9_at_a_random_moment_leaves_every_session_ended_and_nothing_running() {
    let nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 4, 2);
    let marks = dir.path().join("marks");
    let log = dir.path().join("switchyard.log");
    let env = [("SWITCHYARD_CONFIG", config.to_str().unwrap())];
    let mut first = Switchyard::spawn_with(&nats.url(), &log, &env);
    let client = client(&nats.url()).await;
    wait_serving(&client).await;
    let ids: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = json!({"id": id, "components": [
            marked(&format!("{id}-driver"), "driver", &marks, &format!("sleep 0.{}", 3 + i)),
            marked(&format!("{id}-server"), "server", &marks, "sleep 30"),
        ]});
        request(&client, "session.schedule", body.to_string(), None)
            .await
            .ok();
    }
    // Somewhere in the middle: some sessions done, some running, some waiting.
    let pause = 300 + u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 4;
    tokio::time::sleep(Duration::from_millis(pause)).await;
    first.kill_9();
    drop(first);
    let _restarted = Switchyard::spawn_with(&nats.url(), &log, &env);
    wait_serving(&client).await;
    for id in &ids {
        let view = ended(&client, id).await;
        let status = view["status"].as_str().unwrap();
        assert!(
            matches!(status, "DONE" | "INTERNAL_ERROR"),
            "{id} after a kill at {pause} ms: {view:#}"
        );
    }
    for (component, count) in starts(&marks) {
        assert_eq!(
            count, 1,
            "{component} started {count} times (kill at {pause} ms)"
        );
    }
    wait_for("the pool to be free", Duration::from_secs(10), || async {
        let pools = pools(&client).await;
        (pools["result"][0]["reserved"] == 0 && pools["running"] == 0).then_some(())
    })
    .await;
    assert!(leftovers(dir.path()).is_empty(), "processes left");
}

#[tokio::test]
async fn a_killed_replicas_running_session_is_taken_over_and_finishes() {
    let nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 2, 2);
    let marks = dir.path().join("marks");
    let log = dir.path().join("switchyard.log");
    let replica = |name: &'static str| {
        [
            ("SWITCHYARD_CONFIG", config.to_str().unwrap().to_owned()),
            ("SWITCHYARD_CLUSTER__REPLICA", name.to_owned()),
        ]
    };
    let spawn = |name: &'static str| {
        let env = replica(name);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Switchyard::spawn_with(&nats.url(), &log, &env)
    };
    let mut one = spawn("one");
    let client = client(&nats.url()).await;
    wait_serving(&client).await;
    let mut two = spawn("two");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let body = json!({"id": "taken-over", "components": [
        marked("driver", "driver", &marks, "sleep 3"),
        marked("server", "server", &marks, "sleep 30"),
    ]});
    request(&client, "session.schedule", body.to_string(), None)
        .await
        .ok();
    wait_for("the session to run", Duration::from_secs(20), || async {
        get(&client, "taken-over")
            .await
            .filter(|view| view["status"] == "RUNNING")
    })
    .await;
    // Whoever wrote its last event owns it: kill that one.
    let store = switchyard::store::EventStore::attach(
        client.clone(),
        &switchyard::config::StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let history = store
        .read_subject(&store.subjects().event("session", "taken-over"), 1, None)
        .await
        .unwrap();
    let owner = history
        .last()
        .and_then(|m| m.header("Switchyard-Replica"))
        .unwrap()
        .to_owned();
    if owner == "one" {
        one.kill_9();
    } else {
        two.kill_9();
    }
    let view = ended(&client, "taken-over").await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert_eq!(
        starts(&marks),
        BTreeMap::from([("driver".to_owned(), 1), ("server".to_owned(), 1)]),
        "adopted, not started again"
    );
    let history = store
        .read_subject(&store.subjects().event("session", "taken-over"), 1, None)
        .await
        .unwrap();
    let writers: std::collections::BTreeSet<&str> = history
        .iter()
        .filter_map(|m| m.header("Switchyard-Replica"))
        .collect();
    assert_eq!(
        writers.len(),
        2,
        "both replicas wrote it, one after the other: {writers:?}"
    );
    assert!(leftovers(dir.path()).is_empty(), "processes left");
}
