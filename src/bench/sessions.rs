//! The `sessions` scenario: sessions with a trivial driver, scheduled through to DONE and
//! cleaned up, per second; and the scheduling overhead of one session (from the request to its
//! first process running) next to spawning the same process directly.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::json;

use super::{Bench, Options, Report, Row};
use crate::config::PoolConfig;
use crate::domain::sessions::session::Session;
use crate::runtime::system_clock;

/// The component every session runs: it writes the wall-clock time it started at.
fn stamping(file: &Path) -> String {
    format!("date +%s%N > {}.tmp && mv {0}.tmp {0}", file.display())
}

fn now_nanos() -> i64 {
    (system_clock())().unix_nanos()
}

/// Waits for `file` and returns the nanosecond time written in it.
async fn stamp(file: &Path) -> anyhow::Result<i64> {
    let started = Instant::now();
    loop {
        if let Ok(text) = tokio::fs::read_to_string(file).await
            && let Ok(stamp) = text.trim().parse::<i64>()
        {
            return Ok(stamp);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no process started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The middle value (the upper one of an even count); 0 for none.
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub(super) async fn sessions(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let processes = dir.path().join("processes");
    let bench = Bench::start(url, "ses", |config| {
        config.sessions.pools = vec![PoolConfig {
            name: "local".into(),
            capacity: 64,
            ..PoolConfig::default()
        }];
        config.sessions.executor_count = 16;
        config.sessions.poll_interval = Duration::from_millis(20);
        config.sessions.process_dir = processes.clone();
        config.runtime.reaction_interval = Duration::from_millis(100);
    })
    .await?;
    let table = bench
        .app
        .services()
        .table::<Session>()
        .context("the session read model")?;
    let cleaned = |prefix: &'static str| {
        let table = table.clone();
        async move {
            table
                .ask(move |t, _| {
                    t.rows()
                        .filter(|(id, row)| {
                            id.as_str().starts_with(prefix)
                                && matches!(&row.state, Session::Present(r) if r.cleaned_up_at.is_some())
                        })
                        .count()
                })
                .await
                .unwrap_or(0)
        }
    };

    // One at a time: from the request to the driver running.
    let samples = options.session_samples;
    let file = dir.path().join("stamp");
    let mut overhead = Vec::new();
    for i in 0..samples {
        let _ = tokio::fs::remove_file(&file).await;
        let body = json!({"id": format!("one-{i}"), "components": [
            {"name": "driver", "kind": "driver", "pool": "local", "command": "sh", "args": ["-c", stamping(&file)]}
        ]});
        let sent = now_nanos();
        bench
            .call("session.schedule", Bytes::from(body.to_string()))
            .await?;
        overhead.push((stamp(&file).await? - sent) as f64 / 1e6);
        let started = Instant::now();
        while cleaned("one-").await <= i {
            if started.elapsed() > Duration::from_secs(60) {
                let subject = format!("{}.api.session.get", bench.config.store.subject_prefix);
                let view = bench
                    .client
                    .request(
                        subject,
                        json!({"id": format!("one-{i}")}).to_string().into(),
                    )
                    .await?;
                anyhow::bail!(
                    "session one-{i} did not end: {}",
                    String::from_utf8_lossy(&view.payload)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut direct = Vec::new();
    for _ in 0..samples {
        let _ = tokio::fs::remove_file(&file).await;
        let sent = now_nanos();
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(stamping(&file))
            .process_group(0)
            .spawn()?;
        direct.push((stamp(&file).await? - sent) as f64 / 1e6);
        child.wait().await?;
    }
    report.add(
        out,
        Row::new(
            "sessions",
            "schedule to first process running, median",
            "ms",
            median(overhead),
            Some(median(direct)),
            None,
        ),
    )?;

    // Many at once: scheduled to DONE and cleaned up.
    let count = options.sessions;
    let started = Instant::now();
    let requests = (0..count).map(|i| {
        let body = json!({"id": format!("many-{i}"), "components": [
            {"name": "driver", "kind": "driver", "pool": "local", "command": "true"}
        ]});
        bench.call("session.schedule", Bytes::from(body.to_string()))
    });
    for result in futures::future::join_all(requests).await {
        result?;
    }
    while cleaned("many-").await < count {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the sessions did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let spawned = (0..count).map(|_| async {
        tokio::process::Command::new("/bin/sh")
            .args(["-c", "true"])
            .process_group(0)
            .status()
            .await
    });
    for status in futures::future::join_all(spawned).await {
        status?;
    }
    let direct_rate = count as f64 / started.elapsed().as_secs_f64();
    report.add(
        out,
        Row::new(
            "sessions",
            "sessions/s, scheduled to DONE and cleaned up (16 executors)",
            "per s",
            rate,
            Some(direct_rate),
            None,
        ),
    )?;
    bench.app.shutdown().await;
    Ok(())
}
