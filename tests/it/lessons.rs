//! Live lessons end to end against a real nats-server, real OpenSSH `sshd` endpoints and real
//! scripts run over SSH: the sample curriculum to READY and through a stage change, failures
//! with their output, the reachability timeout, garbage collection, limits and bad input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{TestApp, call, start_app, wait_for};

/// The sample curriculum `switchyard dev` loads.
pub fn sample_curriculum() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dev/curriculum")
}

/// Lessons from the sample curriculum, fast timers, processes under the test's own directory.
pub fn with_lessons(config: &mut switchyard::config::Config, curriculum: &Path) {
    config.lessons.curriculum = Some(curriculum.to_owned());
    config.lessons.poll_interval = Duration::from_millis(50);
    config.lessons.stop_grace = Duration::from_millis(500);
}

/// A curriculum of one lesson `slug` from its `lesson.yaml` and `(path, text)` files.
pub fn curriculum(dir: &Path, slug: &str, yaml: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join("curriculum");
    let lesson = root.join(slug);
    std::fs::create_dir_all(&lesson).unwrap();
    std::fs::write(lesson.join("lesson.yaml"), yaml).unwrap();
    for (path, text) in files {
        let path = lesson.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

pub async fn create_session(test: &TestApp, id: &str, persistent: bool) {
    call(
        test,
        "livesession.create",
        json!({"id": id, "persistent": persistent}),
    )
    .await
    .ok();
}

/// Requests `lesson` at `stage` for `session`; the live lesson's id.
pub async fn request(test: &TestApp, session: &str, lesson: &str, stage: u32) -> String {
    let reply = call(
        test,
        "lesson.request",
        json!({"session": session, "lesson": lesson, "stage": stage}),
    )
    .await
    .ok();
    reply["result"]["id"].as_str().unwrap().to_owned()
}

pub async fn live(test: &TestApp, id: &str) -> Value {
    call(test, "livelesson.get", json!({"id": id})).await.ok()["result"].clone()
}

/// Waits until the lesson is in `status` (at `stage`); fails at once on ERROR.
pub async fn wait_status(test: &TestApp, id: &str, status: &str, stage: u32) -> Value {
    wait_for(
        &format!("lesson {id} to be {status} at stage {stage}"),
        Duration::from_secs(60),
        || async {
            let view = live(test, id).await;
            if view["status"] == "ERROR" && status != "ERROR" {
                panic!("lesson {id} failed: {view:#}");
            }
            (view["status"] == status && view["stage"] == stage).then_some(view)
        },
    )
    .await
}

pub async fn wait_deleted(test: &TestApp, id: &str) -> Value {
    wait_for(
        &format!("lesson {id} to be deleted"),
        Duration::from_secs(30),
        || async {
            let view = live(test, id).await;
            view["deleted_at"].is_string().then_some(view)
        },
    )
    .await
}

/// Runs `command` on an endpoint through the ssh command the lesson gives for it.
pub fn ssh(view: &Value, endpoint: &str, command: &str) -> String {
    let endpoints = view["endpoints"].as_array().unwrap();
    let ssh = endpoints
        .iter()
        .find(|e| e["name"] == endpoint)
        .and_then(|e| e["ssh"].as_str())
        .unwrap_or_else(|| panic!("no ssh command for {endpoint}: {view:#}"));
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{ssh} -o BatchMode=yes -o LogLevel=ERROR '{command}'"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{ssh} {command}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The loopback ports an endpoint's presentations were given.
pub fn ports(view: &Value) -> Vec<u16> {
    view["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["addresses"].as_object().unwrap().values())
        .map(|a| {
            a.as_str()
                .unwrap()
                .rsplit_once(':')
                .unwrap()
                .1
                .parse()
                .unwrap()
        })
        .collect()
}

/// Processes whose working directory is under `dir` (each endpoint process runs in its own).
pub fn processes_under(dir: &Path) -> Vec<i32> {
    crate::session_crash::leftovers(dir)
}

#[actix_rt::test]
async fn the_sample_lesson_reaches_ready_changes_stage_and_is_killed_cleanly() {
    let test = start_app(|c| with_lessons(c, &sample_curriculum())).await;
    let lessons = call(&test, "lesson.list", json!({})).await.ok();
    assert_eq!(lessons["result"][0]["slug"], "ssh-basics", "{lessons:#}");
    create_session(&test, "learner", false).await;
    let id = request(&test, "learner", "ssh-basics", 1).await;
    assert_eq!(id, "learner-ssh-basics-1");
    let view = wait_status(&test, &id, "READY", 1).await;
    assert_eq!(
        (view["healthy"].as_u64(), view["total"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(
        view["guide"].as_str().unwrap().contains("Stage 1"),
        "{view:#}"
    );
    let statuses: Vec<&str> = view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["INITIALIZED", "BOOTING", "CONFIGURATION", "READY"]
    );
    // Each endpoint shows what its stage 1 script did, in its own home.
    assert_eq!(ssh(&view, "alpha", "cat motd.txt"), "alpha: stage 1\n");
    assert_eq!(ssh(&view, "beta", "cat motd.txt"), "beta: stage 1\n");
    let output = view["endpoints"][1]["configured"]["output"]
        .as_str()
        .unwrap();
    assert!(output.contains("configured beta for stage 1"), "{view:#}");

    // The same stage again is a keep-alive; stage 2 reconfigures (and only that).
    let touched = request(&test, "learner", "ssh-basics", 1).await;
    assert_eq!(touched, id);
    request(&test, "learner", "ssh-basics", 2).await;
    let view = wait_status(&test, &id, "READY", 2).await;
    assert_eq!(
        ssh(&view, "alpha", "cat motd.txt history.txt"),
        "alpha: stage 2\nstage 1\nstage 2\n"
    );
    assert_eq!(ssh(&view, "beta", "cat motd.txt"), "beta: stage 2\n");

    let ports = ports(&view);
    assert_eq!(ports.len(), 2);
    let dir = test.config.lessons.dir.clone();
    assert!(!processes_under(&dir).is_empty());
    call(&test, "livelesson.kill", json!({"id": id})).await.ok();
    wait_deleted(&test, &id).await;
    assert!(
        processes_under(&dir).is_empty(),
        "processes left after kill"
    );
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still answers after kill"
        );
    }
    // The session let go of it: the next request gets a new live lesson.
    let session = call(&test, "livesession.get", json!({"id": "learner"}))
        .await
        .ok();
    assert_eq!(session["result"]["lessons"], json!({}), "{session:#}");
    let again = request(&test, "learner", "ssh-basics", 1).await;
    assert_eq!(again, "learner-ssh-basics-2");
    call(&test, "livesession.kill", json!({"id": "learner"}))
        .await
        .ok();
    wait_deleted(&test, &again).await;
    assert!(
        processes_under(&dir).is_empty(),
        "processes left after the session's kill"
    );
}

const ONE_ENDPOINT: &str = r#"
name: One endpoint
endpoints:
  - name: solo
    image: utility
    configuration: shell
    presentations: [{ name: cli, type: ssh, port: 22 }]
stages: [{ description: only }]
"#;

#[actix_rt::test]
async fn a_failing_script_ends_in_error_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let root = curriculum(
        dir.path(),
        "broken",
        ONE_ENDPOINT,
        &[
            ("stage1/guide.md", "# Only\n"),
            (
                "stage1/configs/solo.sh",
                "echo about to fail\necho 'no such router' >&2\nexit 3\n",
            ),
        ],
    );
    let test = start_app(|c| with_lessons(c, &root)).await;
    create_session(&test, "s", false).await;
    let id = request(&test, "s", "broken", 1).await;
    let view = wait_status(&test, &id, "ERROR", 1).await;
    let error = &view["error"];
    assert_eq!(error["step"], "configure", "{view:#}");
    assert!(
        error["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 3"),
        "{view:#}"
    );
    let output = error["output"].as_str().unwrap();
    assert!(
        output.contains("about to fail") && output.contains("no such router"),
        "{view:#}"
    );
    // The event says it too.
    let reply = call(
        &test,
        "lesson.request",
        json!({"session": "s", "lesson": "broken"}),
    )
    .await;
    assert_eq!(reply.code_and_reason(), "conflict/failed");
}

#[actix_rt::test]
async fn an_endpoint_that_never_answers_fails_after_the_reachability_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
name: Silent
endpoints:
  - name: mute
    command: [sleep, "300"]
    additional_ports: [8080]
stages: [{}]
"#;
    let root = curriculum(dir.path(), "silent", yaml, &[("stage1/guide.md", "quiet")]);
    let test = start_app(|c| {
        with_lessons(c, &root);
        c.lessons.reachability_timeout = Duration::from_secs(1);
        c.lessons.check_timeout = Duration::from_millis(200);
    })
    .await;
    create_session(&test, "s", false).await;
    let id = request(&test, "s", "silent", 1).await;
    let view = wait_status(&test, &id, "ERROR", 1).await;
    assert_eq!(view["error"]["step"], "reachability", "{view:#}");
    assert!(
        view["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 1 endpoints did not answer"),
        "{view:#}"
    );
    assert_eq!(
        (view["healthy"].as_u64(), view["total"].as_u64()),
        (Some(0), Some(1)),
        "{view:#}"
    );
    call(&test, "livelesson.kill", json!({"id": id})).await.ok();
    wait_deleted(&test, &id).await;
    assert!(processes_under(&test.config.lessons.dir).is_empty());
}

#[actix_rt::test]
async fn garbage_collection_deletes_inactive_lessons_but_not_a_persistent_sessions() {
    let test = start_app(|c| {
        with_lessons(c, &sample_curriculum());
        c.lessons.lesson_ttl = Duration::from_secs(2);
        c.lessons.session_ttl = Duration::from_secs(3);
        c.lessons.gc_interval = Duration::from_millis(300);
    })
    .await;
    create_session(&test, "brief", false).await;
    create_session(&test, "kept", true).await;
    let brief = request(&test, "brief", "ssh-basics", 1).await;
    let kept = request(&test, "kept", "ssh-basics", 1).await;
    // (The brief one may be deleted before it is READY: its TTL counts from the request.)
    wait_status(&test, &kept, "READY", 1).await;
    let deleted = wait_deleted(&test, &brief).await;
    assert_eq!(deleted["kill"]["reason"], "expired", "{deleted:#}");
    // The session lets go of it, then ends past its own TTL.
    wait_for(
        "the brief session to end",
        Duration::from_secs(20),
        || async {
            let s = call(&test, "livesession.get", json!({"id": "brief"}))
                .await
                .ok();
            (s["result"]["ended"]["reason"] == "expired").then_some(())
        },
    )
    .await;
    let view = live(&test, &kept).await;
    assert_eq!(
        view["status"], "READY",
        "a persistent session's lesson stays: {view:#}"
    );
    assert!(view["kill"].is_null(), "{view:#}");
    let session = call(&test, "livesession.get", json!({"id": "kept"}))
        .await
        .ok();
    assert!(
        session["result"]["ended"].is_null(),
        "it still holds a lesson: {session:#}"
    );
    call(&test, "livesession.kill", json!({"id": "kept"}))
        .await
        .ok();
    wait_deleted(&test, &kept).await;
}

#[actix_rt::test]
async fn bad_requests_get_typed_errors_and_change_nothing() {
    // The sample lesson twice, as `ssh-basics` and `other`.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("curriculum");
    std::fs::create_dir_all(&root).unwrap();
    for name in ["ssh-basics", "other"] {
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(sample_curriculum().join("ssh-basics"))
            .arg(root.join(name))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let test = start_app(|c| {
        with_lessons(c, &root);
        c.lessons.lesson_limit = 1;
        c.lessons.session_limit = 1;
    })
    .await;
    let code = |reply: crate::harness::Reply| reply.code_and_reason();
    let unknown = call(
        &test,
        "lesson.request",
        json!({"session": "nobody", "lesson": "ssh-basics"}),
    )
    .await;
    assert!(
        unknown.message().starts_with("Invalid session ID"),
        "{}",
        unknown.message()
    );
    assert_eq!(unknown.code(), "not_found");
    call(
        &test,
        "livesession.create",
        json!({"id": "one", "source": "10.0.0.1"}),
    )
    .await
    .ok();
    assert_eq!(
        code(
            call(
                &test,
                "livesession.create",
                json!({"id": "two", "source": "10.0.0.1"})
            )
            .await
        ),
        "capacity/session_limit"
    );
    assert_eq!(
        code(
            call(
                &test,
                "livesession.create",
                json!({"id": "one", "source": "10.0.0.2"})
            )
            .await
        ),
        "already_exists"
    );
    assert_eq!(
        code(call(&test, "livesession.create", json!({"id": "Not A Label"})).await),
        "invalid"
    );
    assert_eq!(
        code(
            call(
                &test,
                "lesson.request",
                json!({"session": "one", "lesson": "nope"})
            )
            .await
        ),
        "not_found"
    );
    assert_eq!(
        code(
            call(
                &test,
                "lesson.request",
                json!({"session": "one", "lesson": "ssh-basics", "stage": 9})
            )
            .await
        ),
        "invalid"
    );
    assert_eq!(
        code(
            call(
                &test,
                "lesson.request",
                json!({"session": "one", "lesson": "ssh-basics", "extra": 1})
            )
            .await
        ),
        "invalid"
    );
    assert_eq!(
        code(call(&test, "livelesson.kill", json!({"id": "one-ssh-basics-1"})).await),
        "not_found"
    );
    // Nothing of the refusals was written: the session holds no lesson.
    let session = call(&test, "livesession.get", json!({"id": "one"}))
        .await
        .ok();
    assert_eq!(session["result"]["lessons"], json!({}), "{session:#}");
    let first = request(&test, "one", "ssh-basics", 1).await;
    wait_status(&test, &first, "READY", 1).await;
    // A stage change while it configures is busy; a stage past the end is invalid.
    request(&test, "one", "ssh-basics", 2).await;
    let busy = call(
        &test,
        "lesson.request",
        json!({"session": "one", "lesson": "ssh-basics", "stage": 1}),
    )
    .await;
    if let crate::harness::Reply::Err { .. } = busy {
        assert_eq!(busy.code_and_reason(), "conflict/busy");
    }
    // The per-session limit (1): another lesson does not fit.
    assert_eq!(
        code(
            call(
                &test,
                "lesson.request",
                json!({"session": "one", "lesson": "other"})
            )
            .await
        ),
        "capacity/lesson_limit"
    );
    call(&test, "livesession.kill", json!({"id": "one"}))
        .await
        .ok();
    wait_deleted(&test, &first).await;
}

#[actix_rt::test]
async fn an_invalid_curriculum_lists_every_problem_and_loads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
name: Broken
endpoints:
  - name: a
    image: x
    configuration: shell
    presentations: [{ name: cli, type: ssh, port: 0 }]
  - name: a
    image: x
connections: [{ a: a, b: ghost }]
stages: [{}, {}]
"#;
    let root = curriculum(dir.path(), "broken", yaml, &[("stage1/guide.md", "g")]);
    // Offline, with the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["lesson", "validate"])
        .arg(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    for expected in [
        "broken/lesson.yaml: endpoints[0].presentations[0].port: 0 is not a port",
        "broken/lesson.yaml: endpoints[1].name: endpoint \"a\" is defined twice",
        "broken/lesson.yaml: endpoints[1]: an endpoint needs presentations or additional ports",
        "broken/lesson.yaml: connections[0].b: \"ghost\" is not an endpoint of this lesson",
        "stage 2 has no guide",
        "stage 1 has no script: broken/stage1/configs/a.sh is missing",
        "nothing would be loaded",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    // At start: the control plane refuses to start on it, saying why.
    let server = crate::harness::start_nats();
    let mut config = crate::harness::test_config(&server);
    with_lessons(&mut config, &root);
    let error =
        match switchyard::app::App::start(&config, switchyard::runtime::system_clock()).await {
            Ok(_) => panic!("started on an invalid curriculum"),
            Err(err) => format!("{err:#}"),
        };
    assert!(
        error.contains("is defined twice") && error.contains("\"ghost\""),
        "{error}"
    );
}

/// Orphan pruning removes what the backend has of a lesson the log never had, and leaves a
/// live lesson's processes as they are.
#[actix_rt::test]
async fn orphans_are_pruned_and_live_lessons_are_left_alone() {
    let test = start_app(|c| {
        with_lessons(c, &sample_curriculum());
        c.lessons.prune_interval = Duration::from_millis(200);
        c.lessons.prune_grace = Duration::ZERO;
    })
    .await;
    create_session(&test, "live", false).await;
    let id = request(&test, "live", "ssh-basics", 1).await;
    let view = wait_status(&test, &id, "READY", 1).await;
    // Something of this instance's backend that no lesson owns: left by a wiped log.
    let processes = switchyard::backend::process::ProcessBackend::new(
        test.config.lessons.dir.join("processes"),
        "switchyard",
        Duration::from_millis(200),
    );
    let key = switchyard::backend::StepKey {
        owner: processes.owner("livelesson", "ghost-lesson-1"),
        name: "solo.cli".into(),
    };
    let spec = switchyard::backend::process::ProcessSpec {
        command: "sleep".into(),
        args: vec!["300".into()],
        env: Default::default(),
        ports: Vec::new(),
    };
    processes.start(&key, &spec).await.unwrap();
    let ghost_dir = processes.resource_dir(&key);
    wait_for(
        "the orphan to be pruned",
        Duration::from_secs(20),
        || async { (!ghost_dir.exists()).then_some(()) },
    )
    .await;
    // The live lesson still answers, on the same ports.
    assert_eq!(ssh(&view, "alpha", "cat motd.txt"), "alpha: stage 1\n");
    assert_eq!(live(&test, &id).await["status"], "READY");
    call(&test, "livelesson.kill", json!({"id": id})).await.ok();
    wait_deleted(&test, &id).await;
    assert!(processes_under(&test.config.lessons.dir).is_empty());
}

/// An http presentation is a real HTTP server (the endpoint's home, or its command), and a
/// command gets every port it serves as `PORT_<port>` (its first as `PORT`).
#[actix_rt::test]
async fn http_endpoints_serve_and_commands_get_their_ports() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
name: Web
endpoints:
  - name: site
    image: nginx
    presentations: [{ name: web, type: http, port: 80 }]
  - name: app
    command: [python3, -c, "import http.server, os\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200); self.end_headers(); self.wfile.write((os.environ['PORT'] + ' ' + os.environ['PORT_9000']).encode())\nfor p in ['PORT_8080', 'PORT_9000']:\n    if os.fork() == 0:\n        http.server.HTTPServer(('127.0.0.1', int(os.environ[p])), H).serve_forever()\nos.wait()"]
    presentations: [{ name: api, type: http, port: 8080 }]
    additional_ports: [9000]
stages: [{}]
"#;
    let root = curriculum(dir.path(), "web", yaml, &[("stage1/guide.md", "g")]);
    let test = start_app(|c| with_lessons(c, &root)).await;
    create_session(&test, "s", false).await;
    let id = request(&test, "s", "web", 1).await;
    let view = wait_status(&test, &id, "READY", 1).await;
    let address = |endpoint: &str, port: &str| {
        view["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == endpoint)
            .unwrap()["addresses"][port]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let get = |address: String| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys, urllib.request; r = urllib.request.urlopen('http://' + sys.argv[1] + '/'); print(r.status, r.read().decode())"])
            .arg(address)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(
        get(address("site", "80")).starts_with("200 "),
        "the home directory is served"
    );
    let api = address("app", "8080");
    let extra = address("app", "9000");
    let port = |a: &str| a.rsplit_once(':').unwrap().1.to_owned();
    assert_eq!(
        get(api.clone()).trim(),
        format!("200 {} {}", port(&api), port(&extra))
    );
    assert_eq!(
        get(extra.clone()).trim(),
        format!("200 {} {}", port(&api), port(&extra))
    );
    call(&test, "livelesson.kill", json!({"id": id})).await.ok();
    wait_deleted(&test, &id).await;
    assert!(processes_under(&test.config.lessons.dir).is_empty());
}

/// The CLI a newcomer uses: create a session, request the sample lesson and wait (it prints
/// the statuses and how to reach each endpoint), read its status, kill it.
#[actix_rt::test]
async fn the_cli_requests_a_lesson_waits_for_ready_and_kills_it() {
    let test = start_app(|c| with_lessons(c, &sample_curriculum())).await;
    let (code, out) = crate::sessions::cli(&test, &["livesession", "create", "--id", "cli"]).await;
    assert_eq!((code, out.trim()), (0, "cli"));
    let (code, out) = crate::sessions::cli(
        &test,
        &[
            "lesson",
            "request",
            "ssh-basics",
            "--session",
            "cli",
            "--wait",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    for expected in [
        "BOOTING",
        "READY (stage 1, 2/2 endpoints answer)",
        "alpha cli: ssh -i ",
        "beta cli: ssh -i ",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    let (code, out) = crate::sessions::cli(&test, &["lesson", "live", "--session", "cli"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("cli-ssh-basics-1") && out.contains("READY"),
        "{out}"
    );
    let (code, out) = crate::sessions::cli(&test, &["lesson", "kill", "cli-ssh-basics-1"]).await;
    assert_eq!(code, 0, "{out}");
    wait_deleted(&test, "cli-ssh-basics-1").await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "lesson",
            "request",
            "nope",
            "--session",
            "cli",
            "--server",
            &test.server.url(),
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not in the catalog"), "{stderr}");
}

/// A lesson attached to its session but never requested (the caller gave up between the two
/// commands) is let go of by garbage collection once it is clearly abandoned, so the session
/// can expire and its limit counts only real lessons.
#[actix_rt::test]
async fn garbage_collection_lets_go_of_an_abandoned_attachment() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    let offset = Arc::new(AtomicI64::new(0));
    let shifted = offset.clone();
    let system = switchyard::runtime::system_clock();
    let clock: switchyard::runtime::Clock = Arc::new(move || {
        switchyard::domain::Timestamp::from_unix_nanos(
            system().unix_nanos() + shifted.load(Ordering::Relaxed),
        )
    });
    let test = crate::harness::start_app_with_clock(
        |c| {
            with_lessons(c, &sample_curriculum());
            c.lessons.gc_interval = Duration::from_millis(200);
        },
        clock,
    )
    .await;
    create_session(&test, "gave-up", false).await;
    let lessons = test
        .app
        .services()
        .get::<switchyard::lessons::Lessons>()
        .unwrap();
    let attach = switchyard::domain::lessons::LiveSessionCommand::Attach {
        lesson: "ssh-basics".parse().unwrap(),
        limit: 0,
    };
    lessons
        .sessions
        .execute(
            "gave-up".parse().unwrap(),
            attach,
            switchyard::runtime::CommandMeta::fresh(switchyard::domain::Principal::system()),
        )
        .await
        .unwrap();
    let held = || async {
        call(&test, "livesession.get", json!({"id": "gave-up"}))
            .await
            .ok()["result"]["lessons"]
            .as_object()
            .unwrap()
            .len()
    };
    assert_eq!(held().await, 1);
    // Minutes later, still held: it could be on its way... until it is clearly abandoned.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(held().await, 1, "a fresh attachment is kept");
    offset.store(11 * 60 * 1_000_000_000, Ordering::Relaxed);
    wait_for(
        "the abandoned attachment to go",
        Duration::from_secs(10),
        || async { (held().await == 0).then_some(()) },
    )
    .await;
}

/// A READY lesson has no scheduler job; an endpoint that dies under it is found by the next
/// garbage collection round, and the lesson fails saying which endpoint and why.
#[actix_rt::test]
async fn a_ready_lesson_whose_endpoint_dies_ends_in_error() {
    let test = start_app(|c| {
        with_lessons(c, &sample_curriculum());
        c.lessons.gc_interval = Duration::from_millis(300);
    })
    .await;
    create_session(&test, "fragile", false).await;
    let id = request(&test, "fragile", "ssh-basics", 1).await;
    wait_status(&test, &id, "READY", 1).await;
    // Kill alpha's sshd and its supervisor, as an OOM killer or an operator might.
    let steps = test
        .config
        .lessons
        .dir
        .join("processes/switchyard/livelesson")
        .join(&id);
    let alpha = std::fs::read_dir(&steps)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("alpha"))
        .unwrap()
        .path();
    let group: i32 = std::fs::read_to_string(alpha.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(group),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let view = wait_status(&test, &id, "ERROR", 1).await;
    assert_eq!(view["error"]["step"], "endpoint", "{view:#}");
    assert!(
        view["error"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("endpoint alpha:"),
        "{view:#}"
    );
    call(&test, "livelesson.kill", json!({"id": id})).await.ok();
    wait_deleted(&test, &id).await;
    assert!(processes_under(&test.config.lessons.dir).is_empty());
}
