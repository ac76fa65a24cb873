//! Switch pods and meeting points against a real nats-server: the twelve operations with every
//! error code, 200 concurrent reservations over three pods, expiry and drain under a manual
//! clock, and kill -9 between the two steps of a reservation.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::domain::Timestamp;

use crate::crash::{Switchyard, wait_serving};
use crate::harness::{
    Reply, TestApp, call, request, start_app, start_app_with_clock, start_nats, wait_for,
};

const FINGERPRINT: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

async fn add_pod(test: &TestApp, pod: &str) -> Value {
    call(
        test,
        "pod.add",
        json!({"pod": pod, "ssh_address": "127.0.0.1:2222", "host_key_fingerprint": FINGERPRINT}),
    )
    .await
    .ok()
}

async fn count(test: &TestApp, pod: &str) -> u64 {
    call(test, "pod.count_meeting_points", json!({"pod": pod}))
        .await
        .ok()["result"]["meeting_points"]
        .as_u64()
        .unwrap()
}

async fn valid(test: &TestApp, pod: &str) -> bool {
    call(test, "pod.is_valid", json!({"pod": pod})).await.ok()["result"]["valid"]
        .as_bool()
        .unwrap()
}

/// Waits until `route`'s read model has applied `sequence`, then returns the listing.
async fn listed(test: &TestApp, route: &str, body: Value, sequence: u64) -> Value {
    wait_for(
        &format!("{route} at {sequence}"),
        Duration::from_secs(5),
        || {
            let body = body.clone();
            async move {
                let listed = call(test, route, body).await.ok();
                (listed["position"].as_u64().unwrap() >= sequence).then_some(listed)
            }
        },
    )
    .await
}

