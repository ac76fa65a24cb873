//! Callers authenticated by NATS, against a real nats-server with accounts: Switchyard's account
//! exports its API, callers' accounts import it with `share: true`, and the principal on every
//! event is the user NATS authenticated. Roles, `forbidden`, gateways, fire-and-forget through
//! an account's import, and what other accounts can never do (write the log, read results).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::config::{AuthMode, PrincipalRule, Role};
use switchyard::nats_server::{NatsServer, Options};

use crate::harness::{Reply, nats_binary, request, wait_for};

/// Switchyard's account and four callers' accounts, as `deploy/nats/accounts.conf` lays them out.
const ACCOUNTS: &str = r#"
accounts {
  SWITCHYARD: {
    jetstream: enabled
    users: [{user: switchyard, password: sy}]
    exports: [
      {service: "sy.api.>"}
      {service: "sy.cmd.>"}
    ]
  }
  APP: {
    users: [
      {user: alice, password: a}
      {user: bob, password: b}
      {user: portal, password: p}
    ]
    default_permissions: {publish: {deny: ["sy.evt.>", "$JS.>"]}}
    imports: [
      {service: {account: SWITCHYARD, subject: "sy.api.>"}, share: true}
      {service: {account: SWITCHYARD, subject: "sy.cmd.APP.>"}, to: "sy.cmd.>"}
    ]
  }
  OUTSIDERS: {
    users: [{user: mallory, password: m}]
    imports: [{service: {account: SWITCHYARD, subject: "sy.api.>"}, share: true}]
  }
  PODS: {
    users: [{user: switch-pod-0, password: p0}]
    imports: [{service: {account: SWITCHYARD, subject: "sy.api.>"}, share: true}]
  }
  MACHINES: {
    users: [{user: m1, password: m1}]
    imports: [{service: {account: SWITCHYARD, subject: "sy.api.>"}, share: true}]
  }
}
"#;

fn rule(account: &str, user: Option<&str>, roles: &[Role]) -> PrincipalRule {
    PrincipalRule {
        account: Some(account.to_owned()),
        user: user.map(str::to_owned),
        principal: None,
        roles: roles.to_vec(),
        gateway: false,
    }
}

struct Secured {
    server: NatsServer,
    app: switchyard::app::App,
}

impl Secured {
    async fn start() -> Self {
        let mut options = Options::new(nats_binary());
        options.extra_config = Some(ACCOUNTS.to_owned());
        let server = NatsServer::start(options).expect("nats-server starts");
        let mut config = crate::harness::test_config(&server);
        config.nats.user = Some("switchyard".to_owned());
        config.nats.password = Some("sy".to_owned());
        config.auth.mode = AuthMode::Nats;
        let mut portal = rule("APP", Some("portal"), &[Role::Operator]);
        portal.gateway = true;
        let mut app_account = rule("APP", None, &[Role::Operator]);
        app_account.principal = Some("app-batch".to_owned());
        config.auth.principals = vec![
            rule("APP", Some("alice"), &[Role::Operator]),
            rule("APP", Some("bob"), &[Role::Auditor]),
            portal,
            app_account,
            rule("PODS", None, &[Role::Pod]),
            rule("MACHINES", None, &[Role::Machine]),
        ];
        let app = switchyard::app::App::start(&config, switchyard::runtime::system_clock())
            .await
            .expect("control plane starts");
        Self { server, app }
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.server.port())
    }

    async fn client(&self, user: &str, password: &str) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .connect(format!("127.0.0.1:{}", self.server.port()))
            .await
            .unwrap()
    }

    async fn last_seq(&self) -> u64 {
        self.app.store().last_sequence().await.unwrap()
    }
}

async fn call(client: &async_nats::Client, route: &str, body: Value) -> Reply {
    request(client, route, body.to_string(), None).await
}

async fn principal_of(secured: &Secured, kind: &str, id: &str, seq: u64) -> String {
    let subject = secured.app.store().subjects().event(kind, id);
    let history = secured
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    history
        .iter()
        .find(|m| m.seq == seq)
        .and_then(|m| m.principal())
        .unwrap()
        .to_owned()
}

