//! The Kubernetes backends against a Kubernetes API emulator that speaks the real protocol
//! (kmock, pinned in `scripts/setup`, under `tests/kubernetes/emulator.py`): the objects the API
//! received are asserted, and a test plays the kubelet. It marks pods running and points their
//! addresses at real local `sshd` processes started with the keys from the lesson's Secret, so
//! the scheduler's reachability test and configuration over SSH run for real.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::harness::{TestApp, start_app, wait_for};
use crate::lessons::{create_session, request, sample_curriculum, wait_status, with_lessons};

/// The emulator, with panics for a test.
pub struct Emulator(switchyard::kubernetes::emulator::Emulator);

impl Emulator {
    pub fn start() -> Self {
        Self(
            switchyard::kubernetes::emulator::Emulator::start()
                .unwrap()
                .expect("the Kubernetes API emulator (kmock): run scripts/setup"),
        )
    }

    pub fn url(&self) -> &str {
        self.0.url()
    }

    pub fn client(&self) -> kube::Client {
        self.0.client().unwrap()
    }

    /// Posts to one of the emulator's own endpoints (`faults`, `watch-gone`, `logs`).
    pub async fn control(&self, what: &str, body: Value) {
        self.0.control(what, &body).await.unwrap();
    }
}

/// Switchyard with the sample curriculum on the Kubernetes backend at `emulator`.
pub async fn with_kubernetes(emulator: &Emulator, curriculum: &Path) -> TestApp {
    let url = emulator.url().to_owned();
    let curriculum = curriculum.to_owned();
    start_app(move |config| {
        with_lessons(config, &curriculum);
        config.lessons.backend = switchyard::config::LessonBackendKind::Kubernetes;
        config.kubernetes.api = Some(url);
        config.kubernetes.ssh_user = current_user();
        config.lessons.prune_interval = Duration::from_millis(300);
        config.lessons.prune_grace = Duration::ZERO;
    })
    .await
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The namespace of live lesson `id`.
pub async fn namespace_of(client: &kube::Client, id: &str) -> Namespace {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_for(
        &format!("the namespace of {id}"),
        Duration::from_secs(30),
        || async {
            let found = namespaces
                .list(&ListParams::default().labels(&format!("switchyard.dev/live-lesson={id}")))
                .await
                .ok()?;
            found.items.into_iter().next()
        },
    )
    .await
}

/// Waits until the namespace `name` is gone.
async fn wait_gone(namespaces: &Api<Namespace>, name: &str) {
    wait_for(
        &format!("{name} to be deleted"),
        Duration::from_secs(30),
        || async {
            namespaces
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

/// What a kubelet would do for a lesson's pods: an sshd per endpoint with the keys the pod
/// mounts, its pod marked Running and its service's address pointed at it. Killed on drop.
pub struct Kubelet {
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Kubelet {
    /// Where a login on `endpoint` lands.
    pub fn home(&self, endpoint: &str) -> PathBuf {
        self.dir.path().join(endpoint)
    }

    pub async fn run(client: &kube::Client, ns: &str, endpoints: &[&str]) -> Self {
        Self::run_with(client, ns, endpoints, false).await
    }

    /// With `impostor`, each sshd presents a host key of its own instead of the Secret's: a
    /// machine in the middle.
    pub async fn run_with(
        client: &kube::Client,
        ns: &str,
        endpoints: &[&str],
        impostor: bool,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret = wait_for("the lesson's secret", Duration::from_secs(30), || async {
            secrets.get_opt("credentials").await.ok().flatten()
        })
        .await;
        let data = secret.data.unwrap();
        let text = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
        if nix::unistd::geteuid().is_root() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let mut children = Vec::new();
        for endpoint in endpoints {
            wait_for(
                &format!("pod {endpoint}"),
                Duration::from_secs(30),
                || async { pods.get_opt(endpoint).await.ok().flatten() },
            )
            .await;
            let home = dir.path().join(endpoint);
            std::fs::create_dir_all(&home).unwrap();
            let host_key = if impostor {
                let path = dir.path().join(format!("{endpoint}.key"));
                let made = Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&path)
                    .status()
                    .unwrap();
                assert!(made.success());
                path
            } else {
                write_private(
                    dir.path(),
                    &format!("{endpoint}.key"),
                    &text(&format!("host-{endpoint}")),
                )
            };
            let keys = dir.path().join(format!("{endpoint}.authorized_keys"));
            std::fs::write(&keys, text("authorized_keys")).unwrap();
            let login = dir.path().join(format!("{endpoint}.login"));
            std::fs::write(
                &login,
                format!(
                    "#!/bin/sh\ncd {home:?} || exit 1\nHOME=\"$PWD\"\nexport HOME\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n"
                ),
            )
            .unwrap();
            Command::new("chmod")
                .arg("755")
                .arg(&login)
                .status()
                .unwrap();
            let port = free_port();
            let config = dir.path().join(format!("{endpoint}.sshd_config"));
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                     PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                     ForceCommand {}\n",
                    host_key.display(),
                    keys.display(),
                    login.display()
                ),
            )
            .unwrap();
            children.push(
                Command::new(switchyard::lessons::backend::sshd_binary().expect("sshd"))
                    .args(["-D", "-e", "-f"])
                    .arg(&config)
                    .current_dir(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            pods.patch_status(
                endpoint,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
            )
            .await
            .unwrap();
            services
                .patch(
                    &format!("{endpoint}-cli"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"clusterIP": "127.0.0.1",
                        "ports": [{"name": "cli", "port": port, "targetPort": 22, "protocol": "TCP"}]}})),
                )
                .await
                .unwrap();
        }
        Self { children, dir }
    }
}

fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Command::new("chmod")
        .arg("600")
        .arg(&path)
        .status()
        .unwrap();
    path
}

