//! The tunnel end to end, with real peers: OpenSSH's `sshd` plays the test machine's sshd, the
//! `switchyard pod-agent` and `machine-agent` run as processes, and OpenSSH's `ssh` client
//! connects through the meeting point, or plays a machine asking for a remote forward.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::crash::{Switchyard, wait_serving};
use crate::harness::{TestApp, call, connect, start_app, start_nats, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

/// A free TCP port on loopback, never the same twice in this test process (the kernel may
/// hand a port out again once its listener is closed).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until nothing listens on `port` any more.
async fn wait_closed(port: u16) {
    wait_for(&format!("port {port} to close"), LIMIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program} runs: {err} (scripts/setup installs OpenSSH)"))
}

/// An ed25519 key pair made by `ssh-keygen`: (private key path, public key line).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            name,
            "-f",
            path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_owned())
}

fn current_user() -> String {
    let out = run("id", &["-un"]);
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// OpenSSH's sshd on a free loopback port, with its own host key and one authorized client
/// key; killed on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    client_key: PathBuf,
    host_public_key: String,
    user: String,
}

impl Sshd {
    async fn start() -> Self {
        let binary = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("OpenSSH's sshd (Debian openssh-server; scripts/setup installs it)");
        // OpenSSH's privilege separation directory, missing where the service never ran.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir().unwrap();
        let (host_key, host_public_key) = keygen(dir.path(), "host_key");
        let (client_key, client_public) = keygen(dir.path(), "client_key");
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{client_public}\n")).unwrap();
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                host_key.display(),
                authorized.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
        let child = Command::new(binary)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sshd starts");
        let sshd = Sshd {
            child,
            port,
            dir,
            client_key,
            host_public_key,
            user: current_user(),
        };
        wait_for("sshd to listen", LIMIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await;
        sshd
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `ssh` to this machine's sshd through `port` on loopback, checking that the host key
    /// answering is this sshd's: stdout, or the failure.
    async fn ssh_through(&self, port: u16, command: &str) -> Result<String, String> {
        let known_hosts = self.dir.path().join(format!("known_hosts_{port}"));
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{port} {}\n", self.host_public_key),
        )
        .unwrap();
        let out = ssh()
            .args(["-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(&self.client_key)
            .args([
                "-p",
                &port.to_string(),
                "-l",
                &self.user,
                "127.0.0.1",
                command,
            ])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The OpenSSH client, ignoring any user configuration and agent.
fn ssh() -> tokio::process::Command {
    let mut command = tokio::process::Command::new("ssh");
    command
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "IdentityAgent=none",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ])
        .kill_on_drop(true);
    command
}

/// A `switchyard` agent process; killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn spawn(nats_url: &str, log: PathBuf, args: &[&str]) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .args(["--server", nats_url, "--timeout", "2s"])
            .env("SWITCHYARD_LOG__FILTER", "info,russh=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the agent starts");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, signal).unwrap();
    }

