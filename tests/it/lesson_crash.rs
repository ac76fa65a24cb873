//! Live lessons through crashes, for real: `switchyard serve` killed with SIGKILL while a lesson
//! boots and while it is configured (at failpoints), then restarted; and a replica killed
//! while it configures a lesson, which the other replica takes over. Every lesson ends READY,
//! no endpoint is started twice, a READY lesson of the same run is untouched, and once killed
//! nothing is left running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::crash::{Switchyard, wait_serving};
use crate::harness::{request, start_nats, wait_for};
use crate::lessons::sample_curriculum;
use crate::session_crash::leftovers;

/// A configuration file for `switchyard serve` with the curriculum `curriculum`, lesson
/// processes under `dir`.
fn config_file(dir: &Path, curriculum: &Path) -> PathBuf {
    let path = dir.join("switchyard.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[runtime]
reaction_interval = "200ms"

[lessons]
curriculum = "{}"
dir = "{}"
poll_interval = "50ms"
stop_grace = "500ms"
"#,
            curriculum.display(),
            dir.join("lessons").display()
        ),
    )
    .unwrap();
    path
}

pub async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .unwrap()
}

/// The lesson, if the request was answered (a read in flight to a replica as it is killed is
/// lost, and a caller asks again).
pub async fn get(client: &async_nats::Client, id: &str) -> Option<Value> {
    let reply = client
        .request(
            "sy.api.livelesson.get",
            json!({"id": id}).to_string().into(),
        )
        .await
        .ok()?;
    let value: Value = serde_json::from_slice(&reply.payload).ok()?;
    value.get("result").cloned()
}

pub async fn ready(client: &async_nats::Client, id: &str) -> Value {
    wait_for(
        &format!("lesson {id} to be READY"),
        Duration::from_secs(60),
        || async {
            let view = get(client, id).await?;
            assert_ne!(view["status"], "ERROR", "{view:#}");
            (view["status"] == "READY").then_some(view)
        },
    )
    .await
}

/// Calls `route` with `body` until it succeeds, with one command id: while a killed replica's
/// shards wait for their lease to expire, the answer is `unavailable`, and a caller retries.
async fn retried(client: &async_nats::Client, route: &str, mut body: Value) -> Value {
    body["command_id"] = json!(uuid::Uuid::new_v4().to_string());
    wait_for(
        &format!("{route} to succeed"),
        Duration::from_secs(30),
        || async {
            match request(client, route, body.to_string(), None).await {
                crate::harness::Reply::Ok(value) => Some(value),
                crate::harness::Reply::Err { code, .. } if code == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
                crate::harness::Reply::Err { code, message, .. } => {
                    panic!("{route}: {code}: {message}")
                }
            }
        },
    )
    .await
}

/// Requests `lesson` for a new session `session`.
pub async fn request_lesson(client: &async_nats::Client, session: &str, lesson: &str) -> String {
    retried(client, "livesession.create", json!({"id": session})).await;
    let reply = retried(
        client,
        "lesson.request",
        json!({"session": session, "lesson": lesson}),
    )
    .await;
    reply["result"]["id"].as_str().unwrap().to_owned()
}

/// Every `out` file of `lesson`'s processes, by step directory.
fn outputs(dir: &Path, lesson: &str) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.join("lessons").join("processes")];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "out")
                && p.to_string_lossy().contains(lesson)
            {
                found.push((p.clone(), std::fs::read_to_string(&p).unwrap_or_default()));
            }
        }
    }
    found.sort();
    found
}

/// How many times each of `lesson`'s sshd processes started (sshd says so once per start).
fn sshd_starts(dir: &Path, lesson: &str) -> Vec<usize> {
    outputs(dir, lesson)
        .iter()
        .map(|(_, text)| text.matches("Server listening on 127.0.0.1").count())
        .collect()
}

/// The process group leaders of `lesson`'s processes.
fn pids(dir: &Path, lesson: &str) -> Vec<String> {
    outputs(dir, lesson)
        .iter()
        .map(|(out, _)| std::fs::read_to_string(out.with_file_name("pid")).unwrap_or_default())
        .collect()
}

async fn kill_lesson(client: &async_nats::Client, id: &str) {
    request(
        client,
        "livelesson.kill",
        json!({"id": id}).to_string(),
        None,
    )
    .await
    .ok();
    wait_for(
        &format!("lesson {id} to be deleted"),
        Duration::from_secs(30),
        || async {
            get(client, id)
                .await
                .filter(|view| view["deleted_at"].is_string())
        },
    )
    .await;
}