fn labels(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Value {
    serde_json::to_value(meta.labels.clone().unwrap_or_default()).unwrap()
}

#[actix_rt::test]
async fn the_sample_lesson_gets_a_namespace_of_its_own_reaches_ready_and_is_deleted_whole() {
    let emulator = Emulator::start();
    let test = with_kubernetes(&emulator, &sample_curriculum()).await;
    let client = emulator.client();
    create_session(&test, "demo", false).await;
    let id = request(&test, "demo", "ssh-basics", 1).await;
    let ns = namespace_of(&client, &id).await;
    let name = ns.metadata.name.clone().unwrap();
    assert_eq!(name, format!("switchyard-{id}"));
    let expected = json!({
        "app.kubernetes.io/managed-by": "switchyard",
        "switchyard.dev/instance": "switchyard",
        "switchyard.dev/live-lesson": id,
        "switchyard.dev/live-session": "demo",
        "switchyard.dev/lesson": "ssh-basics",
    });
    assert_eq!(labels(&ns.metadata), expected);

    let kubelet = Kubelet::run(&client, &name, &["alpha", "beta"]).await;
    let view = wait_status(&test, &id, "READY", 1).await;
    assert_eq!(view["healthy"], 2, "{view:#}");

    // What the API received: every object labelled as the lesson's, in its namespace.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
    let found = pods.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(found.len(), 2);
    for pod in &found {
        let endpoint = pod.metadata.name.clone().unwrap();
        let mut want = expected.clone();
        want["switchyard.dev/endpoint"] = json!(endpoint);
        assert_eq!(labels(&pod.metadata), want);
        let spec = pod.spec.clone().unwrap();
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some("antidotelabs/utility")
        );
        assert_eq!(spec.automount_service_account_token, Some(false));
        let items = spec.volumes.unwrap()[0]
            .secret
            .clone()
            .unwrap()
            .items
            .unwrap();
        let keys: Vec<String> = items.into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            ["authorized_keys".to_owned(), format!("host-{endpoint}")]
        );
        // No key in a plain pod spec.
        assert!(!serde_json::to_string(pod).unwrap().contains("PRIVATE KEY"));
    }
    let services: Api<Service> = Api::namespaced(client.clone(), &name);
    let mut service_names: Vec<String> = services
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    service_names.sort();
    assert_eq!(service_names, ["alpha-cli", "beta-cli"]);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &name);
    let mut policy_names: Vec<String> = policies
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    policy_names.sort();
    assert_eq!(
        policy_names,
        [
            "connections-alpha",
            "connections-beta",
            "dns",
            "from-outside-lessons",
            "isolate"
        ]
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &name);
    let secret = secrets.get("credentials").await.unwrap();
    let mut secret_keys: Vec<String> = secret.data.unwrap().into_keys().collect();
    secret_keys.sort();
    assert_eq!(
        secret_keys,
        [
            "authorized_keys",
            "host-alpha",
            "host-alpha.pub",
            "host-beta",
            "host-beta.pub",
            "id_ed25519"
        ]
    );
    // The scripts ran over SSH on the "pods", checked against the Secret's host keys.
    for endpoint in ["alpha", "beta"] {
        let motd = std::fs::read_to_string(kubelet.home(endpoint).join("motd.txt")).unwrap();
        assert_eq!(motd, format!("{endpoint}: stage 1\n"));
    }

    crate::harness::call(&test, "livelesson.kill", json!({"id": id}))
        .await
        .ok();
    crate::lessons::wait_deleted(&test, &id).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(namespaces.get_opt(&name).await.unwrap().is_none());
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    drop(kubelet);
}

