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

/// Reads one HTTP/1.1 request (headers and a Content-Length body) and answers 200.
async fn receive_one(stream: &mut tokio::net::TcpStream) -> Option<(String, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let content_type = header("content-type").unwrap_or_default();
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .ok()?;
    Some((path, content_type, buffer[head_end..].to_vec()))
}

#[tokio::test]
async fn traces_are_exported_over_otlp_http_when_the_environment_asks() {
    let nats = crate::harness::start_nats();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", receiver.local_addr().unwrap());
    let (exports, mut received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = receiver.accept().await else {
                return;
            };
            let exports = exports.clone();
            tokio::spawn(async move {
                while let Some(request) = receive_one(&mut stream).await {
                    let _ = exports.send(request);
                }
            });
        }
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("serve")
        .env("SWITCHYARD_NATS__SERVERS", format!("[\"{}\"]", nats.url()))
        .env("SWITCHYARD_HTTP__LISTEN", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "switchyard-otlp-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = crate::harness::connect(&nats).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").as_str(),
    );
    let reply = wait_for("switchyard to answer", Duration::from_secs(20), || {
        let client = client.clone();
        let headers = headers.clone();
        async move {
            let body = json!({"id": "exported"}).to_string();
            tokio::time::timeout(
                Duration::from_millis(500),
                client.request_with_headers("sy.api.counter.create", headers, body.into()),
            )
            .await
            .ok()?
            .ok()
        }
    })
    .await;
    assert!(
        reply
            .headers
            .is_none_or(|h| h.get("Nats-Service-Error").is_none())
    );
    let trace_bytes = TraceId::from_hex(TRACE).unwrap().to_bytes();
    let export = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (path, content_type, body) = received.recv().await.unwrap();
            if body.windows(trace_bytes.len()).any(|w| w == trace_bytes) {
                return (path, content_type, body);
            }
        }
    })
    .await
    .expect("the caller's trace reached the OTLP receiver");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(export.0, "/v1/traces");
    assert_eq!(export.1, "application/x-protobuf");
    let service = b"switchyard-otlp-test";
    assert!(
        export.2.windows(service.len()).any(|w| w == service),
        "the service name is on the resource"
    );
}

/// A session is one trace: the request that scheduled it, its reservation, each component's
/// provisioning, the run, the log kept, the cleanup and the machines given back; a failed step
/// is marked as an error with why.
#[actix_rt::test]
async fn a_session_is_one_trace_from_schedule_to_cleanup() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = telemetry::install(&LogConfig::default(), Some(provider.clone())).unwrap();
    let test = crate::harness::start_app(|config| crate::sessions::with_pool(config, 2, 1)).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").as_str(),
    );
    let body = json!({"id": "traced", "components": [
        crate::sessions::component("server", "server", "sleep 30"),
        crate::sessions::component("driver", "driver", "echo ran; sleep 0.5; exit 2"),
    ]});
    request(
        &test.client,
        "session.schedule",
        body.to_string(),
        Some(headers),
    )
    .await
    .ok();
    crate::sessions::ended(&test, "traced", Duration::from_secs(20)).await;
    let trace_id = TraceId::from_hex(TRACE).unwrap();
    let names = wait_for("the release span", Duration::from_secs(5), || async {
        let names: Vec<String> = spans(&exporter)
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .map(|s| s.name.to_string())
            .collect();
        names
            .iter()
            .any(|n| n == "session.release")
            .then_some(names)
    })
    .await;
    for expected in [
        "sy.api.session.schedule",
        "session.reserve",
        "session.accept",
        "session.run",
        "session.logs",
        "session.cleanup",
        "session.release",
        "entity.execute",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let provisioned: std::collections::BTreeSet<String> = spans(&exporter)
        .into_iter()
        .filter(|s| s.name == "session.provision" && s.span_context.trace_id() == trace_id)
        .filter_map(|s| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "component")
                .map(|kv| kv.value.to_string())
        })
        .collect();
    assert_eq!(
        provisioned,
        ["driver".to_owned(), "server".to_owned()].into(),
        "each component's provisioning: {names:?}"
    );
    let finish = spans(&exporter)
        .into_iter()
        .find(|s| s.name == "session.finish")
        .unwrap();
    assert_eq!(
        finish.status,
        opentelemetry::trace::Status::error("driver driver exited with code 2")
    );
    let _ = provider.shutdown();
}

