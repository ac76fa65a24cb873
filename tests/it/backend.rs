//! The process backend on its own: real processes, real process groups. Every step is
//! idempotent by its key, what it started is found again by another instance (a restart), and
//! removing an owner leaves nothing running.

use std::collections::BTreeMap;
use std::time::Duration;

use switchyard::backend::process::{ProcessBackend, ProcessSpec, ProcessState};
use switchyard::backend::{BackendError, StepKey};

use crate::harness::wait_for;

fn backend(dir: &std::path::Path) -> ProcessBackend {
    ProcessBackend::new(dir, "test", Duration::from_millis(500))
}

fn key(backend: &ProcessBackend, owner: &str, name: &str) -> StepKey {
    StepKey {
        owner: backend.owner("session", owner),
        name: name.to_owned(),
    }
}

fn shell(script: &str) -> ProcessSpec {
    ProcessSpec {
        command: "sh".to_owned(),
        args: vec!["-c".to_owned(), script.to_owned()],
        env: BTreeMap::new(),
        ports: Vec::new(),
    }
}

async fn state_of(backend: &ProcessBackend, key: &StepKey) -> Option<ProcessState> {
    backend
        .observe(&key.owner)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == key.name)
        .map(|p| p.state)
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); /proc says whether it is one.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_process_runs_with_its_port_and_leaves_its_output_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(dir.path());
    let key = key(&backend, "s/1 with spaces", "driver");
    let mut spec = shell("echo \"port=$PORT greeting=$GREETING\"; exit 3");
    spec.env.insert("GREETING".into(), "hello".into());
    let started = backend.start(&key, &spec).await.unwrap();
    let address = started.address.clone().unwrap();
    let port = address.rsplit_once(':').unwrap().1;
    wait_for("the process to exit", Duration::from_secs(5), || async {
        (state_of(&backend, &key).await == Some(ProcessState::Exited(3))).then_some(())
    })
    .await;
    let (output, length) = backend.output(&key, 0, 1 << 20).await.unwrap().unwrap();
    let output = String::from_utf8(output).unwrap();
    assert_eq!(output, format!("port={port} greeting=hello\n"));
    assert_eq!(length, output.len() as u64);
    let (tail, _) = backend.output(&key, 5, 1 << 20).await.unwrap().unwrap();
    assert_eq!(tail, output.as_bytes()[5..]);
}

#[tokio::test]
async fn a_step_started_twice_starts_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let backend = backend(&dir.path().join("processes"));
    let key = key(&backend, "s", "server");
    let spec = shell(&format!("echo started >> {}; sleep 30", marks.display()));
    let first = backend.start(&key, &spec).await.unwrap();
    let second = backend.start(&key, &spec).await.unwrap();
    assert_eq!(
        first.address, second.address,
        "the same process, answered again"
    );
    assert_eq!(second.state, ProcessState::Running);
    // A restarted Switchyard (another backend on the same directory) does not start it again.
    let restarted = ProcessBackend::new(
        dir.path().join("processes"),
        "test",
        Duration::from_millis(500),
    );
    let third = restarted.start(&key, &spec).await.unwrap();
    assert_eq!(third.address, first.address);
    wait_for("the mark", Duration::from_secs(5), || async {
        std::fs::read_to_string(&marks)
            .ok()
            .filter(|m| !m.is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "started\n",
        "started once"
    );
    restarted.remove(&key.owner).await.unwrap();
    assert_eq!(state_of(&backend, &key).await, None, "removed");
}

#[tokio::test]
async fn removing_an_owner_stops_every_process_it_started_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let backend = backend(&dir.path().join("processes"));
    let key_a = key(&backend, "s", "a");
    let key_b = key(&backend, "s", "b");
    // Children in the background, one of them ignoring SIGTERM: the grace ends with SIGKILL.
    let script = format!(
        "sleep 300 & echo $! >> {p}; (trap '' TERM; echo $$ >/dev/null; sleep 300) & echo $! >> {p}; echo $$ >> {p}; wait",
        p = pids.display()
    );
    backend.start(&key_a, &shell(&script)).await.unwrap();
    backend.start(&key_b, &shell(&script)).await.unwrap();
    let pids: Vec<i32> = wait_for("six pids", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&pids).unwrap_or_default();
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (pids.len() == 6).then_some(pids)
    })
    .await;
    assert!(pids.iter().all(|p| alive(*p)));
    // Another instance on the same directory: these are not its children.
    let restarted = ProcessBackend::new(
        dir.path().join("processes"),
        "test",
        Duration::from_millis(300),
    );
    assert_eq!(
        state_of(&restarted, &key_a).await,
        Some(ProcessState::Running),
        "found again after a restart"
    );
    restarted.remove(&key_a.owner).await.unwrap();
    wait_for(
        "every process to be gone",
        Duration::from_secs(5),
        || async { pids.iter().all(|p| !alive(*p)).then_some(()) },
    )
    .await;
    assert!(restarted.observe(&key_a.owner).await.unwrap().is_empty());
    assert!(restarted.owners("session").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_process_killed_from_outside_is_observed_as_vanished() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(dir.path());
    let key = key(&backend, "s", "server");
    let started = backend.start(&key, &shell("sleep 300")).await.unwrap();
    let group = started.group.unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(group),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("it to be seen gone", Duration::from_secs(5), || async {
        matches!(
            state_of(&backend, &key).await,
            Some(ProcessState::Vanished(_))
        )
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_program_that_does_not_exist_is_refused_and_other_instances_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(dir.path());
    let key = key(&backend, "s", "driver");
    let missing = ProcessSpec {
        command: "no-such-program-here".into(),
        args: vec![],
        env: BTreeMap::new(),
        ports: Vec::new(),
    };
    match backend.start(&key, &missing).await {
        Err(BackendError::Refused { what, reason }) => {
            assert_eq!(what, "cannot start \"no-such-program-here\"");
            assert_eq!(reason, "no such program on PATH");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        backend.observe(&key.owner).await.unwrap().is_empty(),
        "a refused start records nothing"
    );
    let other = ProcessBackend::new(dir.path(), "another-instance", Duration::from_millis(500));
    let theirs = StepKey {
        owner: other.owner("session", "s"),
        name: "x".into(),
    };
    other.start(&theirs, &shell("sleep 300")).await.unwrap();
    let ours: Vec<String> = backend
        .owners("session")
        .await
        .unwrap()
        .into_iter()
        .map(|(owner, _)| owner.id)
        .collect();
    assert_eq!(ours, ["s"], "only this instance's owners");
    backend.remove(&key.owner).await.unwrap();
    assert_eq!(
        state_of(&other, &theirs).await,
        Some(ProcessState::Running),
        "another instance's process is untouched"
    );
    other.remove(&theirs.owner).await.unwrap();
}