#[actix_rt::test]
async fn an_endpoint_presenting_another_host_key_than_its_secrets_fails_the_lesson() {
    let emulator = Emulator::start();
    let test = with_kubernetes(&emulator, &sample_curriculum()).await;
    let client = emulator.client();
    create_session(&test, "demo", false).await;
    let id = request(&test, "demo", "ssh-basics", 1).await;
    let ns = namespace_of(&client, &id).await.metadata.name.unwrap();
    let kubelet = Kubelet::run_with(&client, &ns, &["alpha", "beta"], true).await;
    let mut view = Value::Null;
    for _ in 0..300 {
        view = crate::lessons::live(&test, &id).await;
        if view["status"] == "ERROR" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert!(view.to_string().contains("Unknown server key"), "{view:#}");
    // No script ran on an impostor.
    assert!(!kubelet.home("alpha").join("motd.txt").exists());
}

#[actix_rt::test]
async fn api_errors_are_typed_forbidden_fails_the_lesson_and_throttling_is_waited_out() {
    let emulator = Emulator::start();
    let test = with_kubernetes(&emulator, &sample_curriculum()).await;
    let client = emulator.client();
    create_session(&test, "demo", false).await;
    // Throttled twice, with the server's hint: the step waits and goes on.
    emulator
        .control(
            "faults",
            json!({"method": "POST", "path": "/namespaces$", "status": 429, "count": 2, "retry_after": 1}),
        )
        .await;
    let id = request(&test, "demo", "ssh-basics", 1).await;
    let ns = namespace_of(&client, &id).await;
    assert!(ns.metadata.name.is_some());

    // RBAC missing a verb: the lesson fails, saying so, and nothing retries it forever.
    emulator
        .control(
            "faults",
            json!({"method": "POST", "path": "/namespaces/[^/]+/pods$", "status": 403, "count": 100}),
        )
        .await;
    create_session(&test, "other", false).await;
    let denied = request(&test, "other", "ssh-basics", 1).await;
    let view = wait_status(&test, &denied, "ERROR", 1).await;
    let error = view.to_string();
    assert!(error.contains("forbidden"), "{view:#}");
}

#[actix_rt::test]
async fn an_endpoint_without_an_image_fails_with_a_clear_error_and_creates_no_pod() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let curriculum = crate::lessons::curriculum(
        dir.path(),
        "imageless",
        "name: x\nendpoints:\n  - name: a\n    command: [sleep, '9']\n    additional_ports: [8080]\nstages: [{}]\n",
        &[("stage1/guide.md", "guide")],
    );
    let test = with_kubernetes(&emulator, &curriculum).await;
    create_session(&test, "demo", false).await;
    let id = request(&test, "demo", "imageless", 1).await;
    let view = wait_status(&test, &id, "ERROR", 1).await;
    assert!(view.to_string().contains("has no image"), "{view:#}");
    let pods: Api<Pod> = Api::all(emulator.client());
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[actix_rt::test]
async fn orphan_pruning_deletes_only_this_instances_namespaces_of_no_live_lesson() {
    let emulator = Emulator::start();
    let client = emulator.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = |name: &str, instance: &str, lesson: &str| {
        serde_json::from_value::<Namespace>(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/managed-by": "switchyard",
                "switchyard.dev/instance": instance,
                "switchyard.dev/live-lesson": lesson},
                "annotations": {"switchyard.dev/live-lesson": lesson}}
        }))
        .unwrap()
    };
    for ns in [
        namespace("switchyard-gone-x-1", "switchyard", "gone-x-1"),
        namespace("elsewhere-gone-x-1", "elsewhere", "gone-x-1"),
    ] {
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }
    let unrelated = serde_json::from_value::<Namespace>(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &unrelated)
        .await
        .unwrap();

    let test = with_kubernetes(&emulator, &sample_curriculum()).await;
    create_session(&test, "demo", false).await;
    let id = request(&test, "demo", "ssh-basics", 1).await;
    let live_ns = namespace_of(&client, &id).await.metadata.name.unwrap();
    wait_gone(&namespaces, "switchyard-gone-x-1").await;
    // Another instance's, an unrelated one and the live lesson's stay.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for kept in ["elsewhere-gone-x-1", "kube-system", live_ns.as_str()] {
        assert!(
            namespaces.get_opt(kept).await.unwrap().is_some(),
            "{kept} was deleted"
        );
    }
}

