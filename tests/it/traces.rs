//! Traces: the caller's `traceparent` parents the handling span, is stored on the events and is
//! continued by what reacts live; a later reaction (a reaper) links to it instead. Checked with
//! the OpenTelemetry SDK's in-memory exporter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use switchyard::domain::Timestamp;
use switchyard::telemetry::{self, LogConfig};

use crate::harness::{Reply, request, start_app_with_clock, wait_for};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn spans(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter.get_finished_spans().unwrap()
}

#[actix_rt::test]
async fn a_callers_trace_runs_through_handling_storage_and_reactions() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    // This test process's only subscriber (nextest runs each test in its own process).
    let _telemetry = telemetry::install(&LogConfig::default(), Some(provider.clone())).unwrap();

    let now = Arc::new(Mutex::new(Timestamp::from_unix_nanos(
        1_800_000_000_000_000_000,
    )));
    let clock_now = now.clone();
    let clock: switchyard::runtime::Clock = Arc::new(move || *clock_now.lock().unwrap());
    let test = start_app_with_clock(|_| {}, clock).await;

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").as_str(),
    );
    let body = json!({"id": "traced", "idle_ttl_ms": 1000});
    let reply = request(
        &test.client,
        "counter.create",
        body.to_string(),
        Some(headers),
    )
    .await;
    let Reply::Ok(_) = reply else {
        panic!("{reply:?}")
    };

    let trace_id = TraceId::from_hex(TRACE).unwrap();
    let caller = SpanId::from_hex(CALLER_SPAN).unwrap();
    let handled = wait_for("the handling spans", Duration::from_secs(5), || async {
        let spans = spans(&exporter);
        let api = spans
            .iter()
            .find(|s| s.name == "sy.api.counter.create")?
            .clone();
        let entity = spans.iter().find(|s| s.name == "entity.execute")?.clone();
        let projection = spans.iter().find(|s| s.name == "projection.apply")?.clone();
        Some((api, entity, projection))
    })
    .await;
    let (api, entity, projection) = handled;
    assert_eq!(
        api.span_context.trace_id(),
        trace_id,
        "the handling span is in the caller's trace"
    );
    assert_eq!(
        api.parent_span_id, caller,
        "the caller's span is its parent"
    );
    assert_eq!(entity.span_context.trace_id(), trace_id);
    assert_eq!(entity.parent_span_id, api.span_context.span_id());

    // The event carries the trace; the live projection update continues it.
    let subject = test.app.store().subjects().event("counter", "traced");
    let stored = test
        .app
        .store()
        .read_subject(&subject, 1, None)
        .await
        .unwrap();
    let traceparent = stored[0].header("traceparent").unwrap().to_owned();
    assert!(traceparent.contains(TRACE), "{traceparent}");
    assert!(
        traceparent.contains(&entity.span_context.span_id().to_string()),
        "stored under the entity span"
    );
    assert_eq!(projection.span_context.trace_id(), trace_id);
    assert_eq!(projection.parent_span_id, entity.span_context.span_id());

    // Much later the reaper expires the counter: a new trace, linked to the creating one.
    *now.lock().unwrap() = Timestamp::from_unix_nanos(1_800_000_002_000_000_000);
    let reaper = wait_for("the reaper span", Duration::from_secs(5), || async {
        spans(&exporter).into_iter().find(|s| s.name == "reaper")
    })
    .await;
    assert_ne!(
        reaper.span_context.trace_id(),
        trace_id,
        "a reaction later in time starts its own trace"
    );
    let linked: Vec<_> = reaper
        .links
        .links
        .iter()
        .map(|l| l.span_context.trace_id())
        .collect();
    assert_eq!(
        linked,
        vec![trace_id],
        "and links to the trace that made it due"
    );
    let expired = stored_count_after_expiry(&test).await;
    assert_eq!(expired, 2);
    let _ = provider.shutdown();
}

async fn stored_count_after_expiry(test: &crate::harness::TestApp) -> usize {
    let subject = test.app.store().subjects().event("counter", "traced");
    wait_for("the expiry event", Duration::from_secs(5), || async {
        let history = test
            .app
            .store()
            .read_subject(&subject, 1, None)
            .await
            .unwrap();
        (history.len() == 2).then_some(history.len())
    })
    .await
}