/// A lesson request is one trace: from the NATS request through a span per scheduler step to
/// READY, and every event of the lesson carries it. A failed script marks its span as an
/// error with the reason and the output.
#[actix_rt::test]
async fn a_lesson_request_is_one_trace_to_ready_and_a_failed_script_is_an_error_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = telemetry::install(&LogConfig::default(), Some(provider.clone())).unwrap();
    // The sample lesson, and one whose script fails.
    let dir = tempfile::tempdir().unwrap();
    let root = crate::lessons::curriculum(
        dir.path(),
        "broken",
        "name: Broken\nendpoints:\n  - {name: solo, image: x, configuration: shell, presentations: [{name: cli, type: ssh, port: 22}]}\nstages: [{}]\n",
        &[
            ("stage1/guide.md", "g"),
            (
                "stage1/configs/solo.sh",
                "echo 'no such router' >&2; exit 4",
            ),
        ],
    );
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(crate::lessons::sample_curriculum().join("ssh-basics"))
        .arg(root.join("ssh-basics"))
        .status()
        .unwrap();
    assert!(copied.success());
    let test = crate::harness::start_app(|c| crate::lessons::with_lessons(c, &root)).await;
    crate::lessons::create_session(&test, "traced", false).await;
    let traced = |trace: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "traceparent",
            format!("00-{trace}-{CALLER_SPAN}-01").as_str(),
        );
        Some(headers)
    };
    let reply = request(
        &test.client,
        "lesson.request",
        json!({"session": "traced", "lesson": "ssh-basics"}).to_string(),
        traced(TRACE),
    )
    .await
    .ok();
    let id = reply["result"]["id"].as_str().unwrap().to_owned();
    crate::lessons::wait_status(&test, &id, "READY", 1).await;
    let trace_id = TraceId::from_hex(TRACE).unwrap();
    let names = wait_for("the ready span", Duration::from_secs(5), || async {
        let names: Vec<String> = spans(&exporter)
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .map(|s| s.name.to_string())
            .collect();
        names.iter().any(|n| n == "lesson.ready").then_some(names)
    })
    .await;
    for expected in [
        "sy.api.lesson.request",
        "lesson.provision",
        "lesson.start_endpoint",
        "lesson.addresses",
        "lesson.reachability",
        "lesson.configure",
        "lesson.ready_delay",
        "lesson.ready",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let configured: std::collections::BTreeSet<String> = spans(&exporter)
        .into_iter()
        .filter(|s| s.name == "lesson.configure" && s.span_context.trace_id() == trace_id)
        .filter_map(|s| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "endpoint")
                .map(|kv| kv.value.to_string())
        })
        .collect();
    assert_eq!(configured, ["alpha".to_owned(), "beta".to_owned()].into());
    // Every event of the lesson carries the request's trace.
    let store = switchyard::store::EventStore::attach(
        test.client.clone(),
        &switchyard::config::StoreConfig::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let history = store
        .read_subject(&store.subjects().event("livelesson", &id), 1, None)
        .await
        .unwrap();
    assert!(history.len() >= 6, "{} events", history.len());
    for message in &history {
        let parent = message.header("traceparent").unwrap_or_default();
        assert!(
            parent.contains(TRACE),
            "seq {}: traceparent {parent:?}",
            message.seq
        );
    }

    const FAILING: &str = "1bf7651916cd43dd8448eb211c80319c";
    let reply = request(
        &test.client,
        "lesson.request",
        json!({"session": "traced", "lesson": "broken"}).to_string(),
        traced(FAILING),
    )
    .await
    .ok();
    let broken = reply["result"]["id"].as_str().unwrap().to_owned();
    crate::lessons::wait_status(&test, &broken, "ERROR", 1).await;
    let failing = TraceId::from_hex(FAILING).unwrap();
    let span = wait_for(
        "the failed configure span",
        Duration::from_secs(5),
        || async {
            spans(&exporter)
                .into_iter()
                .find(|s| s.name == "lesson.configure" && s.span_context.trace_id() == failing)
        },
    )
    .await;
    let opentelemetry::trace::Status::Error { description } = &span.status else {
        panic!("the configure span is not an error: {:?}", span.status);
    };
    assert!(
        description.contains("exited with code 4") && description.contains("no such router"),
        "{description}"
    );
    let _ = provider.shutdown();
}
