//! The `pools` scenario: a session waiting for a cloud pool's capacity, to its driver running
//! on a new loopback instance, against the driver's configured boot delay; and the cost of one
//! sync of an instance set whose stub driver holds many instances (the first adopts them all,
//! against as many raw publish-and-acks; later ones, against the driver's listing alone).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::json;

use super::sessions::median;
use super::{Bench, Options, Report, Row, commit_like, raw, raw_target};
use crate::backend::process::ProcessBackend;
use crate::cloud::Cloud;
use crate::cloud::driver::{Driver, InstanceSpec, tag};
use crate::cloud::loopback::LoopbackDriver;
use crate::cloud::stub::StubDriver;
use crate::cloud::sync::{Pool, Shared, sync_once};
use crate::cloud::throttled::Throttled;
use crate::config::CloudPoolConfig;
use crate::domain::cloud::InstanceSetId;
use crate::domain::cloud::throttle::Limits;
use crate::domain::cloud::worker::Worker;
use crate::domain::sessions::PoolName;
use crate::runtime::system_clock;
use crate::sessions::Sessions;

fn now_nanos() -> i64 {
    (system_clock())().unix_nanos()
}

/// Workers of the bench's control plane not yet gone.
async fn live_workers(cloud: &Cloud) -> usize {
    cloud
        .table
        .ask(|t, _| {
            t.rows()
                .filter(|(_, row)| matches!(&row.state, Worker::Present(w) if !w.is_gone()))
                .count()
        })
        .await
        .unwrap_or(usize::MAX)
}

pub(super) async fn pools(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    Box::pin(grow(url, options, report, out)).await?;
    Box::pin(sync_cost(url, options, report, out)).await
}

