//! Cloud pools, first pieces: an instance set behind its throttles, on the stub driver that
//! records every call. A rate-limited driver is never called before its earliest retry, calls
//! are spaced by `max_cloud_ops_per_second`, quota and capacity hold creates, and two instance
//! sets on one driver see only their own instances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use switchyard::backend::process::ProcessBackend;
use switchyard::cloud::Cloud;
use switchyard::cloud::driver::{
    Driver, DriverError, Instance, InstanceSet, InstanceSpec, Operation, Registry, tag,
};
use switchyard::cloud::kubernetes::KubernetesDriver;
use switchyard::cloud::local_ssh::LocalServer;
use switchyard::cloud::loopback::LoopbackDriver;
use switchyard::cloud::ssh::{self, ExecError, Executor, Target};
use switchyard::cloud::static_hosts::StaticDriver;
use switchyard::cloud::stub::StubDriver;
use switchyard::config::CloudPoolConfig;
use switchyard::domain::cloud::worker::{ShutdownReason, WorkerView};

use crate::harness;
use switchyard::cloud::throttled::{Refusal, Throttled};
use switchyard::domain::cloud::throttle::{CapacityScope, Counts, Hold, Limits};
use switchyard::runtime::system_clock;

fn spec(set: &str) -> InstanceSpec {
    InstanceSpec {
        instance_type: "m5.large".into(),
        image: "debian".into(),
        tags: BTreeMap::from([("set".to_owned(), set.to_owned())]),
        init_command: "true".into(),
        public_key: "ssh-ed25519 AAAA".into(),
    }
}

fn one(creating: u32) -> Counts {
    Counts {
        instances: 0,
        creating,
    }
}

fn set(stub: &StubDriver, id: &str, ops_per_second: u32) -> Throttled {
    let inner = stub.instance_set(&serde_json::json!({}), id).unwrap();
    Throttled::new(inner, Limits::default(), ops_per_second, system_clock())
}

