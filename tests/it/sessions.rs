//! Test sessions end to end against a real nats-server and real processes: a driver that
//! reaches its workers through `QPS_WORKERS`, failures and timeouts, the strict executor count,
//! gang reservation without starvation, refusals at schedule, cancel, and logs.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::config::{Config, PoolConfig};

use crate::harness::{Reply, TestApp, call, start_app, wait_for};

/// A pool `local` of `capacity` machines on this host, `executors` sessions at once.
pub fn with_pool(config: &mut Config, capacity: u32, executors: u32) {
    config.sessions.pools = vec![PoolConfig {
        name: "local".into(),
        capacity,
        ..PoolConfig::default()
    }];
    config.sessions.executor_count = executors;
    config.sessions.stop_grace = Duration::from_millis(500);
}

pub fn component(name: &str, kind: &str, script: &str) -> Value {
    json!({"name": name, "kind": kind, "pool": "local", "command": "sh", "args": ["-c", script]})
}

/// An HTTP server on its `PORT`, ready once it accepts connections.
pub fn http_server(name: &str) -> Value {
    json!({
        "name": name, "kind": "server", "pool": "local",
        "command": "python3",
        "args": ["-c", "import http.server, os; http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()"],
        "readiness": {"tcp": {}}
    })
}

/// A driver that fetches `/` from every worker it is given, and says so.
pub fn reaching_driver() -> Value {
    json!({
        "name": "driver", "kind": "driver", "pool": "local",
        "command": "python3",
        "args": ["-c", "import os, urllib.request\nfor w in os.environ['QPS_WORKERS'].split(','):\n    print('reached', w, urllib.request.urlopen('http://' + w + '/').status, flush=True)"]
    })
}

pub async fn schedule(test: &TestApp, body: Value) -> String {
    let reply = call(test, "session.schedule", body).await.ok();
    reply["result"]["id"].as_str().unwrap().to_owned()
}

pub async fn get(test: &TestApp, id: &str) -> Value {
    call(test, "session.get", json!({"id": id})).await.ok()["result"].clone()
}

/// Waits until the session has ended and been cleaned up; returns its view.
pub async fn ended(test: &TestApp, id: &str, limit: Duration) -> Value {
    wait_for(&format!("session {id} to end"), limit, || async {
        let view = get(test, id).await;
        view["cleaned_up_at"].is_string().then_some(view)
    })
    .await
}

