//! Crashes, for real: kill -9 of the Switchyard process with commands in flight, and kill -9 of
//! nats-server while commands flow. No acknowledged command may be lost or applied twice.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use switchyard::config::StoreConfig;
use switchyard::domain::counter::{Counter, CounterId};
use switchyard::store::EventStore;

use crate::harness::{self, Reply, connect, request, start_nats, wait_for};

/// `switchyard serve` as a child process, killed on drop.
pub struct Switchyard {
    child: Child,
}

impl Switchyard {
    fn spawn(nats_url: &str, log: &std::path::Path) -> Self {
        Self::spawn_with(nats_url, log, &[])
    }

    /// With extra environment variables: configuration, failpoints.
    pub fn spawn_with(nats_url: &str, log: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .env("SWITCHYARD_NATS__SERVERS", format!("[\"{nats_url}\"]"))
            .env("SWITCHYARD_HTTP__LISTEN", "127.0.0.1:0")
            .env("SWITCHYARD_RUNTIME__MAILBOX_CAPACITY", "2000")
            .env("SWITCHYARD_LOG__FILTER", "warn")
            .env("SWITCHYARD_CLUSTER__LEASE_TTL", "2s")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("switchyard starts");
        Self { child }
    }

    /// Whether the process has ended by itself.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to 30 s for an armed failpoint to end the process; panics with its `log`
    /// if it does not.
    pub async fn wait_crashed(&mut self, log: &std::path::Path) {
        for _ in 0..300 {
            if self.has_exited() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the failpoint was not reached: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        self.kill_9();
    }
}

pub async fn wait_serving(client: &async_nats::Client) {
    wait_for("switchyard to answer", Duration::from_secs(20), || async {
        match tokio::time::timeout(
            Duration::from_millis(500),
            client.request("$SRV.PING.switchyard", "".into()),
        )
        .await
        {
            Ok(Ok(_)) => Some(()),
            _ => None,
        }
    })
    .await;
}

/// How many times each command id appears in the log.
async fn command_ids_in_log(store: &EventStore) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    let filter = store.subjects().events_of_kind("counter");
    let (mut messages, pending) = store
        .follow(&filter, switchyard::store::Start::Sequence(1))
        .await
        .unwrap();
    use futures::StreamExt;
    for _ in 0..pending {
        let message = messages.next().await.unwrap().unwrap();
        *seen
            .entry(message.command_id().unwrap().to_owned())
            .or_default() += 1;
    }
    seen
}

fn add(i: usize, counters: usize) -> serde_json::Value {
    json!({"id": format!("c{}", i % counters), "amount": 1, "command_id": format!("add-{i}")})
}