#[tokio::test]
async fn a_rate_limited_driver_is_not_called_before_its_earliest_retry() {
    let clock = system_clock();
    let stub = StubDriver::new(clock.clone());
    let instances = set(&stub, "a", 0);
    let earliest = clock().saturating_add(Duration::from_millis(700));
    stub.inject(
        Operation::Instances,
        DriverError::RateLimited {
            earliest_retry: earliest,
            message: "slow down".into(),
        },
    );
    let tags = BTreeMap::new();
    assert!(matches!(
        instances.instances(&tags).await,
        Err(Refusal::Driver(DriverError::RateLimited { .. }))
    ));
    // Every call is suspended, creates included: none reaches the driver.
    let mut held = 0;
    while clock() < earliest {
        match instances.create(&spec("a"), "m", one(1)).await {
            Err(Refusal::Held(Hold::RateLimited { until })) => {
                assert_eq!(until, earliest);
                held += 1;
            }
            other => panic!("called before the earliest retry: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held > 0);
    instances.create(&spec("a"), "m", one(1)).await.unwrap();
    let calls = stub.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].at >= earliest, "{calls:?}");
}

#[tokio::test]
async fn calls_are_spaced_by_max_cloud_ops_per_second() {
    let stub = StubDriver::new(system_clock());
    let instances = set(&stub, "a", 20);
    let tags = BTreeMap::new();
    for _ in 0..10 {
        instances.instances(&tags).await.unwrap();
    }
    let calls = stub.calls();
    assert_eq!(calls.len(), 10);
    for pair in calls.windows(2) {
        let gap = pair[1].at.since(pair[0].at);
        assert!(gap >= Duration::from_millis(50), "{gap:?} between calls");
    }
}

#[tokio::test]
async fn quota_and_capacity_errors_hold_creates_until_they_may_pass() {
    let stub = StubDriver::new(system_clock());
    let instances = set(&stub, "a", 0);
    for _ in 0..2 {
        instances.create(&spec("a"), "m", one(1)).await.unwrap();
    }
    stub.inject(
        Operation::Create,
        DriverError::Quota {
            message: "InstanceLimitExceeded".into(),
        },
    );
    let counts = Counts {
        instances: 2,
        creating: 1,
    };
    assert!(matches!(
        instances.create(&spec("a"), "m", counts).await,
        Err(Refusal::Driver(DriverError::Quota { .. }))
    ));
    let two = Counts {
        instances: 2,
        creating: 1,
    };
    assert!(matches!(
        instances.create(&spec("a"), "m", two).await,
        Err(Refusal::Held(Hold::AtQuotaUntilFewer { instances: 2, .. }))
    ));
    // One goes away: the next list ends the hold.
    let id = stub.all_instances()[0].id.clone();
    instances.destroy(&id).await.unwrap();
    instances.instances(&BTreeMap::new()).await.unwrap();
    instances.create(&spec("a"), "m", one(1)).await.unwrap();

    stub.inject(
        Operation::Create,
        DriverError::Capacity {
            scope: CapacityScope::Type("m5.large".into()),
            message: "InsufficientInstanceCapacity".into(),
        },
    );
    assert!(instances.create(&spec("a"), "m", one(1)).await.is_err());
    assert!(matches!(
        instances.create(&spec("a"), "m", one(1)).await,
        Err(Refusal::Held(Hold::AtCapacity { .. }))
    ));
    let mut other = spec("a");
    other.instance_type = "c5.large".into();
    instances.create(&other, "c", one(1)).await.unwrap();
    assert_eq!(instances.holds(Counts::default()).len(), 1);
}

#[tokio::test]
async fn two_instance_sets_on_one_driver_see_only_their_own() {
    let stub = StubDriver::new(system_clock());
    let mut registry = Registry::default();
    registry.register(Arc::new(stub.clone()));
    let driver = registry.get("stub").unwrap();
    assert!(matches!(
        registry.get("ec2"),
        Err(DriverError::UnknownDriver { .. })
    ));
    let a = Throttled::new(
        driver.instance_set(&serde_json::json!({}), "a").unwrap(),
        Limits::default(),
        0,
        system_clock(),
    );
    let b = Throttled::new(
        driver.instance_set(&serde_json::json!({}), "b").unwrap(),
        Limits::default(),
        0,
        system_clock(),
    );
    a.create(&spec("a"), "m", one(1)).await.unwrap();
    b.create(&spec("b"), "m", one(1)).await.unwrap();
    let mine = |set: &str| BTreeMap::from([("set".to_owned(), set.to_owned())]);
    let of_a = a.instances(&mine("a")).await.unwrap();
    assert_eq!(of_a.len(), 1);
    assert_eq!(of_a[0].tags["set"], "a");
    let of_b = b.instances(&mine("b")).await.unwrap();
    assert_eq!(of_b.len(), 1);
    assert_ne!(of_a[0].id, of_b[0].id);
}

/// A directory for loopback instances; whatever runs there is killed when the test ends.
struct Lab {
    _guard: harness::ProcessGuard,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            _guard: harness::ProcessGuard(vec![dir.path().to_owned()]),
            dir,
        }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// A loopback instance set on its own process-backend directory.
fn loopback(
    dir: &std::path::Path,
    config: serde_json::Value,
    set_id: &str,
) -> Arc<dyn InstanceSet> {
    let processes = ProcessBackend::new(dir, "cloud-test", Duration::from_secs(2));
    LoopbackDriver::new(processes)
        .instance_set(&config, set_id)
        .unwrap()
}

/// A spec for `set_id`, with a fresh secret its init command writes; the key that logs in.
fn secret_spec(set_id: &str) -> (InstanceSpec, Arc<PrivateKey>) {
    let key = Arc::new(switchyard::tunnel::keys::generate().unwrap());
    let secret = ssh::new_secret();
    let spec = InstanceSpec {
        instance_type: "loop".into(),
        image: "local".into(),
        tags: BTreeMap::from([
            (tag::INSTANCE_SET.to_owned(), set_id.to_owned()),
            (tag::INSTANCE_SECRET.to_owned(), secret.clone()),
        ]),
        init_command: ssh::init_command(&secret),
        public_key: key.public_key().to_openssh().unwrap(),
    };
    (spec, key)
}

fn executor(set: &Arc<dyn InstanceSet>, instance: &Instance, key: &Arc<PrivateKey>) -> Executor {
    Executor::new(
        Target {
            instance: instance.id.clone(),
            address: instance
                .address
                .clone()
                .expect("a loopback instance has an address"),
            user: instance.remote_user.clone(),
            secret: instance.tags.get(tag::INSTANCE_SECRET).cloned(),
        },
        key.clone(),
        set.clone(),
        Duration::from_secs(10),
    )
}

/// Kills the server side of every connection to a loopback instance (the children of its
/// sshd listener); how many.
fn drop_connections(instance: &str) -> usize {
    let pids = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    };
    let listener = pids().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!("{instance}/sshd/")))
    });
    let Some(listener) = listener else {
        return 0;
    };
    let children: Vec<i32> = pids()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid ...`: the fields after the last parenthesis.
                stat.rsplit(')')
                    .next()
                    .and_then(|rest| rest.split_whitespace().nth(1))
                    == Some(listener.to_string().as_str())
            })
        })
        .collect();
    for child in &children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*child),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    children.len()
}

/// Runs `command` once the instance boots: retried while nothing answers, for up to 20 s.
async fn once_booted(executor: &Executor, command: &str) -> Result<ssh::Output, ExecError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match executor.execute(command, b"").await {
            Err(ExecError::Unreachable { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            result => return result,
        }
    }
}

#[tokio::test]
async fn a_loopback_instance_boots_runs_commands_over_one_connection_and_is_destroyed() {
    let dir = Lab::new();
    let set = loopback(dir.path(), serde_json::json!({"boot_delay": "300ms"}), "a");
    let (spec, key) = secret_spec("a");
    let instance = set.create(&spec).await.unwrap();
    assert_eq!(instance.tags, spec.tags);
    let on = executor(&set, &instance, &key);
    // Booting: nothing answers yet.
    assert!(matches!(
        on.execute("true", b"").await,
        Err(ExecError::Unreachable { .. })
    ));
    let ran = once_booted(&on, "echo \"$SWITCHYARD_HOME\"; cat; exit 3")
        .await
        .unwrap();
    assert_eq!(ran.status, Some(3));
    // The secret the init command wrote is its owner's only.
    let mode = on
        .execute("stat -c %a \"$SWITCHYARD_HOME/instance-secret\"", b"")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mode.stdout).trim(), "600");
    let with_input = on.execute("cat", b"to stdin").await.unwrap();
    assert_eq!(with_input.stdout, b"to stdin");
    // Many commands at once share the connection, more than OpenSSH's MaxSessions (10).
    let commands: Vec<String> = (0..24).map(|n| format!("echo {n}")).collect();
    let many = futures::future::join_all(commands.iter().map(|c| on.execute(c, b""))).await;
    for (n, ran) in many.into_iter().enumerate() {
        assert_eq!(
            String::from_utf8_lossy(&ran.unwrap().stdout).trim(),
            n.to_string()
        );
    }
    // The connection drops (its server-side process is killed): the next command reconnects.
    assert!(drop_connections(&instance.id) > 0);
    let again = on.execute("echo again", b"").await.unwrap();
    assert_eq!(again.stdout, b"again\n");
    let tags = BTreeMap::from([(tag::INSTANCE_SET.to_owned(), "a".to_owned())]);
    let listed = set.instances(&tags).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, instance.id);
    let mut retagged = spec.tags.clone();
    retagged.insert(tag::IDLE_BEHAVIOR.to_owned(), "hold".to_owned());
    set.set_tags(&instance.id, &retagged).await.unwrap();
    assert_eq!(set.instances(&tags).await.unwrap()[0].tags, retagged);

    set.destroy(&instance.id).await.unwrap();
    assert!(set.instances(&tags).await.unwrap().is_empty());
    on.close().await;
    assert!(matches!(
        on.execute("true", b"").await,
        Err(ExecError::Unreachable { .. })
    ));
    // Destroying what is gone succeeds.
    set.destroy(&instance.id).await.unwrap();
}

#[tokio::test]
async fn an_instance_presenting_another_host_key_is_refused() {
    let dir = Lab::new();
    let config = serde_json::json!({"boot_delay": "0s",
        "faults": [{"kind": "wrong_host_key", "every": 2}]});
    let set = loopback(dir.path(), config, "a");
    let (spec, key) = secret_spec("a");
    let honest = set.create(&spec).await.unwrap();
    let wrong = set.create(&spec).await.unwrap();
    once_booted(&executor(&set, &honest, &key), "true")
        .await
        .unwrap();
    let marker = dir.path().join("ran");
    let refused = once_booted(
        &executor(&set, &wrong, &key),
        &format!("touch {}", marker.display()),
    )
    .await;
    assert!(
        matches!(&refused, Err(err @ ExecError::HostKey { .. }) if err.refuses_instance()),
        "{refused:?}"
    );
    assert!(!marker.exists());
}

#[tokio::test]
async fn without_host_key_verification_the_instance_secret_tells_the_instance_from_an_impostor() {
    let dir = Lab::new();
    let config = serde_json::json!({"boot_delay": "0s", "verify_host_key": false,
        "faults": [{"kind": "impostor", "every": 2}]});
    let set = loopback(dir.path(), config, "a");
    let (spec, key) = secret_spec("a");
    let instance = set.create(&spec).await.unwrap();
    let impostor = set.create(&spec).await.unwrap();
    let ran = once_booted(&executor(&set, &instance, &key), "echo verified")
        .await
        .unwrap();
    assert_eq!(ran.stdout, b"verified\n");
    // No secret where the instance keeps it: refused before the command.
    let marker = dir.path().join("impostor-ran");
    let refused = once_booted(
        &executor(&set, &impostor, &key),
        &format!("touch {}", marker.display()),
    )
    .await;
    assert!(
        matches!(&refused, Err(ExecError::Impostor { .. })),
        "{refused:?}"
    );
    assert!(!marker.exists());
    // The right server with another secret than the tag says: refused too.
    let mut mislabelled = instance.clone();
    mislabelled
        .tags
        .insert(tag::INSTANCE_SECRET.into(), ssh::new_secret());
    let refused = once_booted(&executor(&set, &mislabelled, &key), "true").await;
    assert!(
        matches!(&refused, Err(ExecError::Impostor { reason, .. }) if reason.contains("another secret")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn loopback_faults_are_real_an_instance_that_never_boots_and_one_that_disappears() {
    let dir = Lab::new();
    let config = serde_json::json!({"boot_delay": "0s", "faults": [
        {"kind": "no_boot", "every": 2},
        {"kind": "disappear", "every": 3, "after": "500ms"}]});
    let set = loopback(dir.path(), config, "a");
    let (spec, key) = secret_spec("a");
    let fine = set.create(&spec).await.unwrap();
    let never = set.create(&spec).await.unwrap();
    let vanishing = set.create(&spec).await.unwrap();
    once_booted(&executor(&set, &fine, &key), "true")
        .await
        .unwrap();
    let tags = BTreeMap::from([(tag::INSTANCE_SET.to_owned(), "a".to_owned())]);
    let gone = harness::wait_for(
        "the instance to disappear",
        Duration::from_secs(20),
        || async {
            let ids: Vec<String> = set
                .instances(&tags)
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.id)
                .collect();
            (!ids.contains(&vanishing.id)).then_some(ids)
        },
    )
    .await;
    assert!(
        gone.contains(&fine.id) && gone.contains(&never.id),
        "{gone:?}"
    );
    // Still nothing answers on the one that never booted.
    assert!(matches!(
        executor(&set, &never, &key).execute("true", b"").await,
        Err(ExecError::Unreachable { .. })
    ));
    for instance in [&fine, &never] {
        set.destroy(&instance.id).await.unwrap();
    }
    assert!(set.instances(&tags).await.unwrap().is_empty());
}

#[tokio::test]
async fn two_loopback_sets_leave_each_others_instances_alone() {
    let dir = Lab::new();
    let a = loopback(dir.path(), serde_json::json!({"boot_delay": "0s"}), "a");
    let b = loopback(dir.path(), serde_json::json!({"boot_delay": "0s"}), "b");
    let (spec_a, _) = secret_spec("a");
    let (spec_b, _) = secret_spec("b");
    let of_a = a.create(&spec_a).await.unwrap();
    let of_b = b.create(&spec_b).await.unwrap();
    let only = |set: &str| BTreeMap::from([(tag::INSTANCE_SET.to_owned(), set.to_owned())]);
    let ids = |found: Vec<Instance>| found.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(a.instances(&only("a")).await.unwrap()),
        [of_a.id.as_str()]
    );
    assert_eq!(
        ids(b.instances(&only("b")).await.unwrap()),
        [of_b.id.as_str()]
    );
    a.destroy(&of_a.id).await.unwrap();
    assert_eq!(
        ids(b.instances(&only("b")).await.unwrap()),
        [of_b.id.as_str()]
    );
    b.destroy(&of_b.id).await.unwrap();
}

/// A control plane with one cloud pool `cloud` on the loopback driver (`driver_config`),
/// syncing every 200 ms, idle instances shut down after a second.
async fn cloud_app(driver_config: serde_json::Value, max_instances: u32) -> harness::TestApp {
    harness::start_app(|config| {
        config.cloud.sync_interval = Duration::from_millis(200);
        config.cloud.timeout_idle = Duration::from_secs(1);
        config.cloud.timeout_ssh = Duration::from_secs(5);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "loopback".into(),
            driver_config,
            max_instances,
            ..CloudPoolConfig::default()
        }];
        config.sessions.executor_count = 4;
        config.sessions.stop_grace = Duration::from_millis(500);
    })
    .await
}

/// Every worker the log has, by id.
async fn workers(test: &harness::TestApp) -> BTreeMap<String, WorkerView> {
    let cloud = test.app.services().get::<Cloud>().unwrap();
    cloud
        .table
        .ask(|table, _| {
            table
                .list(None, usize::MAX)
                .into_iter()
                .map(|(id, view)| (id.to_string(), view))
                .collect()
        })
        .await
        .unwrap()
}

fn on_cloud(name: &str, kind: &str, script: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "kind": kind, "pool": "cloud",
        "command": "sh", "args": ["-c", script]})
}

#[actix_rt::test]
async fn a_waiting_session_grows_its_cloud_pool_runs_and_the_idle_instance_is_shut_down() {
    let test = cloud_app(serde_json::json!({"boot_delay": "300ms"}), 2).await;
    // The pool is there before any instance: a session may ask for what it grows to.
    let pools = harness::call(&test, "pool.list", serde_json::json!({}))
        .await
        .ok();
    let cloud = &pools["result"][0];
    assert_eq!(cloud["name"], "cloud", "{pools}");
    assert_eq!(cloud["max_machines"], 2);
    let refused = harness::call(
        &test,
        "session.schedule",
        serde_json::json!({"components": [
            on_cloud("driver", "driver", "true"),
            on_cloud("w1", "server", "sleep 10"),
            on_cloud("w2", "server", "sleep 10")]}),
    )
    .await
    .code_and_reason();
    assert_eq!(refused, "capacity/exceeds_pool_capacity");

    // A server and a driver that reaches it, each on an instance of its own, over SSH.
    let mut server = crate::sessions::http_server("w1");
    server["pool"] = "cloud".into();
    // Its variables are its own: the remote start script's do not move.
    server["env"] = serde_json::json!({"base": "/nowhere", "component": "x"});
    let mut driver = crate::sessions::reaching_driver();
    driver["pool"] = "cloud".into();
    driver["args"][1] = serde_json::Value::from(format!(
        "import os\nprint('home', os.environ['SWITCHYARD_HOME'], flush=True)\n{}",
        driver["args"][1].as_str().unwrap()
    ));
    let id = crate::sessions::schedule(
        &test,
        serde_json::json!({"id": "grow", "components": [driver, server]}),
    )
    .await;
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    let log = crate::sessions::driver_log(&test, &id).await;
    assert!(log.contains("reached 127.0.0.1:"), "{log}");
    // It ran in its instance's home, not in the sessions' process directory.
    let cloud_dir = test.config.cloud.dir.to_string_lossy().into_owned();
    assert!(log.contains(&format!("home {cloud_dir}")), "{log}");
    let created = workers(&test).await;
    assert_eq!(created.len(), 2, "{created:?}");
    for seen in created.values() {
        assert!(seen.created);
        assert!(seen.booted_at.is_some());
    }
    // Idle for a second after the session: shut down, destroyed, gone from the list.
    for worker in created.keys() {
        let gone = harness::wait_for(
            "the idle worker to be gone",
            Duration::from_secs(30),
            || async {
                let view = workers(&test).await.remove(worker)?;
                view.gone_at.is_some().then_some(view)
            },
        )
        .await;
        assert_eq!(gone.shutdown_reason, Some(ShutdownReason::Idle));
        assert!(!gone.disappeared);
    }
    let (_, metrics) = harness::http_get(test.app.http_addr(), "/metrics").await;
    for line in [
        r#"switchyard_cloud_boots_total{set="cloud",outcome="booted"} 2"#,
        r#"switchyard_cloud_driver_calls_total{set="cloud",operation="create",outcome="ok"} 2"#,
        r#"switchyard_cloud_driver_calls_total{set="cloud",operation="destroy",outcome="ok"}"#,
        r#"switchyard_cloud_boot_seconds_count{set="cloud"} 2"#,
        r#"switchyard_cloud_ssh_seconds_count{set="cloud"} 2"#,
        r#"switchyard_cloud_workers{set="cloud",instance_type="default",state="idle"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert_eq!(sshd_of(&test.config.cloud.dir), 0);
}

/// How many sshd listeners (instances) run under `dir`.
fn sshd_of(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let line = String::from_utf8_lossy(&c).into_owned();
                line.contains("[listener]") && line.contains(&*dir.to_string_lossy())
            })
        })
        .count()
}

/// The one worker of the pool that is not gone, once there is one.
async fn the_worker(test: &harness::TestApp) -> (String, WorkerView) {
    harness::wait_for("a worker", Duration::from_secs(30), || async {
        workers(test)
            .await
            .into_iter()
            .find(|(_, w)| w.gone_at.is_none() && w.booted_at.is_some())
    })
    .await
}

#[actix_rt::test]
async fn a_held_worker_outlives_its_idle_timeout_and_a_restart_and_kill_destroys_it() {
    let test = cloud_app(serde_json::json!({"boot_delay": "0s"}), 1).await;
    let id = crate::sessions::schedule(
        &test,
        serde_json::json!({"components": [on_cloud("driver", "driver", "sleep 1")]}),
    )
    .await;
    let (worker, _) = the_worker(&test).await;
    let held = harness::call(&test, "worker.hold", serde_json::json!({"id": worker}))
        .await
        .ok();
    assert_eq!(held["result"]["idle_behavior"], "hold", "{held}");
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    // Well past the idle timeout (1 s), and across a restart: still there, still held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let test = test.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = workers(&test).await.remove(&worker).unwrap();
    assert_eq!(after.gone_at, None, "{after:?}");
    assert_eq!(serde_json::to_value(after.idle_behavior).unwrap(), "hold");
    assert_eq!(sshd_of(&test.config.cloud.dir), 1);
    // A held worker takes no new session, and the pool is at max_instances (1): it waits.
    let waits = crate::sessions::schedule(
        &test,
        serde_json::json!({"components": [on_cloud("driver", "driver", "true")]}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = crate::sessions::get(&test, &waits).await;
    assert_eq!(waiting["status"], "QUEUED", "{waiting:#}");

    // Bad requests change nothing.
    for (body, code) in [
        (serde_json::json!({"id": "no-such-worker"}), "not_found"),
        (serde_json::json!({"id": ""}), "invalid"),
        (serde_json::json!({"id": worker, "extra": 1}), "invalid"),
        (serde_json::json!([]), "invalid"),
    ] {
        let reply = harness::call(&test, "worker.drain", body.clone()).await;
        assert_eq!(reply.code(), code, "{body}");
    }
    assert_eq!(
        serde_json::to_value(workers(&test).await[&worker].idle_behavior).unwrap(),
        "hold"
    );

    // Killed: shut down and destroyed; with the held one gone, the waiting session gets a
    // new instance and runs.
    harness::call(&test, "worker.kill", serde_json::json!({"id": worker}))
        .await
        .ok();
    let gone = harness::wait_for(
        "the killed worker to be gone",
        Duration::from_secs(30),
        || async {
            let view = workers(&test).await.remove(&worker)?;
            view.gone_at.is_some().then_some(view)
        },
    )
    .await;
    assert_eq!(gone.shutdown_reason, Some(ShutdownReason::Killed));
    let refused = harness::call(&test, "worker.run", serde_json::json!({"id": worker})).await;
    assert_eq!(refused.code(), "not_found");
    let view = crate::sessions::ended(&test, &waits, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
}

#[actix_rt::test]
async fn kill_9_right_after_a_create_then_restart_adopts_the_instance_and_creates_nothing_twice() {
    use crate::crash::{Switchyard, wait_serving};
    use crate::harness::{Reply, request};

    let nats = harness::start_nats();
    let dir = Lab::new();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nreaction_interval = \"200ms\"\n\n\
             [sessions]\nprocess_dir = \"{0}/processes\"\npoll_interval = \"50ms\"\n\n\
             [cloud]\nsync_interval = \"200ms\"\ndir = \"{0}/cloud\"\n\n\
             [[cloud.pools]]\nname = \"cloud\"\nmax_instances = 2\n\
             driver_config = {{ boot_delay = \"0s\" }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let log = dir.path().join("switchyard.log");
    let armed = [
        ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
        ("SWITCHYARD_FAILPOINTS", "cloud.after_create"),
    ];
    let mut crashing = Switchyard::spawn_with(&nats.url(), &log, &armed);
    let client = crate::lesson_crash::client(&nats.url()).await;
    wait_serving(&client).await;
    let body = serde_json::json!({"id": "adopt", "components": [on_cloud("driver", "driver", "echo ran")]});
    harness::wait_for(
        "the session to be scheduled",
        Duration::from_secs(20),
        || async {
            match request(&client, "session.schedule", body.to_string(), None).await {
                Reply::Ok(_) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    crashing.wait_crashed(&log).await;
    // The instance outlived the control plane that created it, and the log never heard of it.
    harness::wait_for("the instance's sshd", Duration::from_secs(10), || async {
        (sshd_of(dir.path()) == 1).then_some(())
    })
    .await;
    // Another set's instance on the same driver: left alone, and said so once.
    let elsewhere = LoopbackDriver::new(ProcessBackend::new(
        dir.path().join("cloud/instances"),
        "switchyard",
        Duration::from_secs(2),
    ))
    .instance_set(&serde_json::json!({"boot_delay": "0s"}), "elsewhere")
    .unwrap();
    let foreign = elsewhere.create(&secret_spec("elsewhere").0).await.unwrap();

    let plain = [
        ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
        ("RUST_LOG", "warn,switchyard::cloud=info"),
    ];
    let _restarted = Switchyard::spawn_with(&nats.url(), &log, &plain);
    wait_serving(&client).await;
    let view = harness::wait_for("the session to end", Duration::from_secs(60), || async {
        let Reply::Ok(view) = request(
            &client,
            "session.get",
            r#"{"id": "adopt"}"#.to_owned(),
            None,
        )
        .await
        else {
            return None;
        };
        view["result"]["cleaned_up_at"]
            .is_string()
            .then(|| view["result"].clone())
    })
    .await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    let Reply::Ok(listed) = request(&client, "worker.list", "{}".to_owned(), None).await else {
        panic!("worker.list failed");
    };
    let workers = listed["result"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{listed:#}");
    assert_eq!(
        workers[0]["created"], false,
        "adopted, not created: {listed:#}"
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(sshd_of(dir.path()), 2, "{log}");
    let tags = BTreeMap::from([(tag::INSTANCE_SET.to_owned(), "elsewhere".to_owned())]);
    let still = elsewhere.instances(&tags).await.unwrap();
    assert_eq!(still.len(), 1);
    assert_eq!(still[0].id, foreign.id);
    assert!(
        log.lines()
            .any(|l| l.contains("not this set's") && l.contains("elsewhere")),
        "{log}"
    );
    elsewhere.destroy(&foreign.id).await.unwrap();
}

/// The stub instance `id` as its set lists it, once it has an address.
async fn served(set: &Arc<dyn InstanceSet>, id: &str) -> Instance {
    harness::wait_for("the instance to boot", Duration::from_secs(20), || async {
        set.instances(&BTreeMap::new())
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.id == id && i.address.is_some())
    })
    .await
}

#[tokio::test]
async fn a_stub_instance_serves_ssh_from_this_process_tells_an_impostor_and_ends_like_a_machine() {
    let dir = Lab::new();
    let stub = StubDriver::new(system_clock()).serving_from(dir.path().join("stub"));
    let config = serde_json::json!({"ssh": true, "boot_delay": "200ms",
        "faults": [{"kind": "impostor", "every": 2}]});
    let set = stub.instance_set(&config, "a").unwrap();
    let (spec, key) = secret_spec("a");
    let created = set.create(&spec).await.unwrap();
    assert_eq!(created.address, None, "booting");
    let instance = served(&set, &created.id).await;
    let on = executor(&set, &instance, &key);
    let ran = on
        .execute("cat; echo \" in $SWITCHYARD_HOME\" >&2; exit 4", b"input")
        .await
        .unwrap();
    assert_eq!(ran.stdout, b"input");
    let home = dir.path().join("stub").join(&instance.id);
    assert_eq!(
        String::from_utf8_lossy(&ran.stderr).trim(),
        format!("in {}", home.display())
    );
    assert_eq!(ran.status, Some(4));
    // Another key does not log in.
    let stranger = Arc::new(switchyard::tunnel::keys::generate().unwrap());
    let refused = executor(&set, &instance, &stranger)
        .execute("true", b"")
        .await;
    assert!(
        matches!(refused, Err(ExecError::LoginRefused { .. })),
        "{refused:?}"
    );
    // The second instance never ran its init command: no secret, refused.
    let impostor = set.create(&spec).await.unwrap();
    let impostor = served(&set, &impostor.id).await;
    let refused = executor(&set, &impostor, &key).execute("true", b"").await;
    assert!(
        matches!(refused, Err(ExecError::Impostor { .. })),
        "{refused:?}"
    );

    // A component it runs (its own process group, as the remote backend starts them) dies
    // with it, and its disk goes.
    on.execute(
        "mkdir -p sessions/s/c && cd sessions/s/c && \
         setsid sh -c 'echo $$ > pid; exec sleep 300' > /dev/null 2>&1 < /dev/null & \
         while [ ! -s sessions/s/c/pid ]; do sleep 0.05; done",
        b"",
    )
    .await
    .unwrap();
    let group: i32 = std::fs::read_to_string(home.join("sessions/s/c/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(group));
    set.destroy(&instance.id).await.unwrap();
    harness::wait_for("the component to die", Duration::from_secs(10), || async {
        (!alive(group)).then_some(())
    })
    .await;
    assert!(!home.exists());
    assert!(matches!(
        on.execute("true", b"").await,
        Err(ExecError::Unreachable { .. } | ExecError::Session { .. })
    ));
    set.destroy(&impostor.id).await.unwrap();
    assert!(stub.all_instances().is_empty());
    let operations: Vec<Operation> = stub.calls().into_iter().map(|c| c.operation).collect();
    assert!(
        operations.contains(&Operation::VerifyHostKey),
        "{operations:?}"
    );
}

/// arvados's own drill (`lib/dispatchcloud`'s stub-driver test): 200 sessions queued at once
/// on a pool whose driver fails calls of every kind and whose instances sometimes boot
/// slowly, never boot, or disappear while they work. Every session ends, none runs twice, and
/// in the end every instance that was created is destroyed, its processes and disk with it.
#[actix_rt::test]
async fn the_stub_drill_200_sessions_against_every_error_kind_all_end_none_twice_nothing_left() {
    const SESSIONS: usize = 200;
    let lab = Lab::new();
    let ran = lab.path().join("ran");
    let driver_config = serde_json::json!({
        "ssh": true, "boot_delay": "100ms",
        "faults": [
            {"kind": "slow_boot", "every": 3, "delay": "700ms"},
            {"kind": "no_boot", "every": 7},
            {"kind": "disappear", "every": 5, "after": "1500ms"}],
        "errors": [
            {"operation": "create", "kind": "quota", "every": 4},
            {"operation": "create", "kind": "capacity", "scope": "type", "every": 6},
            {"operation": "create", "kind": "failed", "every": 9},
            {"operation": "instances", "kind": "rate_limited", "every": 8, "retry_after": "300ms"},
            {"operation": "instances", "kind": "failed", "every": 13},
            {"operation": "destroy", "kind": "failed", "every": 3}]});
    let test = harness::start_app(|config| {
        config.cloud.sync_interval = Duration::from_millis(100);
        config.cloud.timeout_booting = Duration::from_secs(3);
        config.cloud.timeout_idle = Duration::from_millis(500);
        config.cloud.timeout_probe = Duration::from_secs(3);
        config.cloud.timeout_ssh = Duration::from_secs(3);
        config.cloud.quota_hold = Duration::from_millis(500);
        config.cloud.capacity_hold = Duration::from_millis(500);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "stub".into(),
            driver_config,
            max_instances: 8,
            max_concurrent_creates: 2,
            ..CloudPoolConfig::default()
        }];
        config.sessions.executor_count = 8;
        config.sessions.stop_grace = Duration::from_millis(200);
        // Each poll of a remote component is a command on its instance: at the default
        // interval, eight of them keep two cores busy enough.
        config.sessions.poll_interval = Duration::from_millis(250);
    })
    .await;
    let script = format!(
        "echo \"$SWITCHYARD_SESSION\" >> {}; sleep 0.2",
        ran.display()
    );
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let body = serde_json::json!({"components": [on_cloud("driver", "driver", &script)]});
        ids.push(crate::sessions::schedule(&test, body).await);
    }

    let mut done = Vec::new();
    let mut failed = Vec::new();
    for id in &ids {
        let view = crate::sessions::ended(&test, id, Duration::from_secs(300)).await;
        match view["status"].as_str() {
            Some("DONE") => done.push(id.clone()),
            _ => failed.push(view),
        }
    }
    // None ran twice; every one that is DONE ran once.
    let lines = std::fs::read_to_string(&ran).unwrap_or_default();
    let mut runs: BTreeMap<&str, usize> = BTreeMap::new();
    for line in lines.lines() {
        *runs.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    for id in &done {
        assert_eq!(runs.get(id.as_str()), Some(&1), "{id} is DONE");
    }

    // Every instance created is destroyed in the end (none is held), and took what ran on it
    // and its disk along.
    let all = harness::wait_for(
        "every worker to be gone",
        Duration::from_secs(60),
        || async {
            let all = workers(&test).await;
            all.values().all(|w| w.gone_at.is_some()).then_some(all)
        },
    )
    .await;
    let disappeared = all.values().filter(|w| w.disappeared).count();
    let never_booted = all.values().filter(|w| w.booted_at.is_none()).count();
    assert!(disappeared > 0 && never_booted > 0, "{all:#?}");
    // Only a disappearing instance loses a session, and at most the ones it ran.
    assert!(
        failed.len() <= disappeared * 8,
        "{} of {SESSIONS} failed, {disappeared} instances disappeared: {failed:#?}",
        failed.len()
    );
    let stub = test.config.cloud.dir.join("stub");
    let left: Vec<_> = std::fs::read_dir(&stub)
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "instances left on disk: {left:?}");

    // Every kind of error was met, and counted.
    let (_, metrics) = harness::http_get(test.app.http_addr(), "/metrics").await;
    for line in [
        r#"operation="create",outcome="quota""#,
        r#"operation="create",outcome="capacity""#,
        r#"operation="create",outcome="error""#,
        r#"operation="instances",outcome="rate_limited""#,
        r#"operation="instances",outcome="error""#,
        r#"operation="destroy",outcome="error""#,
        r#"outcome="never_booted""#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let created = metrics
        .lines()
        .find(|l| l.contains(r#"operation="create",outcome="ok""#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<usize>().ok());
    assert_eq!(created, Some(all.len()), "{metrics}");
    println!(
        "{} sessions: {} DONE, {} ERROR; {} instances created, {disappeared} disappeared, \
         {never_booted} never booted",
        SESSIONS,
        done.len(),
        failed.len(),
        all.len()
    );
}

/// The host key an instance's sshd presents (its `host_key.pub`, under `dir`).
fn host_key_of(dir: &std::path::Path, instance: &str) -> String {
    fn find(dir: &std::path::Path, instance: &str) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.ends_with("host_key.pub") && path.to_string_lossy().contains(instance) {
                return Some(path);
            }
            if path.is_dir()
                && let Some(found) = find(&path, instance)
            {
                return Some(found);
            }
        }
        None
    }
    let path = find(dir, instance).expect("the instance's host key");
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// Two running loopback sshd hosts that let `key` in: their static-driver entries.
async fn static_hosts(dir: &std::path::Path, key: &Arc<PrivateKey>) -> Vec<serde_json::Value> {
    let set = loopback(dir, serde_json::json!({"boot_delay": "0s"}), "hosts");
    let (mut spec, _) = secret_spec("hosts");
    spec.public_key = key.public_key().to_openssh().unwrap();
    let mut hosts = Vec::new();
    for name in ["h1", "h2"] {
        let instance = set.create(&spec).await.unwrap();
        once_booted(&executor(&set, &instance, key), "true")
            .await
            .unwrap();
        hosts.push(serde_json::json!({
            "name": name,
            "address": instance.address.unwrap(),
            "user": instance.remote_user,
            "host_key": host_key_of(dir, &instance.id),
        }));
    }
    hosts
}

/// Whether the static host at `address` (one of `hosts`) holds a claim.
fn claimed(dir: &std::path::Path, hosts: &[serde_json::Value], name: &str) -> bool {
    let host = hosts.iter().find(|h| h["name"] == name).unwrap();
    let pub_key = host["host_key"].as_str().unwrap().to_owned();
    fn walk(dir: &std::path::Path, key: &str) -> Option<bool> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.ends_with("host_key.pub")
                && std::fs::read_to_string(&path).is_ok_and(|k| k.trim() == key)
            {
                return Some(path.parent()?.join("claim").exists());
            }
            if path.is_dir()
                && let Some(found) = walk(&path, key)
            {
                return Some(found);
            }
        }
        None
    }
    walk(dir, &pub_key).expect("the host's directory")
}

#[tokio::test]
async fn static_hosts_are_claimed_once_released_whole_and_verified_by_their_configured_keys() {
    let dir = Lab::new();
    let key = Arc::new(switchyard::tunnel::keys::generate().unwrap());
    let hosts = static_hosts(dir.path(), &key).await;
    let driver = StaticDriver::new(Some(key.clone()), Duration::from_secs(5));
    let config = serde_json::json!({ "hosts": hosts });
    let a = driver.instance_set(&config, "a").unwrap();
    let b = driver.instance_set(&config, "b").unwrap();
    let (spec_a, _) = secret_spec("a");
    let (spec_b, _) = secret_spec("b");
    let only = |set: &str| BTreeMap::from([(tag::INSTANCE_SET.to_owned(), set.to_owned())]);
    let ids = |found: Vec<Instance>| found.into_iter().map(|i| i.id).collect::<Vec<_>>();

    let first = a.create(&spec_a).await.unwrap();
    assert_eq!(first.id, "h1");
    assert_eq!(first.tags, spec_a.tags);
    // The other set cannot claim what is claimed: it gets the other host, then a quota error.
    assert_eq!(b.create(&spec_b).await.unwrap().id, "h2");
    assert!(matches!(
        a.create(&spec_a).await,
        Err(DriverError::Quota { .. })
    ));
    assert_eq!(ids(a.instances(&only("a")).await.unwrap()), ["h1"]);
    assert_eq!(ids(b.instances(&only("b")).await.unwrap()), ["h2"]);
    // A claim lives on the host: a fresh set (another replica, a restart) sees it.
    let again = driver.instance_set(&config, "a").unwrap();
    assert_eq!(ids(again.instances(&only("a")).await.unwrap()), ["h1"]);
    let mut retagged = spec_a.tags.clone();
    retagged.insert(tag::IDLE_BEHAVIOR.into(), "hold".into());
    a.set_tags("h1", &retagged).await.unwrap();
    assert_eq!(again.instances(&only("a")).await.unwrap()[0].tags, retagged);

    // The executor verifies h1 by its configured key (no secret), runs a component there;
    // releasing the host kills it and deletes its directory, and the host stays.
    let on = Executor::new(
        Target {
            instance: "h1".into(),
            address: first.address.clone().unwrap(),
            user: first.remote_user.clone(),
            secret: None,
        },
        key.clone(),
        a.clone(),
        Duration::from_secs(5),
    );
    let started = on
        .execute(
            "mkdir -p \"$SWITCHYARD_HOME/sessions/s/c\"; cd \"$SWITCHYARD_HOME/sessions/s/c\"; \
             setsid sh -c 'echo $$ > pid; exec sleep 300' > /dev/null 2>&1 < /dev/null & \
             while [ ! -s \"$SWITCHYARD_HOME/sessions/s/c/pid\" ]; do sleep 0.05; done; \
             cat \"$SWITCHYARD_HOME/sessions/s/c/pid\"",
            b"",
        )
        .await
        .unwrap();
    let group: i32 = String::from_utf8_lossy(&started.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(claimed(dir.path(), &hosts, "h1"));
    a.destroy("h1").await.unwrap();
    assert!(!claimed(dir.path(), &hosts, "h1"));
    harness::wait_for("the component to die", Duration::from_secs(10), || async {
        (!std::path::Path::new(&format!("/proc/{group}")).exists()).then_some(())
    })
    .await;
    assert!(a.instances(&only("a")).await.unwrap().is_empty());
    assert_eq!(on.execute("echo up", b"").await.unwrap().stdout, b"up\n");

    // A host whose configured key is another's is never logged in to, so never claimed.
    let mut liar = hosts[0].clone();
    liar["name"] = "liar".into();
    liar["host_key"] = hosts[1]["host_key"].clone();
    let lying = driver
        .instance_set(&serde_json::json!({ "hosts": [liar] }), "c")
        .unwrap();
    assert!(matches!(
        lying.create(&secret_spec("c").0).await,
        Err(DriverError::Quota { .. })
    ));
    assert!(!claimed(dir.path(), &hosts, "h1"));
    b.destroy("h2").await.unwrap();
}

#[actix_rt::test]
async fn a_static_pool_claims_hosts_for_waiting_sessions_and_releases_them_when_idle() {
    let lab = Lab::new();
    let cloud_dir = lab.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir).unwrap();
    // The hosts let in the key this control plane will use.
    let key = Arc::new(
        switchyard::tunnel::keys::load_or_create(Some(&cloud_dir.join("id_ed25519"))).unwrap(),
    );
    let hosts_dir = lab.path().join("hosts");
    let hosts = static_hosts(&hosts_dir, &key).await;
    let test = harness::start_app(|config| {
        config.cloud.dir = cloud_dir.clone();
        config.cloud.sync_interval = Duration::from_millis(200);
        config.cloud.timeout_idle = Duration::from_secs(1);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "static".into(),
            driver_config: serde_json::json!({ "hosts": hosts }),
            max_instances: 3,
            ..CloudPoolConfig::default()
        }];
        config.sessions.executor_count = 3;
        config.sessions.stop_grace = Duration::from_millis(300);
    })
    .await;
    // Three sessions, two hosts: the third runs once a host is free again.
    let mut ids = Vec::new();
    for n in 0..3 {
        let body = serde_json::json!({"components": [
            on_cloud("driver", "driver", &format!("echo run {n} in \"$PWD\"; sleep 1"))]});
        ids.push(crate::sessions::schedule(&test, body).await);
    }
    for id in &ids {
        let view = crate::sessions::ended(&test, id, Duration::from_secs(60)).await;
        assert_eq!(view["status"], "DONE", "{view:#}");
        let log = crate::sessions::driver_log(&test, id).await;
        assert!(
            log.contains(&*hosts_dir.to_string_lossy()),
            "it ran on a host: {log}"
        );
    }
    let all = harness::wait_for(
        "the idle hosts to be released",
        Duration::from_secs(30),
        || async {
            let all = workers(&test).await;
            (!all.is_empty() && all.values().all(|w| w.gone_at.is_some())).then_some(all)
        },
    )
    .await;
    let names: std::collections::BTreeSet<&str> = all.keys().map(String::as_str).collect();
    assert!(names.iter().all(|n| ["h1", "h2"].contains(n)), "{names:?}");
    for worker in all.values() {
        assert_eq!(
            worker.shutdown_reason,
            Some(ShutdownReason::Idle),
            "{worker:?}"
        );
    }
    // Released, not destroyed: no claim left, and both hosts still serve.
    assert!(!claimed(&hosts_dir, &hosts, "h1") && !claimed(&hosts_dir, &hosts, "h2"));
    assert_eq!(sshd_of(&hosts_dir), 2);
}

/// Plays the kubelet for an instance's pod: running, at `ip`.
async fn pod_running(client: &kube::Client, name: &str, ip: &str) {
    use kube::api::{Patch, PatchParams};
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), "default");
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "podIP": ip}})),
    )
    .await
    .unwrap();
}

/// Plays the pod's command: the init command (unless an impostor), then SSH at `bind`.
async fn pod_serves(
    home: &std::path::Path,
    bind: &str,
    spec: &InstanceSpec,
    impostor: bool,
) -> LocalServer {
    std::fs::create_dir_all(home).unwrap();
    if !impostor {
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", &spec.init_command])
            .env("SWITCHYARD_HOME", home)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let authorized = switchyard::tunnel::keys::parse_public(&spec.public_key).unwrap();
    let host_key = switchyard::tunnel::keys::generate().unwrap();
    LocalServer::start_at(bind, host_key, authorized, home.to_owned())
        .await
        .unwrap()
}

#[tokio::test]
async fn kubernetes_instances_are_a_secret_and_a_pod_and_the_instance_secret_tells_an_impostor() {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    let emulator = crate::kubernetes::Emulator::start();
    let client = emulator.client();
    let lab = Lab::new();
    let port = crate::kubernetes::free_port();
    let config = switchyard::config::KubernetesConfig {
        api: Some(emulator.url().to_owned()),
        ..Default::default()
    };
    let driver = KubernetesDriver::new(&config, "Drill");
    let set = driver
        .instance_set(
            &serde_json::json!({"ssh_port": port, "node_selector": {"pool": "cloud"}}),
            "cloud",
        )
        .unwrap();
    let (mut spec, key) = secret_spec("cloud");
    spec.image = "switchyard/sshd:test".into();
    let secret_value = spec.tags[tag::INSTANCE_SECRET].clone();
    let created = set.create(&spec).await.unwrap();

    // What the API received: a pod that names its Secret and holds no secret itself.
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), "default");
    let pod = pods.get(&created.id).await.unwrap();
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["switchyard.dev/instance-set"], "cloud");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "switchyard");
    let pod_spec = pod.spec.clone().unwrap();
    assert_eq!(pod_spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod_spec.automount_service_account_token, Some(false));
    assert_eq!(pod_spec.node_selector.unwrap()["pool"], "cloud");
    let container = &pod_spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("switchyard/sshd:test"));
    let init = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "SWITCHYARD_INIT")
        .unwrap();
    let from = init
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(from.name, created.id);
    assert!(!serde_json::to_string(&pod).unwrap().contains(&secret_value));
    let secret = secrets.get(&created.id).await.unwrap();
    let tags: BTreeMap<String, String> =
        serde_json::from_slice(&secret.data.unwrap()["tags"].0).unwrap();
    assert_eq!(tags, spec.tags);

    // Not running yet: listed, without an address.
    let only = |set: &str| BTreeMap::from([(tag::INSTANCE_SET.to_owned(), set.to_owned())]);
    let listed = set.instances(&only("cloud")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].address, None);
    let _server = pod_serves(
        &lab.path().join("pod1"),
        &format!("127.0.0.2:{port}"),
        &spec,
        false,
    )
    .await;
    pod_running(&client, &created.id, "127.0.0.2").await;
    let listed = set.instances(&only("cloud")).await.unwrap();
    assert_eq!(listed[0].address, Some(format!("127.0.0.2:{port}")));
    let ran = executor(&set, &listed[0], &key)
        .execute("echo verified", b"")
        .await
        .unwrap();
    assert_eq!(ran.stdout, b"verified\n");

    // A second pod whose server never ran the init command: refused.
    let second = set.create(&spec).await.unwrap();
    let _impostor = pod_serves(
        &lab.path().join("pod2"),
        &format!("127.0.0.3:{port}"),
        &spec,
        true,
    )
    .await;
    pod_running(&client, &second.id, "127.0.0.3").await;
    let listed = set.instances(&only("cloud")).await.unwrap();
    let impostor = listed.iter().find(|i| i.id == second.id).unwrap();
    let refused = executor(&set, impostor, &key).execute("true", b"").await;
    assert!(
        matches!(refused, Err(ExecError::Impostor { .. })),
        "{refused:?}"
    );

    // Re-tagged in its Secret; another set on the same driver sees none of them.
    let mut retagged = spec.tags.clone();
    retagged.insert(tag::IDLE_BEHAVIOR.into(), "hold".into());
    set.set_tags(&created.id, &retagged).await.unwrap();
    let listed = set.instances(&only("cloud")).await.unwrap();
    let first = listed.iter().find(|i| i.id == created.id).unwrap();
    assert_eq!(first.tags, retagged);
    let other = driver
        .instance_set(&serde_json::json!({"ssh_port": port}), "other")
        .unwrap();
    assert!(other.instances(&only("other")).await.unwrap().is_empty());
    // Asked for everything, it sees what this Switchyard made, of any set.
    assert_eq!(other.instances(&BTreeMap::new()).await.unwrap().len(), 2);

    for id in [&created.id, &second.id] {
        set.destroy(id).await.unwrap();
        assert!(pods.get_opt(id).await.unwrap().is_none());
        assert!(secrets.get_opt(id).await.unwrap().is_none());
    }
    assert!(set.instances(&BTreeMap::new()).await.unwrap().is_empty());
    // Destroying what is gone succeeds.
    set.destroy(&created.id).await.unwrap();
}

#[actix_rt::test]
async fn a_cloud_pool_on_the_kubernetes_driver_runs_a_session_on_the_pod_it_made() {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    let emulator = crate::kubernetes::Emulator::start();
    let client = emulator.client();
    let lab = Lab::new();
    let port = crate::kubernetes::free_port();
    let url = emulator.url().to_owned();
    let test = harness::start_app(|config| {
        config.kubernetes.api = Some(url);
        config.cloud.sync_interval = Duration::from_millis(200);
        config.cloud.timeout_idle = Duration::from_secs(1);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "kubernetes".into(),
            driver_config: serde_json::json!({ "ssh_port": port }),
            image: "switchyard/sshd:test".into(),
            max_instances: 1,
            ..CloudPoolConfig::default()
        }];
        config.sessions.stop_grace = Duration::from_millis(300);
    })
    .await;
    let id = crate::sessions::schedule(
        &test,
        serde_json::json!({"components": [
            on_cloud("driver", "driver", "echo on the pod in \"$SWITCHYARD_HOME\"")]}),
    )
    .await;

    // The kubelet's part: the pod the pool made runs its command and serves.
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), "default");
    let name = harness::wait_for("the instance's pod", Duration::from_secs(30), || async {
        let listed = pods
            .list(&kube::api::ListParams::default().labels("switchyard.dev/instance-set=cloud"))
            .await
            .ok()?;
        listed.items.into_iter().next()?.metadata.name
    })
    .await;
    let data = secrets.get(&name).await.unwrap().data.unwrap();
    let text = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    let spec = InstanceSpec {
        instance_type: text("instance_type"),
        image: String::new(),
        tags: BTreeMap::new(),
        init_command: text("init"),
        public_key: text("public_key"),
    };
    let home = lab.path().join("pod");
    let _served = pod_serves(&home, &format!("127.0.0.2:{port}"), &spec, false).await;
    pod_running(&client, &name, "127.0.0.2").await;

    let view = crate::sessions::ended(&test, &id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    let log = crate::sessions::driver_log(&test, &id).await;
    assert!(
        log.contains(&format!("on the pod in {}", home.display())),
        "{log}"
    );
    // Idle for a second: the pod and its Secret are deleted.
    harness::wait_for(
        "the idle instance's objects to be deleted",
        Duration::from_secs(30),
        || async {
            let pod = pods.get_opt(&name).await.ok()?;
            let secret = secrets.get_opt(&name).await.ok()?;
            (pod.is_none() && secret.is_none()).then_some(())
        },
    )
    .await;
    let gone = workers(&test).await.remove(&name).unwrap();
    assert_eq!(gone.shutdown_reason, Some(ShutdownReason::Idle), "{gone:?}");
}

#[actix_rt::test]
async fn a_worker_is_ready_once_its_boot_probe_passes_and_reached_over_ssh_before() {
    let test = harness::start_app(|config| {
        config.cloud.sync_interval = Duration::from_millis(100);
        config.cloud.timeout_idle = Duration::from_secs(1);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "stub".into(),
            driver_config: serde_json::json!({"ssh": true}),
            boot_probe_command: "test -f \"$SWITCHYARD_HOME/ready\"".into(),
            max_instances: 1,
            ..CloudPoolConfig::default()
        }];
    })
    .await;
    let id = crate::sessions::schedule(
        &test,
        serde_json::json!({"components": [on_cloud("driver", "driver", "true")]}),
    )
    .await;
    let metric = |line: &'static str| {
        let addr = test.app.http_addr();
        async move {
            let (_, metrics) = harness::http_get(addr, "/metrics").await;
            metrics.contains(line).then_some(())
        }
    };
    // Reached over SSH, but its boot probe fails: not booted, and the session waits.
    harness::wait_for("time to SSH", Duration::from_secs(20), || {
        metric(r#"switchyard_cloud_ssh_seconds_count{set="cloud"} 1"#)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (worker, view) = workers(&test).await.into_iter().next().unwrap();
    assert_eq!(view.booted_at, None, "{view:?}");
    assert_eq!(crate::sessions::get(&test, &id).await["status"], "QUEUED");
    let (_, metrics) = harness::http_get(test.app.http_addr(), "/metrics").await;
    assert!(!metrics.contains(r#"switchyard_cloud_boot_seconds_count{set="cloud"} 1"#));

    // Ready: it boots, the session runs.
    let home = test.config.cloud.dir.join("stub").join(&worker);
    std::fs::write(home.join("ready"), "").unwrap();
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert!(workers(&test).await[&worker].booted_at.is_some());
    harness::wait_for("time to ready", Duration::from_secs(5), || {
        metric(r#"switchyard_cloud_boot_seconds_count{set="cloud"} 1"#)
    })
    .await;
}

#[actix_rt::test]
async fn what_an_unknown_session_left_on_a_worker_is_pruned_there() {
    let test = harness::start_app(|config| {
        config.cloud.sync_interval = Duration::from_millis(100);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "stub".into(),
            driver_config: serde_json::json!({"ssh": true}),
            max_instances: 1,
            ..CloudPoolConfig::default()
        }];
        config.sessions.prune_interval = Duration::from_millis(200);
        config.sessions.prune_grace = Duration::ZERO;
    })
    .await;
    // A worker, kept.
    let id = crate::sessions::schedule(
        &test,
        serde_json::json!({"components": [on_cloud("driver", "driver", "true")]}),
    )
    .await;
    let (worker, _) = the_worker(&test).await;
    harness::call(&test, "worker.hold", serde_json::json!({"id": worker}))
        .await
        .ok();
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    // A session the log never heard of left a component running there.
    let dir = test
        .config
        .cloud
        .dir
        .join("stub")
        .join(&worker)
        .join("sessions/stray-1/driver");
    std::fs::create_dir_all(&dir).unwrap();
    let mut stray = std::process::Command::new("setsid")
        .args(["sh", "-c", "echo $$ > pid; exec sleep 300"])
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let group: i32 = harness::wait_for("its pid", Duration::from_secs(5), || async {
        std::fs::read_to_string(dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    harness::wait_for(
        "the stray to be pruned",
        Duration::from_secs(20),
        || async {
            let dead =
                std::fs::read_to_string(format!("/proc/{group}/stat")).map_or(true, |stat| {
                    stat.rsplit(')')
                        .next()
                        .is_some_and(|s| s.trim_start().starts_with('Z'))
                });
            (!dir.exists() && dead).then_some(())
        },
    )
    .await;
    stray.wait().unwrap();
    harness::call(&test, "worker.kill", serde_json::json!({"id": worker}))
        .await
        .ok();
}