#[actix_rt::test]
async fn kill_9_mid_provision_then_restart_creates_nothing_twice_and_prunes_only_orphans() {
    use crate::crash::{Switchyard, wait_serving};
    use crate::lesson_crash::{client, ready, request_lesson};

    let emulator = Emulator::start();
    let kube = emulator.client();
    let nats = crate::harness::start_nats();
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = crate::harness::ProcessGuard(vec![dir.path().to_owned()]);
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[runtime]
reaction_interval = "200ms"

[lessons]
backend = "kubernetes"
curriculum = "{}"
dir = "{}"
poll_interval = "50ms"
prune_interval = "300ms"
prune_grace = "0s"

[kubernetes]
api = "{}"
ssh_user = "{}"
"#,
            sample_curriculum().display(),
            dir.path().join("lessons").display(),
            emulator.url(),
            current_user(),
        ),
    )
    .unwrap();
    let log = dir.path().join("switchyard.log");
    let armed = [
        ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
        ("SWITCHYARD_FAILPOINTS", "lesson.after_start"),
    ];
    // Killed the moment its first endpoint's pod and services are created.
    let mut crashing = Switchyard::spawn_with(&nats.url(), &log, &armed);
    let nats_client = client(&nats.url()).await;
    wait_serving(&nats_client).await;
    let id = request_lesson(&nats_client, "crashed", "ssh-basics").await;
    crashing.wait_crashed(&log).await;
    let ns = namespace_of(&kube, &id).await.metadata.name.unwrap();
    let uids = |kube: kube::Client, ns: String| async move {
        let pods: Api<Pod> = Api::namespaced(kube.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
        let mut uids: Vec<String> = pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| format!("{}={}", p.metadata.name.unwrap(), p.metadata.uid.unwrap()))
            .collect();
        uids.push(
            secrets
                .get("credentials")
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap(),
        );
        uids
    };
    let before = uids(kube.clone(), ns.clone()).await;
    assert_eq!(before.len(), 2, "one pod and the secret: {before:?}");

    // An orphan of this instance (no such lesson in the log), and a lesson namespace of
    // another instance: only the first is pruned.
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    for (name, instance) in [
        ("switchyard-gone-x-1", "switchyard"),
        ("other-gone-x-1", "other"),
    ] {
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/managed-by": "switchyard",
                "switchyard.dev/instance": instance,
                "switchyard.dev/live-lesson": "gone-x-1"},
                "annotations": {"switchyard.dev/live-lesson": "gone-x-1"}}
        }))
        .unwrap();
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }

    let plain = [("SWITCHYARD_CONFIG", config.to_str().unwrap())];
    let _restarted = Switchyard::spawn_with(&nats.url(), &log, &plain);
    wait_serving(&nats_client).await;
    let _kubelet = Kubelet::run(&kube, &ns, &["alpha", "beta"]).await;
    ready(&nats_client, &id).await;
    let after = uids(kube.clone(), ns.clone()).await;
    // The pod and the secret made before the crash are the ones in use: none was made again.
    for uid in &before {
        assert!(
            after.contains(uid),
            "{uid} was replaced: {before:?} -> {after:?}"
        );
    }
    assert_eq!(after.len(), 3, "{after:?}");
    wait_gone(&namespaces, "switchyard-gone-x-1").await;
    assert!(
        namespaces
            .get_opt("other-gone-x-1")
            .await
            .unwrap()
            .is_some()
    );
    assert!(namespaces.get_opt(&ns).await.unwrap().is_some());
}