/// One session at a time, each on a new instance: schedule to its driver running there.
async fn grow(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let boot_delay = options.pool_boot_delay;
    let bench = Bench::start(url, "pool", |config| {
        config.cloud.dir = dir.path().join("cloud");
        config.cloud.sync_interval = Duration::from_millis(100);
        config.cloud.timeout_idle = Duration::from_millis(200);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "cloud".into(),
            driver: "loopback".into(),
            driver_config: json!({"boot_delay": humantime::format_duration(boot_delay).to_string()}),
            max_instances: 1,
            ..CloudPoolConfig::default()
        }];
        config.sessions.process_dir = dir.path().join("processes");
        config.sessions.poll_interval = Duration::from_millis(20);
        config.runtime.reaction_interval = Duration::from_millis(100);
    })
    .await?;
    let cloud = bench
        .app
        .services()
        .get::<Cloud>()
        .context("the cloud capability")?;
    let file = dir.path().join("stamp");
    let mut waited = Vec::new();
    for i in 0..options.pool_samples {
        // A new instance each time: the last one is gone first.
        let started = Instant::now();
        while live_workers(&cloud).await > 0 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the last sample's instance was not shut down"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::fs::remove_file(&file).await;
        let stamping = format!("date +%s%N > {0}.tmp && mv {0}.tmp {0}", file.display());
        let body = json!({"id": format!("grow-{i}"), "components": [
            {"name": "driver", "kind": "driver", "pool": "cloud", "command": "sh", "args": ["-c", stamping]}
        ]});
        let sent = now_nanos();
        bench
            .call("session.schedule", Bytes::from(body.to_string()))
            .await?;
        let started = Instant::now();
        let stamp = loop {
            if let Ok(text) = tokio::fs::read_to_string(&file).await
                && let Ok(stamp) = text.trim().parse::<i64>()
            {
                break stamp;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "no driver ran on a new instance"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        waited.push((stamp - sent) as f64 / 1e6);
    }
    report.add(
        out,
        Row::new(
            "pools",
            "waiting session to its driver on a new instance",
            "ms",
            median(waited),
            Some(boot_delay.as_secs_f64() * 1e3),
            None,
        ),
    )?;
    // Instances outlive the control plane that made them (as a cloud's would): the last one
    // is shut down for idleness first, and whatever is left is destroyed here.
    let started = Instant::now();
    while live_workers(&cloud).await > 0 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bench.app.shutdown().await;
    let instance = bench.config.store.stream_prefix.to_lowercase();
    let leftover = LoopbackDriver::new(ProcessBackend::new(
        dir.path().join("cloud").join("instances"),
        instance,
        Duration::from_secs(1),
    ))
    .instance_set(&serde_json::Value::Null, "cloud")?;
    for instance in leftover.instances(&BTreeMap::new()).await? {
        leftover.destroy(&instance.id).await?;
    }
    Ok(())
}

/// Syncs of a set whose stub holds `pool_instances` instances.
async fn sync_cost(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let count = options.pool_instances;
    // The set is configured so the scheduler knows its pool; its own job syncs once at start
    // (an empty stub of its own) and then sleeps through the measurement.
    let bench = Bench::start(url, "sync", |config| {
        config.cloud.dir = dir.path().join("cloud");
        config.cloud.sync_interval = Duration::from_secs(3600);
        config.cloud.pools = vec![CloudPoolConfig {
            name: "bulk".into(),
            driver: "stub".into(),
            max_instances: u32::try_from(count).unwrap_or(u32::MAX),
            ..CloudPoolConfig::default()
        }];
        config.sessions.process_dir = dir.path().join("processes");
    })
    .await?;
    let services = bench.app.services();
    let cloud = services.get::<Cloud>().context("the cloud capability")?;
    let sessions = services
        .get::<Sessions>()
        .context("the sessions capability")?;
    let clock = system_clock();
    let stub = StubDriver::new(clock.clone());
    let set = stub.instance_set(&serde_json::Value::Null, "bulk")?;
    let spec = InstanceSpec {
        instance_type: "default".into(),
        image: String::new(),
        tags: BTreeMap::from([(tag::INSTANCE_SET.to_owned(), "bulk".to_owned())]),
        init_command: "true".into(),
        public_key: String::new(),
    };
    for _ in 0..count {
        set.create(&spec).await?;
    }
    let id = InstanceSetId::new("bulk")?;
    let config = bench.config.cloud.clone();
    let pool = Arc::new(Pool::new(
        id.clone(),
        PoolName::new("bulk")?,
        config.pools[0].clone(),
        set.clone(),
        Throttled::new(
            set.clone(),
            Limits {
                max_instances: u32::try_from(count).unwrap_or(u32::MAX),
                ..Limits::default()
            },
            0,
            clock.clone(),
        ),
        clock(),
    ));
    let key = Arc::new(crate::tunnel::keys::generate()?);
    let shared = Shared {
        workers: cloud.workers.clone(),
        table: cloud.table.clone(),
        sets: cloud.sets.clone(),
        scheduler: sessions.scheduler.clone(),
        pools: BTreeMap::from([(id, pool.clone())]),
        public_key: key.public_key().to_openssh()?,
        key,
        config,
        clock,
        metrics: crate::metrics::Metrics::new(),
    };
    let started = Instant::now();
    sync_once(&shared, &pool)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let adopting = started.elapsed().as_secs_f64() * 1e3;
    // Later syncs read the adopted workers from the read model: wait until it has them all.
    let started = Instant::now();
    while live_workers(&cloud).await < count {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the worker table did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut steady = Vec::new();
    let mut listing = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        sync_once(&shared, &pool)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        steady.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        set.instances(&pool.owned()).await?;
        listing.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (payload, headers) = commit_like()?;
    let (js, subjects) = raw_target(&bench.client, "sync", count.max(1)).await?;
    let raw_adopt = raw::sync_publish_latency(&js, &subjects, &payload, &headers, count, 1 << 41)
        .await?
        .total()
        .as_secs_f64()
        * 1e3;
    report.add(
        out,
        Row::new(
            "pools",
            &format!("first sync, adopting {count} stub instances"),
            "ms",
            adopting,
            Some(raw_adopt),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "pools",
            &format!("later sync of {count} workers, median"),
            "ms",
            median(steady),
            Some(median(listing)),
            None,
        ),
    )?;
    bench.app.shutdown().await;
    Ok(())
}