fn names(listing: &Value, field: &str) -> Vec<String> {
    listing["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_str().unwrap().to_owned())
        .collect()
}

#[actix_rt::test]
async fn pod_operations_and_their_errors() {
    let test = start_app(|_| {}).await;
    let added = add_pod(&test, "switch-pod-0").await;
    assert_eq!(added["result"]["pod"]["status"], "active");
    assert_eq!(
        added["result"]["pod"]["ports"],
        json!({"first": 10000, "last": 19999})
    );
    assert_eq!(added["result"]["pod"]["keepalive_ms"], 300_000);
    assert_eq!(added["result"]["pod"]["host_key_fingerprint"], FINGERPRINT);

    assert_eq!(
        call(&test, "pod.add", json!({"pod": "switch-pod-0"}))
            .await
            .code(),
        "already_exists"
    );
    assert_eq!(
        call(&test, "pod.keep_alive", json!({"pod": "nope"}))
            .await
            .code(),
        "not_found"
    );
    for bad in [
        json!({"pod": ""}),
        json!({"pod": "a\u{1}b"}),
        json!({"pod": " padded"}),
        json!({"pod": "p", "keepalive_ms": 1}),
        json!({"pod": "p", "ports": {"first": 20, "last": 10}}),
        json!({"pod": "p", "ports": {"first": 0, "last": 10}}),
        json!({"pod": "p", "ssh_address": "no-port"}),
        json!({"pod": "p", "host_key_fingerprint": "MD5:00"}),
        json!({"pod": "p", "surprise": true}),
    ] {
        assert_eq!(
            call(&test, "pod.add", bad.clone()).await.code(),
            "invalid",
            "{bad}"
        );
    }
    assert_eq!(
        call(&test, "pod.get", json!({"pod": "p"})).await.code(),
        "not_found",
        "rejected adds wrote nothing"
    );

    let kept = call(&test, "pod.keep_alive", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    assert_eq!(kept["version"], 2);
    assert!(valid(&test, "switch-pod-0").await);
    assert!(!valid(&test, "nope").await);
    assert_eq!(count(&test, "switch-pod-0").await, 0);
    let unknown = call(&test, "pod.count_meeting_points", json!({"pod": "nope"}))
        .await
        .ok();
    assert_eq!(
        unknown["result"],
        json!({"pod": "nope", "meeting_points": 0, "status": null})
    );
    let got = call(&test, "pod.get", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    assert_eq!(got["result"]["ssh_address"], "127.0.0.1:2222");

    let second = add_pod(&test, "switch-pod-1").await;
    // Where the pod read model must be to have seen every pod: other kinds do not count.
    call(&test, "counter.create", json!({"id": "unrelated"}))
        .await
        .ok();
    let store = test.app.store();
    let pods = store.subjects().events_of_kind("pod");
    assert_eq!(
        store.last_sequence_of(&pods).await.unwrap(),
        second["sequence"].as_u64().unwrap()
    );
    let none = store.subjects().events_of_kind("nothing");
    assert_eq!(store.last_sequence_of(&none).await.unwrap(), 0);
    let listing = listed(
        &test,
        "pod.list",
        json!({}),
        second["sequence"].as_u64().unwrap(),
    )
    .await;
    assert_eq!(names(&listing, "name"), ["switch-pod-0", "switch-pod-1"]);
    let page = call(&test, "pod.list", json!({"limit": 1})).await.ok();
    assert_eq!(page["next"], "switch-pod-0");
    assert_eq!(
        call(&test, "pod.list", json!({"limit": 0})).await.code(),
        "invalid"
    );

    // Removing a pod without meeting points: gone at once; removing again succeeds.
    let removed = call(&test, "pod.remove", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    assert_eq!(removed["result"]["pod"], Value::Null);
    assert!(!valid(&test, "switch-pod-0").await);
    call(&test, "pod.remove", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    call(&test, "pod.remove", json!({"pod": "never-was"}))
        .await
        .ok();
    let listing = listed(
        &test,
        "pod.list",
        json!({}),
        removed["sequence"].as_u64().unwrap(),
    )
    .await;
    assert_eq!(names(&listing, "name"), ["switch-pod-1"]);
    // A pod that went may register again.
    add_pod(&test, "switch-pod-0").await;
}

#[actix_rt::test]
async fn meeting_point_operations_and_their_errors() {
    let test = start_app(|_| {}).await;
    let machine = "skia-rpi-001.example.com";
    let reserve = json!({"machine": machine, "username": "chrome-bot"});
    assert_eq!(
        call(&test, "meeting_point.reserve", reserve.clone())
            .await
            .code_and_reason(),
        "unavailable/no_pods"
    );
    let pod = add_pod(&test, "switch-pod-0").await;
    listed(
        &test,
        "pod.list",
        json!({}),
        pod["sequence"].as_u64().unwrap(),
    )
    .await;

    for bad in [
        json!({"machine": machine, "username": "-rf"}),
        json!({"machine": machine, "username": "a b"}),
        json!({"machine": "", "username": "root"}),
        json!({"machine": machine}),
        json!({"machine": machine, "username": "root", "keepalive_ms": 0}),
    ] {
        assert_eq!(
            call(&test, "meeting_point.reserve", bad.clone())
                .await
                .code(),
            "invalid",
            "{bad}"
        );
    }
    assert_eq!(
        count(&test, "switch-pod-0").await,
        0,
        "rejected reservations lease nothing"
    );

    let first = call(&test, "meeting_point.reserve", reserve.clone())
        .await
        .ok();
    let mp = &first["result"];
    assert_eq!(mp["machine"], machine);
    assert_eq!(mp["pod"], "switch-pod-0");
    assert_eq!(mp["username"], "chrome-bot");
    let port = mp["port"].as_u64().unwrap();
    assert!((10000..=19999).contains(&port));
    let got = call(&test, "meeting_point.get", json!({"machine": machine}))
        .await
        .ok();
    assert_eq!(got["result"], first["result"]);
    assert_eq!(count(&test, "switch-pod-0").await, 1);

    assert_eq!(
        call(&test, "meeting_point.get", json!({"machine": "other"}))
            .await
            .code(),
        "not_found"
    );
    call(
        &test,
        "meeting_point.keep_alive",
        json!({"machine": machine}),
    )
    .await
    .ok();
    call(
        &test,
        "meeting_point.keep_alive",
        json!({"machine": machine, "pod": "switch-pod-0", "port": port}),
    )
    .await
    .ok();
    assert_eq!(
        call(
            &test,
            "meeting_point.keep_alive",
            json!({"machine": "other"})
        )
        .await
        .code(),
        "not_found"
    );
    assert_eq!(
        call(
            &test,
            "meeting_point.keep_alive",
            json!({"machine": machine, "pod": "switch-pod-9"})
        )
        .await
        .code(),
        "not_found"
    );

    // Reserving again replaces the meeting point and gives the old port back.
    let second = call(&test, "meeting_point.reserve", reserve.clone())
        .await
        .ok();
    assert_ne!(second["result"]["port"], first["result"]["port"]);
    assert_eq!(count(&test, "switch-pod-0").await, 1);

    // A retry with the same command id: the same reply, no second lease or event.
    let with_id = json!({"machine": "rack4/rpi-2", "username": "root", "command_id": "r-1"});
    let once = call(&test, "meeting_point.reserve", with_id.clone())
        .await
        .ok();
    let before = test.app.store().last_sequence().await.unwrap();
    let again = call(&test, "meeting_point.reserve", with_id).await.ok();
    assert_eq!(once, again);
    assert_eq!(test.app.store().last_sequence().await.unwrap(), before);
    assert_eq!(count(&test, "switch-pod-0").await, 2);

    let listing = listed(
        &test,
        "meeting_point.list",
        json!({"pod": "switch-pod-0"}),
        again["sequence"].as_u64().unwrap(),
    )
    .await;
    assert_eq!(names(&listing, "machine"), ["rack4/rpi-2", machine]);
    let other_pod = call(&test, "meeting_point.list", json!({"pod": "switch-pod-9"}))
        .await
        .ok();
    assert_eq!(other_pod["result"], json!([]));

    // Clearing: only the named one, idempotent, and the port comes back.
    let stale = call(
        &test,
        "meeting_point.clear",
        json!({"machine": machine, "port": first["result"]["port"]}),
    )
    .await
    .ok();
    assert_eq!(stale["result"]["cleared"], Value::Null);
    let cleared = call(&test, "meeting_point.clear", json!({"machine": machine}))
        .await
        .ok();
    assert_eq!(cleared["result"]["cleared"], second["result"]);
    let again = call(&test, "meeting_point.clear", json!({"machine": machine}))
        .await
        .ok();
    assert_eq!(again["result"]["cleared"], Value::Null);
    assert_eq!(
        call(&test, "meeting_point.get", json!({"machine": machine}))
            .await
            .code(),
        "not_found"
    );
    assert_eq!(count(&test, "switch-pod-0").await, 1);

    // Every operation is counted in /metrics, errors included.
    let (_, metrics) = crate::harness::http_get(test.app.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"kind="meeting_point",verb="reserve",code="ok""#)
            && metrics.contains(r#"kind="meeting_point",verb="reserve",code="unavailable""#)
            && metrics.contains(r#"kind="pod",verb="add",code="already_exists""#),
        "{metrics}"
    );
}

/// A lease was idempotent by its id alone, so two machines reserving with one command id got
/// the same port.
#[actix_rt::test]
async fn two_machines_reserving_with_one_command_id_never_share_a_port() {
    let test = start_app(|_| {}).await;
    add_pod(&test, "p0").await;
    let first = call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m1", "username": "root", "command_id": "same"}),
    )
    .await
    .ok();
    assert_eq!(first["result"]["port"], 10000);
    let second = call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m2", "username": "root", "command_id": "same"}),
    )
    .await;
    assert_eq!(second.code_and_reason(), "conflict/command_id_reused");
    assert_eq!(count(&test, "p0").await, 1, "m2 holds no port");
    assert_eq!(
        call(&test, "meeting_point.get", json!({"machine": "m2"}))
            .await
            .code(),
        "not_found"
    );
    // The first machine's retry is still its own reservation.
    let again = call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m1", "username": "root", "command_id": "same"}),
    )
    .await
    .ok();
    assert_eq!(again["result"], first["result"]);
}

#[actix_rt::test]
async fn two_hundred_concurrent_reservations_over_three_pods_never_share_a_port() {
    let test = start_app(|config| config.runtime.mailbox_capacity = 512).await;
    let mut last = 0;
    for pod in ["pod-a", "pod-b", "pod-c"] {
        last = add_pod(&test, pod).await["sequence"].as_u64().unwrap();
    }
    listed(&test, "pod.list", json!({}), last).await;
    let replies = futures::future::join_all((0..200).map(|i| {
        let client = test.client.clone();
        async move {
            let body = json!({"machine": format!("m{i:03}.example.com"), "username": "chrome-bot"});
            request(&client, "meeting_point.reserve", body.to_string(), None).await
        }
    }))
    .await;
    let mut places = HashSet::new();
    let mut per_pod: HashMap<String, usize> = HashMap::new();
    for reply in replies {
        let mp = reply.ok()["result"].clone();
        let pod = mp["pod"].as_str().unwrap().to_owned();
        assert!(
            places.insert((pod.clone(), mp["port"].as_u64().unwrap())),
            "{mp}"
        );
        *per_pod.entry(pod).or_default() += 1;
    }
    assert_eq!(places.len(), 200);
    let (min, max) = (
        per_pod.values().min().unwrap(),
        per_pod.values().max().unwrap(),
    );
    assert!(
        per_pod.len() == 3 && max - min <= 1,
        "load spread: {per_pod:?}"
    );
    for (pod, n) in &per_pod {
        assert_eq!(count(&test, pod).await, *n as u64);
    }
}

/// A clock the test moves by hand.
fn manual_clock() -> (switchyard::runtime::Clock, Arc<Mutex<Timestamp>>) {
    let now = Arc::new(Mutex::new(Timestamp::from_unix_nanos(
        1_800_000_000_000_000_000,
    )));
    let read = now.clone();
    (Arc::new(move || *read.lock().unwrap()), now)
}

fn advance(now: &Mutex<Timestamp>, by: Duration) {
    let mut now = now.lock().unwrap();
    *now = now.saturating_add(by);
}

#[actix_rt::test]
async fn pods_and_meeting_points_expire_and_removal_drains() {
    let (clock, now) = manual_clock();
    let test = start_app_with_clock(
        |config| {
            config.switchboard.reconcile_interval = Duration::from_millis(50);
            config.switchboard.reconcile_grace = Duration::from_secs(1);
        },
        clock,
    )
    .await;
    let seconds = |n| Duration::from_secs(n);
    for pod in ["short-lived", "steady"] {
        call(
            &test,
            "pod.add",
            json!({"pod": pod, "keepalive_ms": 10_000}),
        )
        .await
        .ok();
    }
    let pod_of = |reply: &Value| reply["result"]["pod"].as_str().unwrap().to_owned();
    let on_first = call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m1", "username": "root", "keepalive_ms": 60_000}),
    )
    .await
    .ok();
    let doomed_pod = pod_of(&on_first);

    // The doomed pod misses its keep-alives; the other keeps up. At 2 periods it expires,
    // and its meeting point (kept alive itself) is cleared with it.
    advance(&now, seconds(15));
    let steady = if doomed_pod == "steady" {
        "short-lived"
    } else {
        "steady"
    };
    call(&test, "pod.keep_alive", json!({"pod": steady}))
        .await
        .ok();
    call(&test, "meeting_point.keep_alive", json!({"machine": "m1"}))
        .await
        .ok();
    assert!(valid(&test, &doomed_pod).await, "not yet: 15 s of 20");
    advance(&now, seconds(5));
    wait_for("the silent pod to expire", seconds(5), || async {
        call(&test, "pod.get", json!({"pod": doomed_pod}))
            .await
            .code_or_none("not_found")
    })
    .await;
    wait_for("its meeting point to be cleared", seconds(5), || async {
        call(&test, "meeting_point.get", json!({"machine": "m1"}))
            .await
            .code_or_none("not_found")
    })
    .await;
    assert!(valid(&test, steady).await);

    // A meeting point not kept alive for two periods expires, and its port comes back.
    call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m2", "username": "root", "keepalive_ms": 10_000}),
    )
    .await
    .ok();
    assert_eq!(count(&test, steady).await, 1);
    advance(&now, seconds(10));
    call(&test, "pod.keep_alive", json!({"pod": steady}))
        .await
        .ok();
    advance(&now, seconds(10));
    call(&test, "pod.keep_alive", json!({"pod": steady}))
        .await
        .ok();
    wait_for(
        "the meeting point to expire and free its port",
        seconds(5),
        || async { (count(&test, steady).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        call(&test, "meeting_point.get", json!({"machine": "m2"}))
            .await
            .code(),
        "not_found"
    );

    // Drain: a removed pod with a meeting point stays (invalid, unlisted) until it clears.
    call(
        &test,
        "meeting_point.reserve",
        json!({"machine": "m3", "username": "root"}),
    )
    .await
    .ok();
    let removed = call(&test, "pod.remove", json!({"pod": steady})).await.ok();
    assert_eq!(removed["result"]["pod"]["status"], "draining");
    assert!(!valid(&test, steady).await);
    assert_eq!(count(&test, steady).await, 1);
    let sequence = removed["sequence"].as_u64().unwrap();
    assert_eq!(
        listed(&test, "pod.list", json!({}), sequence).await["result"],
        json!([])
    );
    let all = listed(&test, "pod.list", json!({"all": true}), sequence).await;
    assert_eq!(names(&all, "name"), [steady]);
    assert_eq!(
        call(
            &test,
            "meeting_point.reserve",
            json!({"machine": "m4", "username": "root"})
        )
        .await
        .code_and_reason(),
        "unavailable/no_pods"
    );
    call(&test, "meeting_point.clear", json!({"machine": "m3"}))
        .await
        .ok();
    assert_eq!(
        call(&test, "pod.get", json!({"pod": steady})).await.code(),
        "not_found",
        "drained, then gone"
    );
}

/// Found by hand against `switchyard serve`: a reaper named its expiry after the read-model
/// row's version, which starts again at 0 when an entity comes back, so every life after the
/// first got the first life's command id and was answered from memory: it never expired.
#[actix_rt::test]
async fn re_created_pods_and_meeting_points_expire_in_every_life() {
    let test = start_app(|config| {
        config.switchboard.reconcile_interval = Duration::from_millis(50);
        config.switchboard.reconcile_grace = Duration::from_millis(200);
    })
    .await;
    add_pod(&test, "steady").await;
    for life in 1..=3 {
        let reserved = call(
            &test,
            "meeting_point.reserve",
            json!({"machine": "m1", "username": "root", "keepalive_ms": 200}),
        )
        .await
        .ok();
        assert_eq!(reserved["result"]["pod"], "steady");
        wait_for(
            &format!("meeting point life {life} to expire"),
            Duration::from_secs(5),
            || async {
                call(&test, "meeting_point.get", json!({"machine": "m1"}))
                    .await
                    .code_or_none("not_found")
            },
        )
        .await;
        // The reconciler gives back the port of an expired meeting point.
        wait_for(
            &format!("the port of life {life} to be freed"),
            Duration::from_secs(5),
            || async { (count(&test, "steady").await == 0).then_some(()) },
        )
        .await;
    }
    for life in 1..=3 {
        call(
            &test,
            "pod.add",
            json!({"pod": "brief", "keepalive_ms": 200}),
        )
        .await
        .ok();
        wait_for(
            &format!("pod life {life} to expire"),
            Duration::from_secs(5),
            || async {
                call(&test, "pod.get", json!({"pod": "brief"}))
                    .await
                    .code_or_none("not_found")
            },
        )
        .await;
    }
}

impl Reply {
    /// `Some(())` if this is the error `code`.
    fn code_or_none(self, code: &str) -> Option<()> {
        matches!(self, Reply::Err { code: c, .. } if c == code).then_some(())
    }
}

/// A control plane killed (SIGKILL, at the `reserve.after_lease` failpoint) in the middle of
/// reserving `body` on the given pods, then started again with `fast` settings: the pod's
/// port is leased, the meeting point not recorded. Returns the client, the reservation's body
/// and the restarted process.
async fn crash_after_lease(
    nats: &switchyard::nats_server::NatsServer,
    log: &std::path::Path,
    fast: &[(&str, &str)],
    pods: &[&str],
) -> (async_nats::Client, Value, Switchyard) {
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(nats.url())
        .await
        .unwrap();
    let mut crashing = fast.to_vec();
    crashing.push(("SWITCHYARD_FAILPOINTS", "reserve.after_lease"));
    let mut switchyard = Switchyard::spawn_with(&nats.url(), log, &crashing);
    wait_serving(&client).await;
    for pod in pods {
        request(&client, "pod.add", json!({"pod": pod}).to_string(), None)
            .await
            .ok();
    }
    let body = json!({"machine": "m1", "username": "root", "command_id": "reserve-1"});
    let reply = client
        .request("sy.api.meeting_point.reserve", body.to_string().into())
        .await;
    assert!(
        reply.is_err(),
        "the process died before replying: {reply:?}"
    );
    wait_for(
        "the process to die at the failpoint",
        Duration::from_secs(5),
        || std::future::ready(switchyard.has_exited().then_some(())),
    )
    .await;
    drop(switchyard);
    let restarted = Switchyard::spawn_with(&nats.url(), log, fast);
    wait_serving(&client).await;
    (client, body, restarted)
}

#[tokio::test]
async fn kill_9_between_lease_and_meeting_point_leaks_nothing() {
    let nats = start_nats();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("switchyard.log");
    let fast = [
        ("SWITCHYARD_SWITCHBOARD__RECONCILE_INTERVAL", "100ms"),
        ("SWITCHYARD_SWITCHBOARD__RECONCILE_GRACE", "3s"),
    ];
    let (client, body, _restarted) = crash_after_lease(&nats, &log, &fast, &["p0"]).await;
    // From the log, not a count: the restarted reconciler may already have released it.
    let store = switchyard::store::EventStore::attach(
        client.clone(),
        &switchyard::config::StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let pod = store
        .read_subject(&store.subjects().event("pod", "p0"), 1, None)
        .await
        .unwrap();
    let leased = pod
        .iter()
        .flat_map(|m| {
            m.decode::<switchyard::domain::switchboard::PodEvent>()
                .unwrap()
        })
        .filter(|e| matches!(e, switchyard::domain::switchboard::PodEvent::PortLeased(_)))
        .count();
    assert_eq!(leased, 1, "the lease was taken before the crash");
    wait_for(
        "the reconciler to release the orphaned port",
        Duration::from_secs(10),
        || async {
            let counted = request(
                &client,
                "pod.count_meeting_points",
                json!({"pod": "p0"}).to_string(),
                None,
            )
            .await
            .ok();
            (counted["result"]["meeting_points"] == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        request(
            &client,
            "meeting_point.get",
            json!({"machine": "m1"}).to_string(),
            None
        )
        .await
        .code(),
        "not_found",
        "no meeting point without its lease"
    );
    // The caller's retry completes the reservation.
    let retried = request(&client, "meeting_point.reserve", body.to_string(), None)
        .await
        .ok();
    assert_eq!(retried["result"]["pod"], "p0");
    let counted = request(
        &client,
        "pod.count_meeting_points",
        json!({"pod": "p0"}).to_string(),
        None,
    )
    .await
    .ok();
    assert_eq!(counted["result"]["meeting_points"], 1);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("failpoint reserve.after_lease"), "{log}");
}

/// A crash after the lease, and the caller's retry (same command id, so the same lease id)
/// lands on the other, now less loaded, pod. The first pod's lease must still be released: the
/// reconciler once matched leases to meeting points by lease id alone, and kept it for good.
#[tokio::test]
async fn kill_9_then_a_retry_on_another_pod_leaks_no_lease() {
    let nats = start_nats();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("switchyard.log");
    // A grace long enough for the retry to come first, as it would for a caller that retries
    // at once.
    let fast = [
        ("SWITCHYARD_SWITCHBOARD__RECONCILE_INTERVAL", "100ms"),
        ("SWITCHYARD_SWITCHBOARD__RECONCILE_GRACE", "5s"),
    ];
    let (client, body, _restarted) = crash_after_lease(&nats, &log, &fast, &["p0", "p1"]).await;
    let count = |pod: &'static str| {
        let client = client.clone();
        async move {
            request(
                &client,
                "pod.count_meeting_points",
                json!({"pod": pod}).to_string(),
                None,
            )
            .await
            .ok()["result"]["meeting_points"]
                .as_u64()
                .unwrap()
        }
    };
    let (crashed_on, other) = if count("p0").await == 1 {
        ("p0", "p1")
    } else {
        ("p1", "p0")
    };
    assert_eq!(
        count(crashed_on).await,
        1,
        "the lease taken before the crash"
    );
    let retried = request(&client, "meeting_point.reserve", body.to_string(), None)
        .await
        .ok();
    assert_eq!(
        retried["result"]["pod"], other,
        "the retry goes to the less loaded pod"
    );
    wait_for(
        "the reconciler to release the lease left on the first pod",
        Duration::from_secs(20),
        || async { (count(crashed_on).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(count(other).await, 1, "the meeting point's own lease stays");
    let got = request(
        &client,
        "meeting_point.get",
        json!({"machine": "m1"}).to_string(),
        None,
    )
    .await
    .ok();
    assert_eq!(got["result"]["pod"], other);
}

/// The meeting point's commit is stored but its acknowledgement is lost. The reservation once
/// took any failure as a refusal and gave the port back, leaving a meeting point that names a
/// port nobody holds; only a definite refusal may undo the lease.
#[tokio::test]
async fn a_lost_acknowledgement_of_the_meeting_point_keeps_its_lease() {
    let nats = start_nats();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("switchyard.log");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let _switchyard = Switchyard::spawn_with(
        &nats.url(),
        &log,
        &[("SWITCHYARD_FAILPOINTS", "append.lose_ack.meeting_point")],
    );
    wait_serving(&client).await;
    request(&client, "pod.add", json!({"pod": "p0"}).to_string(), None)
        .await
        .ok();
    let body = json!({"machine": "m1", "username": "root", "command_id": "r1"});
    let failed = request(&client, "meeting_point.reserve", body.to_string(), None).await;
    assert_eq!(
        failed.code(),
        "unavailable",
        "the outcome is unknown to the caller"
    );
    let recorded = request(
        &client,
        "meeting_point.get",
        json!({"machine": "m1"}).to_string(),
        None,
    )
    .await
    .ok();
    let counted = request(
        &client,
        "pod.count_meeting_points",
        json!({"pod": "p0"}).to_string(),
        None,
    )
    .await
    .ok();
    assert_eq!(
        counted["result"]["meeting_points"], 1,
        "the meeting point {recorded} was stored, so its port stays held"
    );
    // The caller's retry finds the stored meeting point and answers with it.
    let retried = request(&client, "meeting_point.reserve", body.to_string(), None)
        .await
        .ok();
    assert_eq!(retried["result"]["port"], recorded["result"]["port"]);
    assert_eq!(retried["result"]["lease"], "r1");
}

/// Runs `switchyard ARGS --server URL`: (exit status, stdout, stderr).
async fn cli(test: &TestApp, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(["--server", &test.server.url()])
        .output()
        .await
        .expect("switchyard runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[actix_rt::test]
async fn the_pod_and_mp_commands_drive_every_operation() {
    let test = start_app(|_| {}).await;
    let (status, out, err) = cli(
        &test,
        &[
            "pod",
            "add",
            "cli-pod",
            "--ports",
            "20000-20009",
            "--keepalive",
            "1m",
        ],
    )
    .await;
    assert_eq!(status, 0, "{err}");
    assert!(
        out.starts_with("POD") && out.contains("cli-pod") && out.contains("20000-20009"),
        "{out}"
    );
    let (status, _, err) = cli(&test, &["pod", "add", "cli-pod"]).await;
    assert_eq!(status, 2);
    assert!(err.contains("already_exists"), "{err}");
    assert_eq!(cli(&test, &["pod", "keep-alive", "cli-pod"]).await.0, 0);
    assert_eq!(
        cli(&test, &["pod", "is-valid", "cli-pod"]).await.1.trim(),
        "true"
    );
    assert_eq!(cli(&test, &["pod", "is-valid", "nope"]).await.0, 3);

    let (status, out, err) = cli(
        &test,
        &[
            "mp",
            "reserve",
            "skia-rpi-001.example.com",
            "--user",
            "chrome-bot",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(status, 0, "{err}");
    let reserved: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reserved["pod"], "cli-pod");
    assert_eq!(reserved["port"], 20000);
    let (_, out, _) = cli(
        &test,
        &["mp", "get", "skia-rpi-001.example.com", "--format", "json"],
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap(), reserved);
    assert_eq!(
        cli(&test, &["mp", "keep-alive", "skia-rpi-001.example.com"])
            .await
            .0,
        0
    );
    assert_eq!(
        cli(&test, &["pod", "count-meeting-points", "cli-pod"])
            .await
            .1
            .trim(),
        "1"
    );
    wait_for("both listings", Duration::from_secs(5), || async {
        let pods = cli(&test, &["pod", "list"]).await.1;
        let points = cli(&test, &["mp", "list", "--pod", "cli-pod"]).await.1;
        (pods.contains("cli-pod") && points.contains("skia-rpi-001.example.com")).then_some(())
    })
    .await;
    let (status, out, _) = cli(&test, &["mp", "clear", "skia-rpi-001.example.com"]).await;
    assert_eq!(status, 0);
    assert!(out.contains("cleared"), "{out}");
    let (status, _, err) = cli(&test, &["mp", "get", "skia-rpi-001.example.com"]).await;
    assert_eq!(status, 2);
    assert!(err.contains("not_found"), "{err}");
    let (status, _, err) = cli(&test, &["mp", "reserve", "m", "--user=-bad"]).await;
    assert_ne!(status, 0);
    assert!(err.contains("user name"), "{err}");
    let (status, out, _) = cli(&test, &["pod", "remove", "cli-pod"]).await;
    assert_eq!(status, 0);
    assert!(out.contains("gone"), "{out}");
}