/// On a real cluster, opt-in: `SWITCHYARD_TEST_KUBECONFIG=<kubeconfig>` (run where the
/// cluster's Service addresses are reachable, on a node or inside the cluster). The sample
/// lesson's image must provide `sh` and OpenSSH's `/usr/sbin/sshd`.
#[actix_rt::test]
async fn on_a_real_cluster_the_sample_lesson_reaches_ready_and_is_deleted() {
    let Some(kubeconfig) = std::env::var_os("SWITCHYARD_TEST_KUBECONFIG") else {
        eprintln!(
            "skipped: SWITCHYARD_TEST_KUBECONFIG is not set (set it to a kubeconfig to run the \
             sample lesson on that cluster)"
        );
        return;
    };
    let curriculum = sample_curriculum();
    let test = start_app(move |config| {
        with_lessons(config, &curriculum);
        config.lessons.backend = switchyard::config::LessonBackendKind::Kubernetes;
        config.kubernetes.kubeconfig = Some(PathBuf::from(kubeconfig));
        config.lessons.poll_interval = Duration::from_millis(500);
    })
    .await;
    create_session(&test, "real", false).await;
    let id = request(&test, "real", "ssh-basics", 1).await;
    wait_for(
        &format!("lesson {id} to be READY on the cluster"),
        Duration::from_secs(600),
        || async {
            let view = crate::lessons::live(&test, &id).await;
            assert_ne!(view["status"], "ERROR", "{view:#}");
            (view["status"] == "READY").then_some(())
        },
    )
    .await;
    crate::harness::call(&test, "livelesson.kill", json!({"id": id}))
        .await
        .ok();
    crate::lessons::wait_deleted(&test, &id).await;
}

/// Switchyard with sessions on the Kubernetes backend at `emulator`, pools from its nodes.
async fn with_kubernetes_sessions(emulator: &Emulator) -> TestApp {
    let url = emulator.url().to_owned();
    start_app(move |config| {
        config.sessions.backend = switchyard::config::SessionBackendKind::Kubernetes;
        config.sessions.executor_count = 4;
        config.kubernetes.api = Some(url);
    })
    .await
}

async fn add_node(client: &kube::Client, name: &str, pool: &str) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": pool}}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
}

/// The pools the scheduler has, as `pool: machines`.
async fn pools(test: &TestApp) -> Vec<(String, Vec<String>)> {
    let view = crate::harness::call(test, "pool.list", json!({}))
        .await
        .ok();
    view["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let machines = p["machines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_owned())
                .collect();
            (p["name"].as_str().unwrap().to_owned(), machines)
        })
        .collect()
}

async fn wait_pools(test: &TestApp, want: &[(&str, &[&str])]) {
    let want: Vec<(String, Vec<String>)> = want
        .iter()
        .map(|(p, ms)| (p.to_string(), ms.iter().map(|m| m.to_string()).collect()))
        .collect();
    let mut seen = Vec::new();
    for _ in 0..300 {
        seen = pools(test).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pools are {seen:?}, not {want:?}");
}

/// Plays the kubelet for one pod: its container's state as given.
async fn set_pod(client: &kube::Client, name: &str, ip: &str, state: Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip,
            "containerStatuses": [{"name": "main", "image": "i", "imageID": "", "ready": true,
                "restartCount": 0, "state": state}]}})),
    )
    .await
    .unwrap();
}

async fn pod(client: &kube::Client, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    wait_for(&format!("pod {name}"), Duration::from_secs(30), || async {
        pods.get_opt(name).await.ok().flatten()
    })
    .await
}