#[tokio::test]
async fn kill_9_with_a_thousand_commands_in_flight_loses_no_acknowledged_command() {
    const COMMANDS: usize = 1000;
    const COUNTERS: usize = 10;
    let nats = start_nats();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("switchyard.log");
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(3)))
        .connect(nats.url())
        .await
        .unwrap();
    let mut switchyard = Switchyard::spawn(&nats.url(), &log);
    wait_serving(&client).await;
    for c in 0..COUNTERS {
        request(
            &client,
            "counter.create",
            json!({"id": format!("c{c}")}).to_string(),
            None,
        )
        .await
        .ok();
    }

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..COMMANDS)
        .map(|i| {
            let client = client.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let reply = client.request("sy.api.counter.add", add(i, COUNTERS).to_string().into()).await;
                let ok = matches!(&reply, Ok(m) if m.headers.as_ref().is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()));
                if ok {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                (i, ok)
            })
        })
        .collect();
    wait_for(
        "some commands to be acknowledged",
        Duration::from_secs(20),
        || async { (acknowledged.load(Ordering::SeqCst) >= 100).then_some(()) },
    )
    .await;
    switchyard.kill_9();
    let mut acked = Vec::new();
    for task in tasks {
        let (i, ok) = task.await.unwrap();
        if ok {
            acked.push(i);
        }
    }
    assert!(
        acked.len() < COMMANDS,
        "the kill landed while commands were in flight ({} acked)",
        acked.len()
    );

    let mut switchyard = Switchyard::spawn(&nats.url(), &log);
    wait_serving(&client).await;
    let store = EventStore::open(
        connect(&nats).await,
        &StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let seen = command_ids_in_log(&store).await;
    for i in &acked {
        assert_eq!(
            seen.get(&format!("add-{i}")),
            Some(&1),
            "acknowledged add-{i} is in the log exactly once"
        );
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "no command is in the log twice"
    );

    // The state the restarted control plane serves equals a fresh replay of the log.
    for c in 0..COUNTERS {
        let id = format!("c{c}");
        let served = request(&client, "counter.get", json!({"id": id}).to_string(), None)
            .await
            .ok();
        let replayed = store
            .load_as_of::<Counter>(&CounterId::new(&id).unwrap(), u64::MAX)
            .await
            .unwrap();
        let applied = (0..COMMANDS)
            .filter(|i| i % COUNTERS == c && seen.contains_key(&format!("add-{i}")))
            .count();
        assert_eq!(served["result"]["value"], applied, "{id}");
        assert_eq!(served["version"], replayed.version, "{id}");
        assert_eq!(
            served["result"],
            serde_json::to_value(replayed.state_view(&id)).unwrap(),
            "{id}"
        );
    }

    // Every caller retries with the same command id: each command ends up applied exactly once.
    // A thousand at once on ten counters, each retry looked up in the command index: patient
    // callers, since how long they take under a loaded CI machine is not what this checks.
    let patient = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .connect(nats.url())
        .await
        .unwrap();
    let retries = futures::future::join_all(
        (0..COMMANDS).map(|i| request(&patient, "counter.add", add(i, COUNTERS).to_string(), None)),
    )
    .await;
    for reply in retries {
        reply.ok();
    }
    let seen = command_ids_in_log(&store).await;
    assert_eq!(seen.len(), COMMANDS + COUNTERS);
    assert!(seen.values().all(|n| *n == 1));
    for c in 0..COUNTERS {
        let served = request(
            &client,
            "counter.get",
            json!({"id": format!("c{c}")}).to_string(),
            None,
        )
        .await
        .ok();
        assert_eq!(served["result"]["value"], COMMANDS / COUNTERS);
    }
    switchyard.kill_9();
}

/// Fire-and-forget commands published through JetStream (each waiting for the stream's ack)
/// while the control plane is killed twice: every one is applied exactly once, and each
/// counter's in the order published.
#[tokio::test]
async fn kill_9_twice_under_fire_and_forget_loses_and_reorders_nothing() {
    const COMMANDS: usize = 600;
    const COUNTERS: usize = 4;
    let nats = start_nats();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("switchyard.log");
    let client = connect(&nats).await;
    let fast = [
        ("SWITCHYARD_API__COMMAND_FAILOVER", "2s"),
        ("SWITCHYARD_API__COMMAND_ACK_WAIT", "2s"),
        ("SWITCHYARD_API__COMMAND_RETRY_DELAY", "50ms"),
    ];
    let mut switchyard = Switchyard::spawn_with(&nats.url(), &log, &fast);
    wait_serving(&client).await;
    for c in 0..COUNTERS {
        request(
            &client,
            "counter.create",
            json!({"id": format!("c{c}")}).to_string(),
            None,
        )
        .await
        .ok();
    }
    let js = async_nats::jetstream::new(client.clone());
    let store = EventStore::open(
        connect(&nats).await,
        &StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let applied = || async {
        let seen = command_ids_in_log(&store).await;
        seen.keys().filter(|id| id.starts_with("add-")).count()
    };
    for i in 0..COMMANDS {
        #[allow(clippy::disallowed_methods)] // a publisher's publish, not the control plane's
        let ack = js
            .publish("sy.cmd.counter.add", add(i, COUNTERS).to_string().into())
            .await
            .unwrap();
        ack.await.unwrap();
        if i == COMMANDS / 3 || i == 2 * COMMANDS / 3 {
            // Kill it once it has applied some of what was published so far.
            let before = applied().await;
            wait_for(
                "some commands to be applied",
                Duration::from_secs(20),
                || async { (applied().await > before).then_some(()) },
            )
            .await;
            switchyard.kill_9();
            switchyard = Switchyard::spawn_with(&nats.url(), &log, &fast);
        }
    }
    wait_for(
        "every published command to be applied",
        Duration::from_secs(60),
        || async { (applied().await == COMMANDS).then_some(()) },
    )
    .await;
    let seen = command_ids_in_log(&store).await;
    assert!(seen.values().all(|n| *n == 1), "no command applied twice");
    for c in 0..COUNTERS {
        let subject = store.subjects().event("counter", &format!("c{c}"));
        let order: Vec<usize> = store
            .read_subject(&subject, 1, None)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| m.command_id()?.strip_prefix("add-")?.parse().ok())
            .collect();
        let published: Vec<usize> = (0..COMMANDS).filter(|i| i % COUNTERS == c).collect();
        assert_eq!(order, published, "c{c}: applied in publish order");
    }
    switchyard.kill_9();
}

