//! The `kubernetes` scenario: the sample lesson on the Kubernetes backend, from request to every
//! object of it created (namespace, Secret, network policies, pods, services), next to making
//! the same objects with kube-rs directly; and a session's component, from scheduling to its
//! pod created, next to creating that pod directly. Against `--kubernetes-api URL`, or, without
//! one, the Kubernetes API emulator the tests use (`tests/kubernetes/emulator.py`, kmock in
//! `.tools/venv`). No kubelet runs there, so this times the control plane's side only.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::sessions::median;
use super::{Bench, Options, Report, Row};
use crate::config::{LessonBackendKind, SessionBackendKind};
use crate::domain::lessons::{LiveLessonId, LiveSessionId};
use crate::domain::sessions::SessionId;
use crate::kubernetes::emulator::Emulator;
use crate::lessons::kubernetes::objects::{self, Owner};

pub async fn kubernetes(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (api, _emulator) = match &options.kubernetes_api {
        Some(api) => (api.clone(), None),
        None => match Emulator::start()? {
            Some(emulator) => (emulator.url().to_owned(), Some(emulator)),
            None => {
                writeln!(
                    out,
                    "kubernetes: skipped; give --kubernetes-api URL, or run scripts/setup for the emulator"
                )?;
                return Ok(());
            }
        },
    };
    let mut config = kube::Config::new(api.parse().context("--kubernetes-api")?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let samples = options.lesson_samples.max(1);
    let dir = tempfile::tempdir()?;
    super::lessons::write_curriculum(dir.path())?;
    let lesson = crate::lessons::curriculum::load(dir.path())?
        .into_iter()
        .next()
        .context("the sample lesson")?;

    // The baseline: the same objects, made one after another with kube-rs.
    let mut raw = Vec::new();
    let mut total = 0;
    for i in 0..samples {
        let id = LiveLessonId::new(format!("raw-ssh-basics-{i}"))?;
        let session = LiveSessionId::new("raw")?;
        let owner = Owner {
            instance: "benchraw",
            id: &id,
            session: &session,
            lesson: &lesson,
        };
        let ns = owner.namespace_name();
        total = 2
            + owner.network_policies().len()
            + lesson
                .endpoints
                .iter()
                .map(|e| 1 + e.presentations.len())
                .sum::<usize>();
        let started = Instant::now();
        let post = PostParams::default();
        Api::<Namespace>::all(client.clone())
            .create(&post, &owner.namespace())
            .await?;
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&post, &owner.secret(Default::default()))
            .await?;
        let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns);
        for policy in owner.network_policies() {
            policies.create(&post, &policy).await?;
        }
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let services = Api::<Service>::namespaced(client.clone(), &ns);
        for endpoint in &lesson.endpoints {
            pods.create(&post, &owner.pod(endpoint).map_err(anyhow::Error::msg)?)
                .await?;
            for service in owner.services(endpoint) {
                services.create(&post, &service).await?;
            }
        }
        raw.push(started.elapsed().as_secs_f64() * 1e3);
        Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::default())
            .await?;
    }

    let curriculum = dir.path().to_owned();
    let lesson_api = api.clone();
    let bench = Bench::start(url, "k8s", move |config| {
        config.lessons.backend = LessonBackendKind::Kubernetes;
        config.sessions.backend = SessionBackendKind::Kubernetes;
        config.kubernetes.api = Some(lesson_api);
        config.lessons.curriculum = Some(curriculum);
        config.lessons.poll_interval = Duration::from_millis(20);
        config.sessions.poll_interval = Duration::from_millis(20);
    })
    .await?;
    let instance = bench.config.store.stream_prefix.to_lowercase();
    let objects = lesson.endpoints.len()
        + lesson
            .endpoints
            .iter()
            .map(|e| e.presentations.len())
            .sum::<usize>();
    let mut measured = Vec::new();
    for i in 0..samples {
        let started = Instant::now();
        let id = super::lessons::request(&bench, &format!("k8s{i}")).await?;
        let ns = objects::namespace_name(&instance, &LiveLessonId::new(id.clone())?);
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let services = Api::<Service>::namespaced(client.clone(), &ns);
        loop {
            if started.elapsed() > Duration::from_secs(60) {
                let view = super::lessons::get(&bench, &id).await?;
                anyhow::bail!("lesson {id}: its objects were not all created: {view}");
            }
            let made = pods.list(&ListParams::default()).await?.items.len()
                + services.list(&ListParams::default()).await?.items.len();
            if made == objects {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        measured.push(started.elapsed().as_secs_f64() * 1e3);
        bench
            .call(
                "livelesson.kill",
                Bytes::from(json!({"id": id}).to_string()),
            )
            .await?;
    }
    report.add(
        out,
        Row::new(
            "kubernetes",
            &format!("sample lesson: request to its {total} objects made"),
            "ms",
            median(measured),
            Some(median(raw)),
            None,
        ),
    )?;

    // A session's one component: scheduling to its pod made, against making the pod.
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "bench-node", "labels": {"pool": "bench"}}
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let mut raw: Vec<f64> = Vec::new();
    let mut measured: Vec<f64> = Vec::new();
    for i in 0..samples {
        let spec = json!({"name": "driver", "kind": "driver", "pool": "bench",
            "command": "true", "image": "busybox"});
        let direct: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bench-direct-{i}")},
            "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}
        }))?;
        let started = Instant::now();
        pods.create(&PostParams::default(), &direct).await?;
        raw.push(started.elapsed().as_secs_f64() * 1e3);
        pods.delete(&format!("bench-direct-{i}"), &DeleteParams::default())
            .await?;

        let id = SessionId::new(format!("k8s-{i}"))?;
        let started = Instant::now();
        loop {
            // The pools come from the node: until they are recorded, scheduling is refused.
            let subject = format!("{}.api.session.schedule", bench.config.store.subject_prefix);
            let body = json!({"id": id.as_str(), "components": [spec]}).to_string();
            let reply = bench.client.request(subject, body.into()).await?;
            let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            if value.get("error").is_none() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "session.schedule: {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let scheduled = Instant::now();
        let name = crate::sessions::kubernetes::pod_name(
            &id,
            &crate::domain::sessions::ComponentName::new("driver")?,
        );
        while pods.get_opt(&name).await?.is_none() {
            anyhow::ensure!(
                scheduled.elapsed() < Duration::from_secs(60),
                "session {id}: its pod was not created"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        measured.push(scheduled.elapsed().as_secs_f64() * 1e3);
        bench
            .call(
                "session.cancel",
                Bytes::from(json!({"id": id.as_str()}).to_string()),
            )
            .await?;
    }
    report.add(
        out,
        Row::new(
            "kubernetes",
            "session: scheduling to its pod made",
            "ms",
            median(measured),
            Some(median(raw)),
            None,
        ),
    )?;
    bench.stop().await;
    Ok(())
}