async fn session_pods(client: &kube::Client, id: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels(&format!("switchyard.dev/session={id}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect()
}

/// The pod of a session's component.
fn pod_of(session: &str, component: &str) -> String {
    switchyard::sessions::kubernetes::pod_name(
        &switchyard::domain::sessions::SessionId::new(session).unwrap(),
        &switchyard::domain::sessions::ComponentName::new(component).unwrap(),
    )
}

fn k8s_component(name: &str, kind: &str, pool: &str) -> Value {
    json!({"name": name, "kind": kind, "pool": pool, "command": kind, "image": format!("grpc/{kind}")})
}

#[actix_rt::test]
async fn a_session_runs_a_pod_per_component_on_its_pools_nodes_through_a_broken_watch() {
    let emulator = Emulator::start();
    let client = emulator.client();
    add_node(&client, "n1", "workers").await;
    add_node(&client, "n2", "workers").await;
    add_node(&client, "n3", "drivers").await;
    let test = with_kubernetes_sessions(&emulator).await;
    wait_pools(&test, &[("drivers", &["n3"]), ("workers", &["n1", "n2"])]).await;

    let id = crate::sessions::schedule(
        &test,
        json!({"id": "qps", "components": [
            k8s_component("w1", "server", "workers"),
            k8s_component("w2", "client", "workers"),
            k8s_component("driver", "driver", "drivers")]}),
    )
    .await;
    let running = json!({"running": {}});
    for (worker, ip) in [("w1", "10.0.0.1"), ("w2", "10.0.0.2")] {
        let found = pod(&client, &pod_of(&id, worker)).await;
        let spec = found.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["pool"], "workers");
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some(format!(
                "grpc/{}",
                if worker == "w1" { "server" } else { "client" }
            ))
            .as_deref()
        );
        set_pod(&client, &pod_of(&id, worker), ip, running.clone()).await;
    }
    let driver = pod(&client, &pod_of(&id, "driver")).await;
    let env: Vec<(String, String)> = driver.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert!(
        env.contains(&(
            "QPS_WORKERS".to_owned(),
            "10.0.0.1:10000,10.0.0.2:10000".to_owned()
        )),
        "{env:?}"
    );
    set_pod(&client, &pod_of(&id, "driver"), "10.0.0.3", running.clone()).await;
    wait_for("the session to run", Duration::from_secs(30), || async {
        (crate::sessions::get(&test, &id).await["status"] == "RUNNING").then_some(())
    })
    .await;

    // The watch breaks, and the driver ends while it is down: the re-list brings it.
    emulator.control("watch-gone", json!({"count": 3})).await;
    emulator
        .control(
            "logs",
            json!({"namespace": "default", "pod": pod_of(&id, "driver"), "text": "qps: 12345\n"}),
        )
        .await;
    set_pod(
        &client,
        &pod_of(&id, "driver"),
        "10.0.0.3",
        json!({"terminated": {"exitCode": 0}}),
    )
    .await;
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert_eq!(
        crate::sessions::driver_log(&test, &id).await,
        "qps: 12345\n"
    );
    // Cleanup by label: nothing of it is left.
    assert!(session_pods(&client, &id).await.is_empty());
}