#[actix_rt::test]
async fn the_principal_is_the_user_nats_authenticated_and_roles_are_enforced() {
    let secured = Secured::start().await;
    let alice = secured.client("alice", "a").await;
    let bob = secured.client("bob", "b").await;
    let portal = secured.client("portal", "p").await;
    let mallory = secured.client("mallory", "m").await;

    // A forged principal (and a forged request info) from a user who is no gateway is ignored.
    let mut forged = async_nats::HeaderMap::new();
    forged.insert("Switchyard-Principal", "root");
    forged.insert("Nats-Request-Info", r#"{"acc":"SWITCHYARD","user":"root"}"#);
    let created = request(
        &alice,
        "counter.create",
        json!({"id": "c1"}).to_string(),
        Some(forged),
    )
    .await
    .ok();
    let seq = created["sequence"].as_u64().unwrap();
    assert_eq!(principal_of(&secured, "counter", "c1", seq).await, "alice");
    // A gateway names whom it acts for.
    let mut on_behalf = async_nats::HeaderMap::new();
    on_behalf.insert("Switchyard-Principal", "student-7");
    let added = request(
        &portal,
        "counter.add",
        json!({"id": "c1", "amount": 1}).to_string(),
        Some(on_behalf),
    )
    .await
    .ok();
    let seq = added["sequence"].as_u64().unwrap();
    assert_eq!(
        principal_of(&secured, "counter", "c1", seq).await,
        "student-7"
    );

    // An auditor reads, and is forbidden every command route; a stranger is forbidden all.
    let before = secured.last_seq().await;
    assert!(matches!(
        call(&bob, "counter.get", json!({"id": "c1"})).await,
        Reply::Ok(_)
    ));
    for spec in switchyard::api::routes() {
        let route = format!("{}.{}", spec.kind, spec.verb);
        let reply = call(&bob, &route, json!({})).await;
        let refused = matches!(&reply, Reply::Err { code, .. } if code == "forbidden");
        match spec.mode {
            switchyard::api::Mode::Command => assert!(refused, "auditor on {route}: {reply:?}"),
            switchyard::api::Mode::Query => assert!(!refused, "auditor on {route}: {reply:?}"),
        }
        let stranger = call(&mallory, &route, json!({})).await;
        assert!(
            matches!(&stranger, Reply::Err { code, status, .. } if code == "forbidden" && status == "403"),
            "stranger on {route}: {stranger:?}"
        );
    }
    assert_eq!(secured.last_seq().await, before, "refusals write nothing");
    let metrics = secured.app.metrics().render();
    assert!(
        metrics
            .contains(r#"switchyard_requests_total{kind="counter",verb="add",code="forbidden"} 2"#),
        "{metrics}"
    );
}

#[actix_rt::test]
async fn pods_and_machines_reach_only_their_own() {
    let secured = Secured::start().await;
    let alice = secured.client("alice", "a").await;
    let pod = secured.client("switch-pod-0", "p0").await;
    let machine = secured.client("m1", "m1").await;
    let forbidden = |reply: Reply| matches!(reply, Reply::Err { code, .. } if code == "forbidden");

    call(&pod, "pod.add", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    assert!(forbidden(
        call(&pod, "pod.add", json!({"pod": "other"})).await
    ));
    call(&alice, "pod.add", json!({"pod": "other"})).await.ok();
    assert!(forbidden(
        call(&pod, "pod.remove", json!({"pod": "other"})).await
    ));
    assert!(forbidden(
        call(&pod, "pod.keep_alive", json!({"pod": "other"})).await
    ));
    call(&pod, "pod.keep_alive", json!({"pod": "switch-pod-0"}))
        .await
        .ok();

    let reserved = call(
        &machine,
        "meeting_point.reserve",
        json!({"machine": "m1", "username": "root"}),
    )
    .await
    .ok();
    assert!(forbidden(
        call(
            &machine,
            "meeting_point.reserve",
            json!({"machine": "m2", "username": "root"})
        )
        .await
    ));
    assert!(forbidden(
        call(&machine, "meeting_point.clear", json!({"machine": "m2"})).await
    ));
    assert!(forbidden(
        call(&machine, "pod.add", json!({"pod": "m1"})).await
    ));
    call(&machine, "pod.get", json!({"pod": "other"}))
        .await
        .ok();
    call(
        &machine,
        "meeting_point.keep_alive",
        json!({"machine": "m1"}),
    )
    .await
    .ok();
    // Both pods were empty: ties go by name, so m1 is on "other".
    assert_eq!(reserved["result"]["pod"], "other");
    let seq = reserved["sequence"].as_u64().unwrap();
    assert_eq!(
        principal_of(&secured, "meeting_point", "m1", seq).await,
        "m1"
    );

    // A pod reads the meeting points on it, and no other.
    let elsewhere = call(
        &alice,
        "meeting_point.reserve",
        json!({"machine": "m9", "username": "root"}),
    )
    .await
    .ok();
    assert_eq!(elsewhere["result"]["pod"], "switch-pod-0");
    let got = call(&pod, "meeting_point.get", json!({"machine": "m9"}))
        .await
        .ok();
    assert_eq!(got["result"]["machine"], "m9");
    assert!(forbidden(
        call(&pod, "meeting_point.get", json!({"machine": "m1"})).await
    ));
    call(&pod, "meeting_point.list", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    assert!(forbidden(call(&pod, "meeting_point.list", json!({})).await));
}

#[actix_rt::test]
async fn other_accounts_never_write_the_log_or_read_results_and_queue_as_their_account() {
    let secured = Secured::start().await;
    let alice = secured.client("alice", "a").await;
    call(&alice, "counter.create", json!({"id": "q"}))
        .await
        .ok();
    let before = secured.last_seq().await;

    // Publishing into the event stream's subjects from a client account stores nothing: the
    // account's permissions refuse it, and the subjects are not Switchyard's there anyway.
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let rejected = async_nats::ConnectOptions::with_user_and_password("bob".into(), "b".into())
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    let _ = errors_tx.send(err.to_string());
                }
            }
        })
        .connect(format!("127.0.0.1:{}", secured.server.port()))
        .await
        .unwrap();
    rejected
        .publish("sy.evt.counter.q", "garbage".into())
        .await
        .unwrap();
    rejected.flush().await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the server refuses the publish")
        .unwrap();
    assert!(error.contains("ermissions"), "{error}");

    // Fire-and-forget through the account's import: stored, applied, and recorded as the
    // account's principal. Its result stays in Switchyard's account.
    let mut results = alice.subscribe("sy.result.>").await.unwrap();
    alice.flush().await.unwrap();
    let js = async_nats::jetstream::new(alice.clone());
    #[allow(clippy::disallowed_methods)] // a publisher's publish, not the control plane's
    let ack = js
        .publish(
            "sy.cmd.counter.add",
            json!({"id": "q", "amount": 2, "command_id": "ff-app-1"})
                .to_string()
                .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, "SWITCHYARD_COMMANDS");
    let applied = wait_for("the queued command", Duration::from_secs(20), || async {
        let got = call(&alice, "counter.get", json!({"id": "q"})).await.ok();
        (got["result"]["value"] == 2).then_some(got)
    })
    .await;
    let seq = applied["version"].as_u64().unwrap();
    let subject = secured.app.store().subjects().event("counter", "q");
    let history = secured
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    assert_eq!(history.len() as u64, seq);
    assert_eq!(history[1].principal(), Some("app-batch"));
    assert_eq!(history[1].command_id(), Some("ff-app-1"));
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut results)
        )
        .await
        .is_err(),
        "another account reads no command result"
    );
    // Nothing but the two commands reached the log.
    assert_eq!(secured.last_seq().await, before + 1);
}