trait StateView {
    fn state_view(&self, id: &str) -> Option<switchyard::domain::counter::CounterView>;
}

impl StateView for switchyard::store::Entity<Counter> {
    fn state_view(&self, id: &str) -> Option<switchyard::domain::counter::CounterView> {
        use switchyard::domain::Aggregate;
        self.state.view(&CounterId::new(id).unwrap())
    }
}

#[actix_rt::test]
async fn a_nats_server_restart_loses_no_acknowledged_command_and_needs_no_switchyard_restart() {
    let mut nats = start_nats();
    let mut config = harness::test_config(&nats);
    config.runtime.mailbox_capacity = 1000;
    config.nats.request_timeout = Duration::from_secs(2);
    let app = switchyard::app::App::start(&config, switchyard::runtime::system_clock())
        .await
        .unwrap();
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(2)))
        .max_reconnects(None)
        .connect(nats.url())
        .await
        .unwrap();
    request(
        &client,
        "counter.create",
        json!({"id": "c0"}).to_string(),
        None,
    )
    .await
    .ok();

    // Four callers send adds one after another while the server is killed and restarted.
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let next = next.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let reply = match tokio::time::timeout(
                        Duration::from_secs(3),
                        request_or_error(&client, add(i, 1)),
                    )
                    .await
                    {
                        Ok(reply) => reply,
                        Err(_) => Err("timed out".to_owned()),
                    };
                    outcomes.push((i, reply.is_ok()));
                    if reply.is_err() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                outcomes
            })
        })
        .collect();
    wait_for(
        "traffic before the crash",
        Duration::from_secs(10),
        || async { (next.load(Ordering::SeqCst) > 50).then_some(()) },
    )
    .await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart().unwrap();
    let resumed = next.load(Ordering::SeqCst);
    // The same control plane serves again once it has reconnected, without a restart.
    wait_for("commands to succeed again", Duration::from_secs(30), || async {
        request_or_error(&client, json!({"id": "c0", "amount": 1, "command_id": format!("probe-{}", next.load(Ordering::SeqCst))}))
            .await
            .ok()
    })
    .await;
    wait_for(
        "more traffic after the restart",
        Duration::from_secs(10),
        || async { (next.load(Ordering::SeqCst) > resumed + 50).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.extend(caller.await.unwrap());
    }
    let failures = outcomes.iter().filter(|(_, ok)| !ok).count();
    assert!(failures > 0, "the restart was felt by callers");

    let store = app.store().clone();
    let seen = command_ids_in_log(&store).await;
    for (i, ok) in &outcomes {
        if *ok {
            assert_eq!(
                seen.get(&format!("add-{i}")),
                Some(&1),
                "acknowledged add-{i} is in the log once"
            );
        }
    }
    assert!(seen.values().all(|n| *n == 1), "nothing was applied twice");
    // The failed ones are retried and land once.
    for (i, ok) in &outcomes {
        if !ok {
            request(&client, "counter.add", add(*i, 1).to_string(), None)
                .await
                .ok();
        }
    }
    let seen = command_ids_in_log(&store).await;
    assert!(seen.values().all(|n| *n == 1));
    let adds = seen.keys().filter(|k| k.starts_with("add-")).count();
    assert_eq!(adds, outcomes.len());
    app.shutdown().await;
}

async fn request_or_error(
    client: &async_nats::Client,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let message = client
        .request("sy.api.counter.add", body.to_string().into())
        .await
        .map_err(|e| e.to_string())?;
    let value: serde_json::Value =
        serde_json::from_slice(&message.payload).map_err(|e| e.to_string())?;
    match Reply::from_message(&message, value) {
        Reply::Ok(value) => Ok(value),
        Reply::Err { code, message, .. } => Err(format!("{code}: {message}")),
    }
}