#[actix_rt::test]
async fn kill_9_while_booting_or_configuring_then_restart_resumes_and_starts_nothing_twice() {
    for failpoint in [
        "lesson.after_booting",
        "lesson.after_start",
        "lesson.after_configure",
    ] {
        let nats = start_nats();
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), &sample_curriculum());
        let log = dir.path().join("switchyard.log");
        let plain = [("SWITCHYARD_CONFIG", config.to_str().unwrap())];
        // A lesson READY before anything goes wrong.
        let mut first = Switchyard::spawn_with(&nats.url(), &log, &plain);
        let client = client(&nats.url()).await;
        wait_serving(&client).await;
        let steady = request_lesson(&client, "steady", "ssh-basics").await;
        ready(&client, &steady).await;
        let steady_pids = pids(dir.path(), &steady);
        first.kill_9();
        drop(first);

        let armed = [
            ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
            ("SWITCHYARD_FAILPOINTS", failpoint),
        ];
        let mut crashing = Switchyard::spawn_with(&nats.url(), &log, &armed);
        wait_serving(&client).await;
        let resumed = request_lesson(&client, "crashed", "ssh-basics").await;
        wait_for(
            "the crash at the failpoint",
            Duration::from_secs(30),
            || std::future::ready(crashing.has_exited().then_some(())),
        )
        .await;
        drop(crashing);
        let _restarted = Switchyard::spawn_with(&nats.url(), &log, &plain);
        wait_serving(&client).await;
        let view = ready(&client, &resumed).await;
        assert_eq!(view["healthy"], 2, "{failpoint}: {view:#}");
        assert_eq!(
            sshd_starts(dir.path(), &resumed),
            vec![1, 1],
            "{failpoint}: each endpoint started once"
        );
        // The READY lesson of the earlier run was left as it was.
        let steady_view = get(&client, &steady).await.unwrap();
        assert_eq!(
            steady_view["status"], "READY",
            "{failpoint}: {steady_view:#}"
        );
        assert_eq!(
            pids(dir.path(), &steady),
            steady_pids,
            "{failpoint}: the READY lesson's processes were touched"
        );
        assert_eq!(sshd_starts(dir.path(), &steady), vec![1, 1]);

        kill_lesson(&client, &resumed).await;
        kill_lesson(&client, &steady).await;
        assert!(
            leftovers(&dir.path().join("lessons")).is_empty(),
            "{failpoint}: processes left"
        );
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(log.contains(&format!("failpoint {failpoint}")), "{log}");
    }
}

#[actix_rt::test]
async fn a_killed_replicas_lesson_is_taken_over_while_it_is_configured() {
    let nats = start_nats();
    let dir = tempfile::tempdir().unwrap();
    // The sample lesson, with a slow stage 1 script on alpha: time to kill its owner.
    let root = dir.path().join("curriculum");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(sample_curriculum())
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let script = root.join("ssh-basics/stage1/configs/alpha.sh");
    let text = std::fs::read_to_string(&script).unwrap();
    std::fs::write(&script, format!("sleep 2\n{text}")).unwrap();
    let config = config_file(dir.path(), &root);
    let log = dir.path().join("switchyard.log");
    let spawn = |name: &str| {
        let env = [
            ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
            ("SWITCHYARD_CLUSTER__REPLICA", name),
        ];
        Switchyard::spawn_with(&nats.url(), &log, &env)
    };
    let mut one = spawn("one");
    let client = client(&nats.url()).await;
    wait_serving(&client).await;
    let mut two = spawn("two");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = request_lesson(&client, "learner", "ssh-basics").await;
    wait_for(
        "the lesson to be configured",
        Duration::from_secs(30),
        || async {
            get(&client, &id)
                .await
                .filter(|view| view["status"] == "CONFIGURATION")
        },
    )
    .await;
    // Whoever wrote its last event owns it: kill that one.
    let store = switchyard::store::EventStore::attach(
        client.clone(),
        &switchyard::config::StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let subject = store.subjects().event("livelesson", &id);
    let history = store.read_subject(&subject, 1, None).await.unwrap();
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
    let view = ready(&client, &id).await;
    assert_eq!(view["healthy"], 2, "{view:#}");
    assert_eq!(
        sshd_starts(dir.path(), &id),
        vec![1, 1],
        "adopted, not started again"
    );
    let history = store.read_subject(&subject, 1, None).await.unwrap();
    let writers: std::collections::BTreeSet<&str> = history
        .iter()
        .filter_map(|m| m.header("Switchyard-Replica"))
        .collect();
    assert_eq!(writers.len(), 2, "both replicas wrote it: {writers:?}");
    kill_lesson(&client, &id).await;
    assert!(
        leftovers(&dir.path().join("lessons")).is_empty(),
        "processes left"
    );
}