    async fn exited(&mut self, what: &str) -> ExitStatus {
        let log = self.log.clone();
        wait_for(what, LIMIT, || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await;
        let status = self.child.wait().unwrap();
        eprintln!("{}:\n{}", log.display(), self.log());
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod-agent whose meeting points all get `port`.
fn pod_agent(nats_url: &str, dir: &Path, name: &str, port: u16, extra: &[&str]) -> Agent {
    let ports = format!("{port}-{port}");
    let mut args = vec![
        "pod-agent",
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "--forward-bind",
        "127.0.0.1",
        "--ports",
        &ports,
        "--keepalive",
        "300ms",
        "--drain-poll",
        "100ms",
        "--recheck",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Agent::spawn(nats_url, dir.join(format!("{name}.log")), &args)
}

fn machine_agent(nats_url: &str, dir: &Path, machine: &str, sshd: &Sshd) -> Agent {
    machine_agent_with(nats_url, dir, machine, sshd, "300ms")
}

fn machine_agent_with(
    nats_url: &str,
    dir: &Path,
    machine: &str,
    sshd: &Sshd,
    keepalive: &str,
) -> Agent {
    let target = sshd.target();
    Agent::spawn(
        nats_url,
        dir.join(format!("{machine}.log")),
        &[
            "machine-agent",
            "--machine",
            machine,
            "--user",
            &sshd.user,
            "--target",
            &target,
            "--keepalive",
            keepalive,
            "--retry-delay",
            "100ms",
        ],
    )
}

async fn pod(test: &TestApp, pod: &str) -> Option<Value> {
    match call(test, "pod.get", json!({"pod": pod})).await {
        crate::harness::Reply::Ok(reply) => Some(reply["result"].clone()),
        crate::harness::Reply::Err { .. } => None,
    }
}

async fn wait_valid(test: &TestApp, name: &str) -> Value {
    wait_for(&format!("pod {name} to be valid"), LIMIT, || async {
        let valid = call(test, "pod.is_valid", json!({"pod": name})).await.ok()["result"]["valid"]
            .as_bool()
            .unwrap();
        if valid { pod(test, name).await } else { None }
    })
    .await
}

async fn meeting_point(test: &TestApp, machine: &str) -> Option<Value> {
    match call(test, "meeting_point.get", json!({"machine": machine})).await {
        crate::harness::Reply::Ok(reply) => Some(reply["result"].clone()),
        crate::harness::Reply::Err { .. } => None,
    }
}

/// Waits until a client gets through `port` to the machine's sshd.
async fn wait_reachable(sshd: &Sshd, port: u16) -> String {
    wait_for(
        &format!("the machine to answer on port {port}"),
        LIMIT,
        || async {
            sshd.ssh_through(port, "echo hello-from-the-machine")
                .await
                .ok()
        },
    )
    .await
}

#[actix_rt::test]
async fn a_client_reaches_the_machines_sshd_through_the_meeting_point() {
    let test = start_app(|_| {}).await;
    let url = test.server.url();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();

    let mut pod_agent = pod_agent(&url, dir.path(), "switch-pod-0", port, &[]);
    let registered = wait_valid(&test, "switch-pod-0").await;
    assert!(
        registered["host_key_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
    );
    let machine = "skia-rpi-001.example.com";
    // A long keep-alive, so only the agent's own clearing can remove the meeting point here.
    let mut machine_agent = machine_agent_with(&url, dir.path(), machine, &sshd, "60s");

    let output = wait_reachable(&sshd, port).await;
    assert_eq!(output.trim(), "hello-from-the-machine");
    let mp = meeting_point(&test, machine).await.unwrap();
    assert_eq!(mp["pod"], "switch-pod-0");
    assert_eq!(mp["port"], port);
    assert_eq!(mp["username"].as_str().unwrap(), sshd.user);
    assert!(
        mp["public_key"]
            .as_str()
            .unwrap()
            .starts_with("ssh-ed25519 ")
    );

    // Two clients at once, each its own channel through the one SSH connection.
    let (a, b) = tokio::join!(
        sshd.ssh_through(port, "echo first"),
        sshd.ssh_through(port, "echo second")
    );
    assert_eq!((a.unwrap().trim(), b.unwrap().trim()), ("first", "second"));

    // The machine-agent clears its meeting point when stopped.
    machine_agent.signal(Signal::SIGTERM);
    assert!(
        machine_agent
            .exited("the machine-agent to stop")
            .await
            .success()
    );
    assert_eq!(meeting_point(&test, machine).await, None);
    wait_closed(port).await;

    // SIGINT: the pod is removed and the agent exits at once.
    pod_agent.signal(Signal::SIGINT);
    assert!(pod_agent.exited("the pod-agent to stop").await.success());
    assert_eq!(pod(&test, "switch-pod-0").await, None);
}

/// Runs `ssh -N -R <remote>:<sshd>` to the pod as `machine` with `key`, until it exits or
/// `limit` passes: `Some((status, stderr))` if it exited.
async fn openssh_machine(
    pod_ssh: &str,
    machine: &str,
    key: &Path,
    remote: u16,
    target: &str,
    limit: Duration,
) -> Result<(ExitStatus, String), tokio::process::Child> {
    let (host, port) = pod_ssh.rsplit_once(':').unwrap();
    let mut child = ssh()
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-i"])
        .arg(key)
        .arg("-R")
        .arg(format!("{remote}:{target}"))
        .args(["-p", port, "-l", machine, host])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => {
            let mut stderr = String::new();
            use tokio::io::AsyncReadExt;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            Ok((status.unwrap(), stderr))
        }
        Err(_) => Err(child),
    }
}

#[actix_rt::test]
async fn openssh_as_a_machine_may_forward_its_own_port_and_no_other() {
    let test = start_app(|_| {}).await;
    let url = test.server.url();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _pod_agent = pod_agent(&url, dir.path(), "switch-pod-0", port, &[]);
    let pod = wait_valid(&test, "switch-pod-0").await;
    let pod_ssh = pod["ssh_address"].as_str().unwrap().to_owned();

    let machine = "skia-rpi-002.example.com";
    let (key, public) = keygen(dir.path(), "machine_key");
    let reserved = call(
        &test,
        "meeting_point.reserve",
        json!({"machine": machine, "username": sshd.user, "public_key": public}),
    )
    .await
    .ok();
    assert_eq!(reserved["result"]["port"], port);
    let target = sshd.target();

    // Another port than its meeting point's: refused, and OpenSSH says so.
    let other = free_port();
    let (status, stderr) = openssh_machine(&pod_ssh, machine, &key, other, &target, LIMIT)
        .await
        .expect("ssh gives up on a refused forward");
    assert!(!status.success());
    assert!(stderr.contains("remote port forwarding failed"), "{stderr}");

    // A key the meeting point does not name: the login itself is refused.
    let (stranger, _) = keygen(dir.path(), "stranger_key");
    let (status, stderr) = openssh_machine(&pod_ssh, machine, &stranger, port, &target, LIMIT)
        .await
        .expect("ssh gives up when its key is refused");
    assert!(!status.success());
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // The right key and port, but on a pod that is not its meeting point's: refused.
    let _other_pod = pod_agent(&url, dir.path(), "switch-pod-1", free_port(), &[]);
    let other_pod = wait_valid(&test, "switch-pod-1").await;
    let (status, stderr) = openssh_machine(
        other_pod["ssh_address"].as_str().unwrap(),
        machine,
        &key,
        port,
        &target,
        LIMIT,
    )
    .await
    .expect("ssh gives up when the pod is not its meeting point's");
    assert!(!status.success());
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // Its own port: accepted, and clients reach the machine through it.
    let forwarding = openssh_machine(
        &pod_ssh,
        machine,
        &key,
        port,
        &target,
        Duration::from_millis(500),
    )
    .await;
    let Err(_forwarding) = forwarding else {
        panic!("ssh -R of its own port exited: {forwarding:?}");
    };
    let output = wait_reachable(&sshd, port).await;
    assert_eq!(output.trim(), "hello-from-the-machine");

    // Clearing the meeting point closes the forward (the pod rechecks every --recheck).
    call(&test, "meeting_point.clear", json!({"machine": machine}))
        .await
        .ok();
    wait_closed(port).await;
}

#[actix_rt::test]
async fn a_machine_moves_off_a_draining_pod_and_the_pod_exits_once_empty() {
    let test = start_app(|_| {}).await;
    let url = test.server.url();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());

    let mut pod_a = pod_agent(&url, dir.path(), "switch-pod-a", port_a, &[]);
    wait_valid(&test, "switch-pod-a").await;
    let machine = "skia-rpi-003.example.com";
    let _machine_agent = machine_agent(&url, dir.path(), machine, &sshd);
    wait_reachable(&sshd, port_a).await;

    let _pod_b = pod_agent(&url, dir.path(), "switch-pod-b", port_b, &[]);
    wait_valid(&test, "switch-pod-b").await;

    // A client is connected (the machine's sshd greets it through the tunnel): while it is,
    // the machine stays on pod a even though pod a drains.
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port_a))
        .await
        .unwrap();
    let mut greeting = [0u8; 8];
    tokio::io::AsyncReadExt::read_exact(&mut client, &mut greeting)
        .await
        .unwrap();
    assert_eq!(&greeting, b"SSH-2.0-");
    pod_a.signal(Signal::SIGTERM);
    wait_for("pod a to drain", LIMIT, || async {
        (pod(&test, "switch-pod-a").await?["status"] == "draining").then_some(())
    })
    .await;
    // Two of the machine's keep-alives after the drain began: it saw pod a invalid, and
    // stayed for its client.
    let mut seen = vec![meeting_point(&test, machine).await.unwrap()["last_seen"].clone()];
    while seen.len() < 3 {
        let mp = wait_for("a keep-alive on the draining pod", LIMIT, || async {
            let mp = meeting_point(&test, machine).await?;
            (!seen.contains(&mp["last_seen"])).then_some(mp)
        })
        .await;
        assert_eq!(mp["pod"], "switch-pod-a", "moved with a client connected");
        seen.push(mp["last_seen"].clone());
    }

    // The client leaves: the machine, idle, moves to b, and pod a exits once empty.
    drop(client);
    let output = wait_reachable(&sshd, port_b).await;
    assert_eq!(output.trim(), "hello-from-the-machine");
    assert_eq!(
        meeting_point(&test, machine).await.unwrap()["pod"],
        "switch-pod-b"
    );
    assert!(pod_a.exited("pod a to finish draining").await.success());
    assert_eq!(pod(&test, "switch-pod-a").await, None, "pod a is gone");
}

#[actix_rt::test]
async fn a_machine_agent_refuses_a_pod_whose_host_key_is_not_the_published_one() {
    let test = start_app(|_| {}).await;
    let url = test.server.url();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    // An impostor: the address of an SSH server whose host key is not the published one.
    call(
        &test,
        "pod.add",
        json!({
            "pod": "impostor",
            "ssh_address": sshd.target(),
            "host_key_fingerprint": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"
        }),
    )
    .await
    .ok();
    let agent = machine_agent(&url, dir.path(), "skia-rpi-004.example.com", &sshd);
    wait_for("the machine-agent to refuse the pod", LIMIT, || async {
        agent
            .log()
            .contains("does not match its published fingerprint")
            .then_some(())
    })
    .await;
    assert!(
        !agent.log().contains("reachable: clients connect"),
        "{}",
        agent.log()
    );
}

#[actix_rt::test]
async fn a_pod_agent_gives_up_after_three_failed_keep_alives() {
    let server = start_nats();
    let client = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let mut control_plane = Switchyard::spawn_with(&server.url(), &dir.path().join("sy.log"), &[]);
    wait_serving(&client).await;
    let mut agent = pod_agent(&server.url(), dir.path(), "switch-pod-0", free_port(), &[]);
    wait_for("the pod to register", LIMIT, || {
        let log = agent.log();
        async move { log.contains("pod registered").then_some(()) }
    })
    .await;

    control_plane.kill_9();
    let status = agent.exited("the pod-agent to give up").await;
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(agent.log().contains("3 keep-alives"), "{}", agent.log());
}

#[actix_rt::test]
async fn a_reservation_with_a_malformed_key_is_invalid_and_changes_nothing() {
    let test = start_app(|_| {}).await;
    call(&test, "pod.add", json!({"pod": "switch-pod-0"}))
        .await
        .ok();
    for bad in [
        "ssh-ed25519",
        "ssh-ed25519 AAAAnotbase64!",
        "hello world",
        "ssh-rsa AAAAB3NzaC1yc2E",
    ] {
        let reply = call(
            &test,
            "meeting_point.reserve",
            json!({"machine": "m1", "username": "root", "public_key": bad}),
        )
        .await;
        assert_eq!(reply.code(), "invalid", "{bad}");
    }
    assert_eq!(meeting_point(&test, "m1").await, None);
    let count = call(
        &test,
        "pod.count_meeting_points",
        json!({"pod": "switch-pod-0"}),
    )
    .await
    .ok();
    assert_eq!(count["result"]["meeting_points"], 0);
}

#[actix_rt::test]
async fn a_machine_comes_back_after_its_pod_agent_is_killed_and_restarted() {
    let test = start_app(|_| {}).await;
    let url = test.server.url();
    let sshd = Sshd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let host_key = dir.path().join("pod_host_key");
    let host_key_arg = ["--host-key", host_key.to_str().unwrap()];

    let mut first = pod_agent(&url, dir.path(), "switch-pod-0", port, &host_key_arg);
    wait_valid(&test, "switch-pod-0").await;
    let machine = "skia-rpi-005.example.com";
    let _machine_agent = machine_agent(&url, dir.path(), machine, &sshd);
    wait_reachable(&sshd, port).await;

    // kill -9: no removal, the registration stays; the machine loses its connection.
    first.signal(Signal::SIGKILL);
    first.exited("the first pod-agent to die").await;
    wait_closed(port).await;
    // The restarted pod takes its registration over (a new SSH port, the same host key), and
    // the machine-agent starts over and is reachable through it again.
    let dir2 = tempfile::tempdir().unwrap();
    let _second = pod_agent(&url, dir2.path(), "switch-pod-0", port, &host_key_arg);
    let output = wait_reachable(&sshd, port).await;
    assert_eq!(output.trim(), "hello-from-the-machine");
    assert_eq!(
        pod(&test, "switch-pod-0").await.unwrap()["status"],
        "active"
    );
}

/// How many `meeting_point.get` requests the control plane has answered.
fn meeting_point_lookups(test: &TestApp) -> u64 {
    test.app
        .metrics()
        .render()
        .lines()
        .filter(|line| {
            line.starts_with("switchyard_requests_total{kind=\"meeting_point\",verb=\"get\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A stranger offering key after key, connection after connection: the pod once asked the
/// control plane for the meeting point once per offered key. Now a connection costs at most
/// one lookup per machine id it tries, taken from a budget per peer address (and one for the
/// whole pod).
#[actix_rt::test]
async fn strangers_offering_keys_cost_the_control_plane_a_bounded_number_of_lookups() {
    let test = start_app(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let _pod_agent = pod_agent(
        &test.server.url(),
        dir.path(),
        "switch-pod-0",
        free_port(),
        &[],
    );
    let pod = wait_valid(&test, "switch-pod-0").await;
    let pod_ssh = pod["ssh_address"].as_str().unwrap().to_owned();
    let (host, port) = pod_ssh.rsplit_once(':').unwrap();
    let keys: Vec<PathBuf> = (0..6)
        .map(|i| keygen(dir.path(), &format!("stranger_{i}")).0)
        .collect();
    let attempt = |user: String, keys: Vec<PathBuf>| {
        let (host, port) = (host.to_owned(), port.to_owned());
        async move {
            let mut command = ssh();
            command.args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ]);
            for key in &keys {
                command.arg("-i").arg(key);
            }
            let output = command
                .args(["-p", &port, "-l", &user, &host, "true"])
                .output()
                .await
                .unwrap();
            assert!(!output.status.success(), "{user} got in");
        }
    };

    let before = meeting_point_lookups(&test);
    attempt("intruder".to_owned(), keys.clone()).await;
    assert_eq!(
        meeting_point_lookups(&test) - before,
        1,
        "six offered keys, one lookup"
    );

    // Many strangers at once from one address, each under another name: the peer's budget
    // (a burst of 10, then 2 a second, less the one above) bounds the lookups.
    let before = meeting_point_lookups(&test);
    let started = std::time::Instant::now();
    futures::future::join_all(
        (0..60).map(|i| attempt(format!("intruder-{i}"), vec![keys[i % keys.len()].clone()])),
    )
    .await;
    let allowed = 10.0 + 2.0 * started.elapsed().as_secs_f64();
    let made = meeting_point_lookups(&test) - before;
    assert!(
        (made as f64) <= allowed + 1.0,
        "{made} lookups for 60 strangers in {:?}",
        started.elapsed()
    );
}