/// nats-py connects with its own credentials, claims to be someone else, and `switchyard audit`
/// shows the user NATS authenticated.
#[actix_rt::test]
async fn an_external_client_is_recorded_as_the_user_it_authenticated_as() {
    let secured = Secured::start().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = tokio::process::Command::new(root.join(".tools/venv/bin/python"))
        .arg(root.join("tests/clients/nats_py_identity.py"))
        .arg(secured.url("alice", "a"))
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reply["body"]["result"]["counter"]["id"], "py/authenticated");
    let audit = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "audit",
            "--entity",
            "counter/py/authenticated",
            "--format",
            "json",
        ])
        .args(["--server", &secured.url("switchyard", "sy")])
        .output()
        .await
        .expect("switchyard audit runs");
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let record: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(record["principal"], "alice", "{stdout}");
}

/// The shipped secure layout, as is: `deploy/nats/accounts.conf` on the server and the `[auth]`
/// table of `deploy/switchyard.toml` in the control plane. An operator, a pod, a machine and the
/// read-only auditor each do what their role allows; the auditor can write nothing.
#[actix_rt::test]
async fn the_shipped_layout_authenticates_every_kind_of_caller() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut accounts = std::fs::read_to_string(root.join("deploy/nats/accounts.conf")).unwrap();
    for (variable, value) in [
        ("$SWITCHYARD_PASSWORD", "sy"),
        ("$AUDITOR_PASSWORD", "au"),
        ("$OPERATOR_PASSWORD", "op"),
        ("$PORTAL_PASSWORD", "po"),
        ("$POD_PASSWORD", "pd"),
        ("$MACHINE_PASSWORD", "ma"),
    ] {
        accounts = accounts.replace(variable, value);
    }
    let mut options = Options::new(nats_binary());
    options.extra_config = Some(accounts);
    let server = NatsServer::start(options).expect("nats-server takes the shipped accounts");
    let mut config =
        switchyard::config::Config::load(Some(&root.join("deploy/switchyard.toml"))).unwrap();
    let test = crate::harness::test_config(&server);
    config.nats.servers = test.nats.servers;
    config.nats.password = Some("sy".to_owned());
    config.nats.retry_on_initial_connect = false;
    config.store.replicas = 1;
    config.http = test.http;
    let app = switchyard::app::App::start(&config, switchyard::runtime::system_clock())
        .await
        .expect("control plane starts with the shipped configuration");
    let secured = Secured { server, app };
    let operator = secured.client("operator", "op").await;
    let pod = secured.client("switch-pod-0", "pd").await;
    let machine = secured.client("skia-rpi-001.example.com", "ma").await;

    call(&pod, "pod.add", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    let reserved = call(
        &machine,
        "meeting_point.reserve",
        json!({"machine": "skia-rpi-001.example.com", "username": "root"}),
    )
    .await
    .ok();
    assert_eq!(reserved["result"]["pod"], "switch-pod-0");
    assert_eq!(
        call(&machine, "pod.remove", json!({"pod": "switch-pod-0"}))
            .await
            .code(),
        "forbidden"
    );
    call(&operator, "counter.create", json!({"id": "ops"}))
        .await
        .ok();

    // The auditor reads the log with `switchyard audit`, and may not write to it.
    let audit = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["audit", "--format", "json"])
        .args(["--server", &secured.url("auditor", "au")])
        .output()
        .await
        .expect("switchyard audit runs");
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let principals: Vec<String> = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["principal"].to_string())
        .collect();
    assert_eq!(
        principals,
        [
            "\"switch-pod-0\"",
            "\"skia-rpi-001.example.com\"",
            "\"skia-rpi-001.example.com\"",
            "\"operator\""
        ],
        "{stdout}"
    );
    let auditor = secured.client("auditor", "au").await;
    let before = secured.last_seq().await;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(auditor);
    #[allow(clippy::disallowed_methods)] // an intruder's publish
    let written = js.publish("sy.evt.counter.ops", "garbage".into()).await;
    let refused = match written {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(refused, "the auditor cannot write the log");
    assert_eq!(secured.last_seq().await, before);
}