pub async fn driver_log(test: &TestApp, id: &str) -> String {
    let mut log = String::new();
    let mut offset = 0;
    loop {
        let chunk = call(test, "session.logs", json!({"id": id, "offset": offset}))
            .await
            .ok();
        log.push_str(chunk["data"].as_str().unwrap());
        offset = chunk["next_offset"].as_u64().unwrap();
        if chunk["complete"] == true {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[actix_rt::test]
async fn a_driver_that_reaches_every_worker_ends_done_with_its_log_kept() {
    let test = start_app(|config| with_pool(config, 3, 1)).await;
    let id = schedule(
        &test,
        json!({"id": "reach", "components": [reaching_driver(), http_server("s1"), http_server("s2")]}),
    )
    .await;
    let view = ended(&test, &id, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert_eq!(view["reason"], "driver driver exited 0");
    let addresses: Vec<String> = view["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "server")
        .map(|c| c["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(addresses.len(), 2);
    let log = driver_log(&test, &id).await;
    for address in &addresses {
        assert!(log.contains(&format!("reached {address} 200")), "{log}");
    }
    // Kept in the object store, named on the event, with its tail.
    let stored = &view["logs"]["driver"];
    assert!(stored["object"].as_str().unwrap().ends_with("/driver"));
    assert_eq!(stored["tail"].as_str().unwrap(), log);
    let chunk = call(&test, "session.logs", json!({"id": id})).await.ok();
    assert_eq!(chunk["source"], "store");
    for component in view["components"].as_array().unwrap() {
        let health = component["health"].as_str().unwrap();
        assert!(matches!(health, "succeeded" | "ready"), "{component}");
    }
    let pools = call(&test, "pool.list", json!({})).await.ok();
    assert_eq!(
        pools["result"][0]["reserved"], 0,
        "machines given back: {pools}"
    );
    assert_eq!(pools["running"], 0);
}

#[actix_rt::test]
async fn a_driver_exiting_1_ends_error_with_its_log() {
    let test = start_app(|config| with_pool(config, 1, 1)).await;
    let id = schedule(
        &test,
        json!({"components": [component("driver", "driver", "echo trying; echo it broke >&2; exit 1")]}),
    )
    .await;
    let view = ended(&test, &id, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert_eq!(view["reason"], "driver driver exited with code 1");
    assert_eq!(view["components"][0]["health"], "failed");
    assert_eq!(driver_log(&test, &id).await, "trying\nit broke\n");
}

#[actix_rt::test]
async fn a_session_past_its_timeout_ends_error_and_none_of_its_processes_survive() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let test = start_app(|config| with_pool(config, 2, 1)).await;
    let record = format!(
        "echo $$ >> {p}; sleep 300 & echo $! >> {p}; (trap '' TERM; sleep 300) & echo $! >> {p}; wait",
        p = pids.display()
    );
    let id = schedule(
        &test,
        json!({"timeout_ms": 1500, "components": [
            component("worker", "server", &record),
            component("driver", "driver", &record),
        ]}),
    )
    .await;
    let view = ended(&test, &id, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert!(
        view["reason"].as_str().unwrap().starts_with("timeout"),
        "{view:#}"
    );
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 6, "both components ran, three processes each");
    let survivors: Vec<i32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
}

/// The scheduler's events, in log order: (event type, session).
async fn scheduler_events(test: &TestApp) -> Vec<(String, String)> {
    let store = test.app.store();
    let subject = store.subjects().event("scheduler", "sessions");
    let mut out = Vec::new();
    for message in store.read_subject(&subject, 1, None).await.unwrap() {
        let events = message
            .decode::<switchyard::domain::sessions::SchedulerEvent>()
            .unwrap();
        for event in events {
            use switchyard::domain::sessions::SchedulerEvent as E;
            let (kind, session) = match event {
                E::Admitted(e) => ("admitted", e.session),
                E::Released(e) => ("released", e.session),
                E::Enqueued(e) => ("enqueued", e.session),
                E::Refused(e) => ("refused", e.session),
                E::Configured(_) | E::MachinesSet(_) => continue,
            };
            out.push((kind.to_owned(), session.to_string()));
        }
    }
    out
}

#[actix_rt::test]
async fn never_more_sessions_run_than_executors_and_all_finish() {
    let test = start_app(|config| with_pool(config, 10, 2)).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            schedule(
                &test,
                // Long enough that the next one is queued before this one ends, even on a
                // loaded machine: two must run at once at some instant.
                json!({"id": format!("s{i}"), "components": [component("driver", "driver", "sleep 1")]}),
            )
            .await,
        );
    }
    for id in &ids {
        assert_eq!(
            ended(&test, id, Duration::from_secs(60)).await["status"],
            "DONE"
        );
    }
    let mut running = BTreeSet::new();
    let mut most = 0;
    for (kind, session) in scheduler_events(&test).await {
        match kind.as_str() {
            "admitted" => {
                running.insert(session);
            }
            "released" => {
                running.remove(&session);
            }
            _ => {}
        }
        most = most.max(running.len());
    }
    assert_eq!(most, 2, "at most two at any instant, and two at some");
    assert!(running.is_empty(), "every session released its machines");
}

#[actix_rt::test]
async fn a_stream_of_small_sessions_does_not_starve_a_large_one() {
    let test = start_app(|config| with_pool(config, 4, 10)).await;
    let small = |name: &str| json!({"id": name, "components": [component("driver", "driver", "sleep 0.5")]});
    for i in 0..3 {
        schedule(&test, small(&format!("early{i}"))).await;
    }
    let large = json!({"id": "large", "components": [
        component("driver", "driver", "sleep 0.2"),
        component("a", "server", "sleep 30"),
        component("b", "server", "sleep 30"),
        component("c", "server", "sleep 30"),
    ]});
    schedule(&test, large).await;
    for i in 0..8 {
        schedule(&test, small(&format!("late{i}"))).await;
    }
    let waiting = get(&test, "late0").await;
    assert_eq!(waiting["status"], "QUEUED");
    assert!(
        waiting["waiting"]["reason"]
            .as_str()
            .unwrap()
            .contains("kept for session large"),
        "{waiting:#}"
    );
    assert_eq!(
        ended(&test, "large", Duration::from_secs(60)).await["status"],
        "DONE"
    );
    // The bound: the large session is admitted once the sessions that ran when it arrived
    // are done, before any session scheduled after it.
    let events = scheduler_events(&test).await;
    let admitted: Vec<&str> = events
        .iter()
        .filter(|(kind, _)| kind == "admitted")
        .map(|(_, session)| session.as_str())
        .collect();
    assert_eq!(&admitted[..4], ["early0", "early1", "early2", "large"]);
    for i in 0..8 {
        assert_eq!(
            ended(&test, &format!("late{i}"), Duration::from_secs(60)).await["status"],
            "DONE"
        );
    }
}

#[actix_rt::test]
async fn sessions_that_could_never_run_are_refused_at_schedule_and_write_nothing() {
    let test = start_app(|config| with_pool(config, 2, 1)).await;
    let before = test.app.store().last_sequence().await.unwrap();
    let unknown =
        json!({"components": [{"name": "d", "kind": "driver", "pool": "gpu", "command": "true"}]});
    assert_eq!(
        call(&test, "session.schedule", unknown)
            .await
            .code_and_reason(),
        "not_found/unknown_pool"
    );
    let big = json!({"components": [
        component("driver", "driver", "true"),
        component("a", "server", "true"),
        component("b", "server", "true"),
    ]});
    let refused = call(&test, "session.schedule", big).await;
    let Reply::Err {
        code,
        message,
        reason,
        ..
    } = refused
    else {
        panic!("{refused:?}")
    };
    assert_eq!(code, "capacity");
    assert_eq!(reason.as_deref(), Some("exceeds_pool_capacity"));
    assert_eq!(
        message,
        "pool \"local\" has 2 machines and the session needs 3: it can never run"
    );
    // A bad session: every problem at once, nothing scheduled.
    let bad = json!({"id": "bad", "colour": "red", "components": [
        {"name": "Bad", "kind": "driver", "pool": "local", "command": "true"},
        {"name": "s", "kind": "server", "pool": "local", "command": "", "env": {"QPS_WORKERS": "x"}},
    ]});
    let refused = call(&test, "session.schedule", bad).await;
    let Reply::Err { code, message, .. } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(code, "invalid");
    for part in [
        "4 problems",
        "colour: unknown field",
        "components[0]:",
        "components[1].command: must name a program",
        "components[1].env.QPS_WORKERS: is set by Switchyard",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert_eq!(
        call(&test, "session.get", json!({"id": "bad"}))
            .await
            .code(),
        "not_found"
    );
    let after = test.app.store().last_sequence().await.unwrap();
    let all = test.app.store().subjects().all_events();
    let written: Vec<String> = test
        .app
        .store()
        .read_subject(&all, before + 1, None)
        .await
        .unwrap_or_default()
        .iter()
        .map(|m| m.subject.clone())
        .filter(|s| s.contains(".session."))
        .collect();
    assert!(
        written.is_empty() && after >= before,
        "nothing of a session written: {written:?}"
    );
}

#[actix_rt::test]
async fn a_waiting_session_says_why_and_runs_once_machines_free_up() {
    let test = start_app(|config| with_pool(config, 1, 4)).await;
    schedule(
        &test,
        json!({"id": "first", "components": [component("driver", "driver", "sleep 1")]}),
    )
    .await;
    wait_for("first to run", Duration::from_secs(10), || async {
        (get(&test, "first").await["status"] != "QUEUED").then_some(())
    })
    .await;
    schedule(
        &test,
        json!({"id": "second", "components": [component("driver", "driver", "true")]}),
    )
    .await;
    let waiting = get(&test, "second").await;
    assert_eq!(waiting["status"], "QUEUED");
    assert_eq!(waiting["waiting"]["position"], 1);
    assert_eq!(
        waiting["waiting"]["reason"],
        "needs 1 machine of pool local (0 of 1 free)"
    );
    let pools = call(&test, "pool.list", json!({})).await.ok();
    assert_eq!(pools["result"][0]["reserved"], 1, "{pools}");
    assert_eq!(pools["result"][0]["waiting"], 1, "{pools}");
    assert_eq!(
        ended(&test, "second", Duration::from_secs(20)).await["status"],
        "DONE"
    );
}

#[actix_rt::test]
async fn cancelled_sessions_end_and_give_their_machines_back() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let test = start_app(|config| with_pool(config, 1, 1)).await;
    let script = format!("echo $$ >> {}; sleep 300", pids.display());
    schedule(
        &test,
        json!({"id": "running", "components": [component("driver", "driver", &script)]}),
    )
    .await;
    schedule(
        &test,
        json!({"id": "waiting", "components": [component("driver", "driver", "true")]}),
    )
    .await;
    wait_for("it to run", Duration::from_secs(10), || async {
        (get(&test, "running").await["status"] == "RUNNING").then_some(())
    })
    .await;
    // Waiting: it ends at once.
    call(&test, "session.cancel", json!({"id": "waiting"}))
        .await
        .ok();
    let view = get(&test, "waiting").await;
    assert_eq!(view["status"], "ERROR");
    assert_eq!(view["reason"], "cancelled while queued");
    // Running: stopped, its processes gone, its machine back.
    call(&test, "session.cancel", json!({"id": "running"}))
        .await
        .ok();
    let view = ended(&test, "running", Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ERROR");
    assert_eq!(view["reason"], "cancelled");
    let pid: i32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid));
    ended(&test, "waiting", Duration::from_secs(10)).await;
    wait_for(
        "the machine to be free",
        Duration::from_secs(10),
        || async {
            let pools = call(&test, "pool.list", json!({})).await.ok();
            (pools["result"][0]["free"] == 1 && pools["waiting"] == 0).then_some(())
        },
    )
    .await;
    // Cancelling an ended session changes nothing; an unknown one is not found.
    call(&test, "session.cancel", json!({"id": "running"}))
        .await
        .ok();
    assert_eq!(
        call(&test, "session.cancel", json!({"id": "nope"}))
            .await
            .code(),
        "not_found"
    );
}

#[actix_rt::test]
async fn a_component_that_cannot_start_ends_the_session_in_error_with_why() {
    let test = start_app(|config| with_pool(config, 1, 1)).await;
    let id = schedule(
        &test,
        json!({"components": [{"name": "driver", "kind": "driver", "pool": "local", "command": "no-such-program"}]}),
    )
    .await;
    let view = ended(&test, &id, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert!(
        view["reason"].as_str().unwrap().contains("no-such-program"),
        "{view:#}"
    );
}

#[actix_rt::test]
async fn logs_can_be_followed_while_the_driver_runs() {
    let test = start_app(|config| with_pool(config, 1, 1)).await;
    let id = schedule(
        &test,
        json!({"components": [component("driver", "driver", "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done")]}),
    )
    .await;
    let first = wait_for("the first line", Duration::from_secs(10), || async {
        let chunk = call(&test, "session.logs", json!({"id": id})).await.ok();
        (chunk["source"] == "process" && !chunk["data"].as_str().unwrap().is_empty())
            .then_some(chunk)
    })
    .await;
    assert_eq!(first["complete"], false);
    assert_eq!(
        driver_log(&test, &id).await,
        "line 1\nline 2\nline 3\nline 4\nline 5\n"
    );
    assert_eq!(
        call(
            &test,
            "session.logs",
            json!({"id": id, "component": "nope"})
        )
        .await
        .code(),
        "not_found"
    );
    assert_eq!(
        call(&test, "session.logs", json!({"id": id, "max_bytes": 0}))
            .await
            .code(),
        "invalid"
    );
}

/// Runs the `switchyard` binary with `args` against the test's NATS; (exit code, stdout).
pub async fn cli(test: &TestApp, args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(["--server", &test.server.url()])
        .env("SWITCHYARD_LOG__FILTER", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[actix_rt::test]
async fn the_shipped_sample_session_runs_from_the_cli_to_done() {
    let test = start_app(|config| with_pool(config, 4, 2)).await;
    let (code, out) = cli(
        &test,
        &[
            "session",
            "schedule",
            "deploy/dev/session.yaml",
            "--id",
            "sample",
            "--watch",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("scheduled sample (QUEUED)\n"), "{out}");
    assert!(out.contains("sample DONE"), "{out}");
    let (code, logs) = cli(&test, &["session", "logs", "sample"]).await;
    assert_eq!(code, 0);
    assert!(logs.contains("reached all 2 workers"), "{logs}");
    assert_eq!(logs.matches("answered 200").count(), 6, "{logs}");
    let (code, pools) = cli(&test, &["pool", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        pools.starts_with(
            "POOL   CAPACITY  RESERVED  FREE  WAITING FOR\nlocal  4         0         4     0"
        ),
        "{pools}"
    );
    let (_, listed) = cli(
        &test,
        &["session", "list", "--status", "done", "--format", "json"],
    )
    .await;
    let listed: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(listed["id"], "sample");
}

#[actix_rt::test]
async fn a_bad_session_file_lists_every_problem_and_schedules_nothing() {
    let test = start_app(|config| with_pool(config, 1, 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "components:\n  - {name: d, kind: driver, pool: local, command: ''}\n  - {name: d, kind: server, pool: local, command: x, env: {PORT: '1'}}\n  - {name: e, kind: driver, pool: local, command: x, colour: red}\n",
    )
    .unwrap();
    let (code, out) = cli(&test, &["session", "schedule", file.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for (line, part) in lines.iter().zip([
        "components[0].command: must name a program",
        "components[1].env.PORT: is set by Switchyard",
        "components[1].name: \"d\" is also the name of components[0]",
        "components[2]: unknown field `colour`",
    ]) {
        assert!(line.contains(part), "{part} in {line}");
        assert!(line.starts_with(file.to_str().unwrap()), "{line}");
    }
    let (_, listed) = cli(&test, &["session", "list", "--format", "json"]).await;
    assert!(listed.is_empty(), "nothing scheduled: {listed}");
}

/// `scheduler.configured` v1's data, `{pools: [{name: "a", machines: ["m"], labels: {}}],
/// executor_count: 2, at: 1_700_000_000_000_000_000ns}`, as bincode 2 (standard config) stored
/// it before cloud pools: a golden fixture, decoded by every future release.
const GOLDEN_CONFIGURED_V1: &[u8] = &[
    0x01, // one pool
    0x01, b'a', // its name
    0x01, 0x01, b'm', // one machine
    0x00, // no labels
    0x02, // executor_count
    0xfd, 0x00, 0x00, 0x54, 0x6c, 0xfc, 0x39, 0x2f, 0x2f, // at: zigzag, u64 little-endian
];

#[test]
fn scheduler_configured_v1_from_its_golden_fixture_upcasts_to_fixed_pools() {
    use switchyard::codec::Bincode;
    use switchyard::domain::DomainEvent;
    use switchyard::domain::sessions::SchedulerEvent;
    use switchyard::domain::sessions::scheduler::{ConfiguredV1, PoolSpecV1};

    let event =
        SchedulerEvent::decode::<Bincode>("scheduler.configured", 1, GOLDEN_CONFIGURED_V1).unwrap();
    let SchedulerEvent::Configured(configured) = event else {
        panic!("decoded as {event:?}");
    };
    assert_eq!(configured.executor_count, 2);
    assert_eq!(configured.pools.len(), 1);
    assert_eq!(configured.pools[0].name.as_str(), "a");
    assert_eq!(configured.pools[0].machines.len(), 1);
    assert_eq!(
        configured.pools[0].max_machines, 0,
        "a v1 pool is a fixed pool"
    );
    // The fixture is what the v1 struct encodes to.
    let v1 = ConfiguredV1 {
        pools: vec![PoolSpecV1 {
            name: "a".parse().unwrap(),
            machines: vec!["m".parse().unwrap()],
            labels: Default::default(),
        }],
        executor_count: 2,
        at: switchyard::domain::Timestamp::from_unix_nanos(1_700_000_000_000_000_000),
    };
    let data = bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap();
    assert_eq!(data, GOLDEN_CONFIGURED_V1);
}
