//! The `lessons` scenario: the sample lesson (two ssh endpoints, a script each) from request to
//! READY, split by step, next to starting the same two sshd processes directly; then many
//! lessons at once: time to all READY, the ports and memory they hold, and their deletion
//! (nothing may be left running).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};

use super::sessions::median;
use super::{Bench, Options, Report, Row};

/// The sample curriculum, built in: the bench runs anywhere, the lesson is the one
/// `switchyard dev` serves, with no ready delay (it would only add its own length).
const SAMPLE: [(&str, &str); 7] = [
    (
        "ssh-basics/lesson.yaml",
        include_str!("../../deploy/dev/curriculum/ssh-basics/lesson.yaml"),
    ),
    (
        "ssh-basics/stage1/guide.md",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage1/guide.md"),
    ),
    (
        "ssh-basics/stage2/guide.md",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage2/guide.md"),
    ),
    (
        "ssh-basics/stage1/configs/alpha.sh",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage1/configs/alpha.sh"),
    ),
    (
        "ssh-basics/stage2/configs/alpha.sh",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage2/configs/alpha.sh"),
    ),
    (
        "ssh-basics/stage1/configs/beta.py",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage1/configs/beta.py"),
    ),
    (
        "ssh-basics/stage2/configs/beta.py",
        include_str!("../../deploy/dev/curriculum/ssh-basics/stage2/configs/beta.py"),
    ),
];

pub(super) fn write_curriculum(root: &Path) -> anyhow::Result<()> {
    for (path, text) in SAMPLE {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().context("a lesson file has a directory")?)?;
        let text = if path.ends_with("lesson.yaml") {
            text.replace("ready_delay: 1s", "ready_delay: 0s")
        } else {
            text.to_owned()
        };
        std::fs::write(path, text)?;
    }
    Ok(())
}

pub(super) async fn get(bench: &Bench, id: &str) -> anyhow::Result<Value> {
    let subject = format!("{}.api.livelesson.get", bench.config.store.subject_prefix);
    let reply = bench
        .client
        .request(subject, json!({"id": id}).to_string().into())
        .await?;
    let value: Value = serde_json::from_slice(&reply.payload)?;
    Ok(value["result"].clone())
}

/// Requests the sample lesson for a new session `session`; the live lesson's id.
pub(super) async fn request(bench: &Bench, session: &str) -> anyhow::Result<String> {
    bench
        .call(
            "livesession.create",
            Bytes::from(json!({"id": session}).to_string()),
        )
        .await?;
    let subject = format!("{}.api.lesson.request", bench.config.store.subject_prefix);
    let reply = bench
        .client
        .request(
            subject,
            json!({"session": session, "lesson": "ssh-basics"})
                .to_string()
                .into(),
        )
        .await?;
    let value: Value = serde_json::from_slice(&reply.payload)?;
    value["result"]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("lesson.request: {value}"))
}

/// Waits until every lesson in `ids` has `field` set (or `status` READY); fails on ERROR.
async fn wait_all(bench: &Bench, ids: &[String], ready: bool) -> anyhow::Result<Vec<Value>> {
    let started = Instant::now();
    let mut views = vec![Value::Null; ids.len()];
    let mut pending: Vec<usize> = (0..ids.len()).collect();
    while !pending.is_empty() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "lessons did not finish: {:?}",
            pending.iter().map(|i| &ids[*i]).collect::<Vec<_>>()
        );
        let mut still = Vec::new();
        for i in pending {
            let view = get(bench, &ids[i]).await?;
            anyhow::ensure!(
                view["status"] != "ERROR",
                "lesson {} failed: {view}",
                ids[i]
            );
            let done = if ready {
                view["status"] == "READY"
            } else {
                view["deleted_at"].is_string()
            };
            if done {
                views[i] = view;
            } else {
                still.push(i);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(views)
}

/// The milliseconds between two entries of a lesson's timeline.
fn between(view: &Value, from: &str, to: &str) -> f64 {
    let at = |status: &str| {
        view["timeline"].as_array().and_then(|t| {
            t.iter()
                .filter(|m| m["status"] == status)
                .filter_map(|m| m["at"].as_str())
                .filter_map(|s| crate::domain::Timestamp::parse_rfc3339(s).ok())
                .next_back()
        })
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) => b.since(a).as_secs_f64() * 1e3,
        _ => 0.0,
    }
}

/// Processes whose working directory is under `dir`, and their resident memory in bytes.
fn processes_under(dir: &Path) -> (usize, u64) {
    let mut count = 0;
    let mut rss = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
        {
            continue;
        }
        count += 1;
        rss += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
    }
    (count, rss)
}

