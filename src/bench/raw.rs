//! The raw-JetStream baselines each Switchyard figure is compared with, measured with async-nats
//! directly on a stream configured like the event stream, on the same server, in the same run.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::Latencies;

/// A scratch stream shaped like `SWITCHYARD_EVENTS`: file storage, dedupe window, direct gets.
pub async fn stream(js: &jetstream::Context, name: &str, subjects: &str) -> anyhow::Result<()> {
    stream_with_replicas(js, name, subjects, 1).await
}

/// As [`stream`], replicated on `replicas` servers of a cluster.
pub async fn stream_with_replicas(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    replicas: usize,
) -> anyhow::Result<()> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        storage: stream::StorageType::File,
        max_messages_per_subject: -1,
        discard: stream::DiscardPolicy::New,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

fn message(payload: &Bytes, headers: &HeaderMap, id: u64) -> jetstream::message::PublishMessage {
    jetstream::message::PublishMessage::build()
        .payload(payload.clone())
        .headers(headers.clone())
        .message_id(id.to_string())
}

/// Async publishes with up to `in_flight` acknowledgements outstanding, for `duration`:
/// messages per second acknowledged.
#[allow(clippy::disallowed_methods)] // the raw-JetStream baseline, not Switchyard's store
pub async fn async_publish_rate(
    js: &jetstream::Context,
    subjects: &[String],
    payload: &Bytes,
    headers: &HeaderMap,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut sent = 0u64;
    while started.elapsed() < duration {
        while pending.len() < in_flight {
            let subject = subjects[sent as usize % subjects.len()].clone();
            pending.push(
                js.send_publish(subject, message(payload, headers, sent))
                    .await?
                    .into_future(),
            );
            sent += 1;
        }
        if let Some(ack) = pending.next().await {
            ack?;
            acked += 1;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
        acked += 1;
    }
    Ok(acked as f64 / started.elapsed().as_secs_f64())
}

/// One publish at a time, each waiting for its acknowledgement: the latency of each.
#[allow(clippy::disallowed_methods)] // the raw-JetStream baseline, not Switchyard's store
pub async fn sync_publish_latency(
    js: &jetstream::Context,
    subjects: &[String],
    payload: &Bytes,
    headers: &HeaderMap,
    samples: usize,
    first_id: u64,
) -> anyhow::Result<Latencies> {
    let mut latencies = Latencies::with_capacity(samples);
    for i in 0..samples {
        let subject = subjects[i % subjects.len()].clone();
        let started = Instant::now();
        js.send_publish(subject, message(payload, headers, first_id + i as u64))
            .await?
            .await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// Publishes at a fixed `rate` (open loop: sends do not wait for earlier acks), measuring each
/// latency from when it was due, so a stall is not hidden.
#[allow(clippy::disallowed_methods)] // the raw-JetStream baseline, not Switchyard's store
pub async fn open_loop_publish_latency(
    js: &jetstream::Context,
    subjects: &[String],
    payload: &Bytes,
    headers: &HeaderMap,
    rate: f64,
    samples: usize,
    first_id: u64,
) -> anyhow::Result<Latencies> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = tokio::time::Instant::now();
    for i in 0..samples {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let ack = js
            .send_publish(
                subjects[i % subjects.len()].clone(),
                message(payload, headers, first_id + i as u64),
            )
            .await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let ok = ack.await.is_ok();
            let _ = tx.send((due.elapsed(), ok));
        });
    }
    drop(tx);
    let mut latencies = Latencies::with_capacity(samples);
    while let Some((latency, ok)) = rx.recv().await {
        if ok {
            latencies.push(latency);
        }
    }
    Ok(latencies)
}

/// Reads `count` messages of `filter` from the start with an ordered consumer, decoding nothing:
/// messages per second.
pub async fn ordered_read_rate(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    count: u64,
) -> anyhow::Result<f64> {
    let stream = js.get_stream(stream).await?;
    let started = Instant::now();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = 0;
    let mut bytes = 0usize;
    while read < count {
        let message = messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("stream ended after {read} messages"))??;
        bytes += message.payload.len();
        read += 1;
    }
    anyhow::ensure!(bytes > 0, "read nothing");
    Ok(read as f64 / started.elapsed().as_secs_f64())
}