#[actix_rt::test]
async fn a_failing_driver_or_an_unpullable_image_ends_in_error_and_is_cleaned_up() {
    let emulator = Emulator::start();
    let client = emulator.client();
    add_node(&client, "n1", "workers").await;
    add_node(&client, "n2", "drivers").await;
    add_node(&client, "n3", "drivers").await;
    let test = with_kubernetes_sessions(&emulator).await;
    wait_pools(&test, &[("drivers", &["n2", "n3"]), ("workers", &["n1"])]).await;

    let failing = crate::sessions::schedule(
        &test,
        json!({"id": "failing", "components": [k8s_component("driver", "driver", "drivers")]}),
    )
    .await;
    pod(&client, &pod_of("failing", "driver")).await;
    set_pod(
        &client,
        &pod_of("failing", "driver"),
        "10.0.0.9",
        json!({"terminated": {"exitCode": 3, "reason": "Error"}}),
    )
    .await;
    let view = crate::sessions::ended(&test, &failing, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert!(view.to_string().contains("exited with code 3"), "{view:#}");
    assert!(session_pods(&client, &failing).await.is_empty());

    let unpullable = crate::sessions::schedule(
        &test,
        json!({"id": "unpullable", "components": [k8s_component("driver", "driver", "drivers")]}),
    )
    .await;
    pod(&client, &pod_of("unpullable", "driver")).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.patch_status(
        &pod_of("unpullable", "driver"),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Pending",
            "containerStatuses": [{"name": "main", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": "no such image grpc/driver"}}}]}})),
    )
    .await
    .unwrap();
    let view = crate::sessions::ended(&test, &unpullable, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "ERROR", "{view:#}");
    assert!(view.to_string().contains("ImagePullBackOff"), "{view:#}");
    assert!(session_pods(&client, &unpullable).await.is_empty());
}

#[actix_rt::test]
async fn pools_follow_node_labels_as_nodes_come_and_go() {
    let emulator = Emulator::start();
    let client = emulator.client();
    add_node(&client, "n1", "workers").await;
    let test = with_kubernetes_sessions(&emulator).await;
    wait_pools(&test, &[("workers", &["n1"])]).await;
    add_node(&client, "n2", "workers").await;
    add_node(&client, "n3", "drivers").await;
    wait_pools(&test, &[("drivers", &["n3"]), ("workers", &["n1", "n2"])]).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .delete("n1", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    wait_pools(&test, &[("drivers", &["n3"]), ("workers", &["n2"])]).await;
    // Each change is an event on the scheduler.
    let filter = switchyard::audit::Filter {
        kind: Some("scheduler".into()),
        ..Default::default()
    };
    let mut configured = 0;
    switchyard::audit::replay(test.app.store(), &filter, |record| {
        configured += record
            .events
            .iter()
            .filter(|e| e.event_type == "scheduler.configured")
            .count();
        Ok(())
    })
    .await
    .unwrap();
    assert!(configured >= 3, "{configured} scheduler.configured events");
}

/// Every Kubernetes call is a span under its step's span, in the request's trace, with the
/// method, resource, namespace, name and status; a denied call is an error span.
#[actix_rt::test]
async fn every_kubernetes_call_is_a_span_under_its_step() {
    use opentelemetry::trace::{Status, TraceId};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = switchyard::telemetry::install(
        &switchyard::telemetry::LogConfig::default(),
        Some(provider.clone()),
    )
    .unwrap();
    let emulator = Emulator::start();
    emulator
        .control(
            "faults",
            json!({"method": "POST", "path": "/services$", "status": 403, "count": 100}),
        )
        .await;
    emulator
        .control(
            "faults",
            json!({"method": "POST", "path": "/namespaces$", "status": 429, "count": 2, "retry_after": 1}),
        )
        .await;
    let test = with_kubernetes(&emulator, &sample_curriculum()).await;
    create_session(&test, "traced", false).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").as_str(),
    );
    let reply = crate::harness::request(
        &test.client,
        "lesson.request",
        json!({"session": "traced", "lesson": "ssh-basics"}).to_string(),
        Some(headers),
    )
    .await
    .ok();
    let id = reply["result"]["id"].as_str().unwrap().to_owned();
    wait_status(&test, &id, "ERROR", 1).await;
    let trace_id = TraceId::from_hex(trace).unwrap();
    let spans = wait_for(
        "the denied call's span",
        Duration::from_secs(10),
        || async {
            let spans: Vec<_> = exporter
                .get_finished_spans()
                .unwrap()
                .into_iter()
                .filter(|s| s.span_context.trace_id() == trace_id)
                .collect();
            spans
                .iter()
                .any(|s| s.name == "k8s create services")
                .then_some(spans)
        },
    )
    .await;
    let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let steps: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "lesson.start_endpoint")
        .map(|s| s.span_context.span_id())
        .collect();
    let pod = spans
        .iter()
        .find(|s| s.name == "k8s create pods")
        .expect("a span for the pod's creation");
    assert!(steps.contains(&pod.parent_span_id), "under its step");
    let ns = format!("switchyard-{id}");
    assert_eq!(attribute(pod, "k8s.namespace"), Some(ns));
    assert_eq!(attribute(pod, "k8s.resource").as_deref(), Some("pods"));
    assert_eq!(attribute(pod, "k8s.method").as_deref(), Some("create"));
    assert_eq!(attribute(pod, "k8s.name").as_deref(), Some("alpha"));
    assert_eq!(attribute(pod, "attempts").as_deref(), Some("1"));
    assert!(matches!(pod.status, Status::Unset), "{:?}", pod.status);
    // Throttled twice: the same call, tried three times, waiting what the server asked.
    let namespace = spans
        .iter()
        .find(|s| s.name == "k8s create namespaces")
        .expect("a span for the namespace");
    assert_eq!(attribute(namespace, "attempts").as_deref(), Some("3"));
    assert!(
        matches!(namespace.status, Status::Unset),
        "{:?}",
        namespace.status
    );
    let waited = namespace
        .end_time
        .duration_since(namespace.start_time)
        .unwrap();
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    let denied = spans
        .iter()
        .find(|s| s.name == "k8s create services")
        .unwrap();
    assert_eq!(
        attribute(denied, "http.response.status_code").as_deref(),
        Some("403")
    );
    assert!(
        matches!(denied.status, Status::Error { .. }),
        "{:?}",
        denied.status
    );
}

#[actix_rt::test]
async fn kill_9_right_after_a_components_pod_is_created_then_restart_adopts_it_and_ends_done() {
    use crate::crash::{Switchyard, wait_serving};

    let emulator = Emulator::start();
    let kube = emulator.client();
    add_node(&kube, "n1", "workers").await;
    add_node(&kube, "n2", "drivers").await;
    let nats = crate::harness::start_nats();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nreaction_interval = \"200ms\"\n\n[sessions]\nbackend = \"kubernetes\"\n\
             poll_interval = \"50ms\"\n\n[kubernetes]\napi = \"{}\"\n",
            emulator.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("switchyard.log");
    let armed = [
        ("SWITCHYARD_CONFIG", config.to_str().unwrap()),
        ("SWITCHYARD_FAILPOINTS", "session.after_start"),
    ];
    let mut crashing = Switchyard::spawn_with(&nats.url(), &log, &armed);
    let client = crate::lesson_crash::client(&nats.url()).await;
    wait_serving(&client).await;
    // Pools come from the nodes before a session can be scheduled.
    // Said in full if it never comes: what the pools were, and the control plane's log.
    let mut seen = Value::Null;
    let mut pooled = false;
    for _ in 0..600 {
        let reply =
            crate::harness::request(&client, "pool.list", json!({}).to_string(), None).await;
        if let crate::harness::Reply::Ok(view) = reply {
            if view["result"].as_array().map(Vec::len) == Some(2) {
                pooled = true;
                break;
            }
            seen = view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        pooled,
        "pools: {seen}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    crate::harness::request(
        &client,
        "session.schedule",
        json!({"id": "drill", "components": [
            k8s_component("w1", "server", "workers"),
            k8s_component("driver", "driver", "drivers")]})
        .to_string(),
        None,
    )
    .await
    .ok();
    crashing.wait_crashed(&log).await;
    let worker = pod(&kube, &pod_of("drill", "w1")).await;
    let uid = worker.metadata.uid.clone().unwrap();

    let plain = [("SWITCHYARD_CONFIG", config.to_str().unwrap())];
    let _restarted = Switchyard::spawn_with(&nats.url(), &log, &plain);
    wait_serving(&client).await;
    set_pod(
        &kube,
        &pod_of("drill", "w1"),
        "10.0.0.1",
        json!({"running": {}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let driver = pod_of("drill", "driver");
    for _ in 0..1500 {
        if pods.get_opt(&driver).await.ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        pods.get_opt(&driver).await.ok().flatten().is_some(),
        "no driver pod after 30 s; the control plane's log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The worker's pod made before the crash was adopted, not made again.
    assert_eq!(
        pod(&kube, &pod_of("drill", "w1"))
            .await
            .metadata
            .uid
            .unwrap(),
        uid
    );
    set_pod(
        &kube,
        &pod_of("drill", "driver"),
        "10.0.0.2",
        json!({"terminated": {"exitCode": 0}}),
    )
    .await;
    let view = wait_for("the session to end", Duration::from_secs(60), || async {
        let reply = crate::harness::request(
            &client,
            "session.get",
            json!({"id": "drill"}).to_string(),
            None,
        )
        .await;
        let crate::harness::Reply::Ok(view) = reply else {
            return None;
        };
        view["result"]["cleaned_up_at"]
            .is_string()
            .then(|| view["result"].clone())
    })
    .await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert!(view.to_string().contains("10.0.0.1:10000"), "{view:#}");
    assert!(session_pods(&kube, "drill").await.is_empty());
}

/// On a real cluster, opt-in (`SWITCHYARD_TEST_KUBECONFIG`): a session whose driver runs in a
/// `busybox` pod on a node labelled `pool=switchyard-test`
/// (`kubectl label node NODE pool=switchyard-test`), its log kept, its pod cleaned up.
#[actix_rt::test]
async fn on_a_real_cluster_a_session_runs_its_driver_in_a_pod_and_ends_done() {
    let Some(kubeconfig) = std::env::var_os("SWITCHYARD_TEST_KUBECONFIG") else {
        eprintln!(
            "skipped: SWITCHYARD_TEST_KUBECONFIG is not set (set it to a kubeconfig, with a node \
             labelled pool=switchyard-test, to run a session on that cluster)"
        );
        return;
    };
    let test = start_app(move |config| {
        config.sessions.backend = switchyard::config::SessionBackendKind::Kubernetes;
        config.kubernetes.kubeconfig = Some(PathBuf::from(kubeconfig));
    })
    .await;
    let id = crate::sessions::schedule(
        &test,
        json!({"components": [{"name": "driver", "kind": "driver", "pool": "switchyard-test",
            "image": "busybox", "command": "sh", "args": ["-c", "echo driver on $(hostname)"]}]}),
    )
    .await;
    let view = crate::sessions::ended(&test, &id, Duration::from_secs(600)).await;
    assert_eq!(view["status"], "DONE", "{view:#}");
    assert!(
        crate::sessions::driver_log(&test, &id)
            .await
            .contains("driver on")
    );
}