/// Starts `n` sshd processes directly, as the local backend does (a host key by `ssh-keygen`,
/// a configuration, `sshd -D`), and waits until each accepts a connection: the baseline.
async fn direct_sshds(dir: &Path, n: usize) -> anyhow::Result<f64> {
    let sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("OpenSSH's sshd (Debian openssh-server)")?;
    let keys = dir.join("authorized_keys");
    std::fs::write(&keys, "")?;
    let started = Instant::now();
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for i in 0..n {
        let home = dir.join(format!("direct-{i}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&home)?;
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(crate::lessons::backend::SSHD)
            .current_dir(&home)
            .env("PORT", port.to_string())
            .env("SWITCHYARD_ENDPOINT", format!("direct-{i}"))
            .env("SWITCHYARD_KEYS", &keys)
            .env("SWITCHYARD_LOGIN", "/bin/true")
            .env("SWITCHYARD_SSHD", sshd)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
        ports.push(port);
    }
    for port in ports {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "sshd did not start"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    for mut child in children {
        let _ = child.kill().await;
    }
    Ok(elapsed)
}

pub(super) async fn lessons(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let curriculum = dir.path().join("curriculum");
    write_curriculum(&curriculum)?;
    let lessons_dir: PathBuf = dir.path().join("lessons");
    let bench = Bench::start(url, "les", |config| {
        config.lessons.curriculum = Some(curriculum.clone());
        config.lessons.dir = lessons_dir.clone();
        config.lessons.poll_interval = Duration::from_millis(20);
        config.lessons.stop_grace = Duration::from_secs(1);
        config.runtime.reaction_interval = Duration::from_millis(100);
    })
    .await?;
    // The catalog is recorded just after start.
    let started = Instant::now();
    loop {
        let subject = format!("{}.api.lesson.list", bench.config.store.subject_prefix);
        let reply = bench.client.request(subject, "{}".into()).await?;
        let value: Value = serde_json::from_slice(&reply.payload)?;
        if value["result"].as_array().is_some_and(|l| !l.is_empty()) {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "no catalog");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One at a time: request to READY, by step.
    let mut total = Vec::new();
    let mut pickup = Vec::new();
    let mut booting = Vec::new();
    let mut configuring = Vec::new();
    let mut ids = Vec::new();
    for i in 0..options.lesson_samples {
        let sent = Instant::now();
        let id = request(&bench, &format!("one{i}")).await?;
        let view = wait_all(&bench, std::slice::from_ref(&id), true)
            .await?
            .remove(0);
        total.push(sent.elapsed().as_secs_f64() * 1e3);
        pickup.push(between(&view, "INITIALIZED", "BOOTING"));
        booting.push(between(&view, "BOOTING", "CONFIGURATION"));
        configuring.push(between(&view, "CONFIGURATION", "READY"));
        ids.push(id);
    }
    let mut direct = Vec::new();
    for _ in 0..options.lesson_samples {
        direct.push(direct_sshds(dir.path(), 2).await?);
    }
    let rows = [
        (
            "request to READY, sample lesson (2 sshd, 2 scripts), median",
            median(total),
            Some(median(direct)),
        ),
        (
            "  of which requested to BOOTING (the scheduler picks it up)",
            median(pickup),
            None,
        ),
        (
            "  of which BOOTING to CONFIGURATION (start, addresses, reachability)",
            median(booting),
            None,
        ),
        (
            "  of which CONFIGURATION to READY (2 scripts over SSH)",
            median(configuring),
            None,
        ),
    ];
    for (metric, value, raw) in rows {
        report.add(out, Row::new("lessons", metric, "ms", value, raw, None))?;
    }
    for id in &ids {
        bench
            .call(
                "livelesson.kill",
                Bytes::from(json!({"id": id}).to_string()),
            )
            .await?;
    }
    wait_all(&bench, &ids, false).await?;

    // Many at once.
    let count = options.lessons;
    let started = Instant::now();
    let requests = (0..count).map(|i| {
        let bench = &bench;
        async move { request(bench, &format!("many{i}")).await }
    });
    let ids: Vec<String> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let views = wait_all(&bench, &ids, true).await?;
    let all_ready = started.elapsed().as_secs_f64();
    let ports: usize = views
        .iter()
        .map(|v| {
            v["endpoints"].as_array().map_or(0, |e| {
                e.iter()
                    .map(|e| e["addresses"].as_object().map_or(0, |a| a.len()))
                    .sum()
            })
        })
        .sum();
    let (processes, rss) = processes_under(&lessons_dir);
    let direct_all = direct_sshds(dir.path(), 2 * count).await? / 1e3;
    report.add(
        out,
        Row::new(
            "lessons",
            &format!("{count} lessons requested at once, all READY"),
            "s",
            all_ready,
            Some(direct_all),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "lessons",
            &format!("loopback ports held by {count} lessons"),
            "ports",
            ports as f64,
            None,
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "lessons",
            &format!("memory of {count} lessons' processes ({processes} processes)"),
            "MiB",
            rss as f64 / (1024.0 * 1024.0),
            None,
            None,
        ),
    )?;
    let started = Instant::now();
    for id in &ids {
        bench
            .call(
                "livelesson.kill",
                Bytes::from(json!({"id": id}).to_string()),
            )
            .await?;
    }
    wait_all(&bench, &ids, false).await?;
    let deleted = started.elapsed().as_secs_f64();
    let (left, _) = processes_under(&lessons_dir);
    anyhow::ensure!(
        left == 0,
        "{left} processes left after deleting every lesson"
    );
    report.add(
        out,
        Row::new(
            "lessons",
            &format!("{count} lessons killed, all deleted, nothing left"),
            "s",
            deleted,
            None,
            None,
        ),
    )?;
    bench.app.shutdown().await;
    Ok(())
}
