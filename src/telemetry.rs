//! Logs and traces: `tracing` everywhere, exported through OpenTelemetry (OTLP over HTTP) when
//! the standard `OTEL_*` variables ask for it, and W3C trace context carried in NATS headers.
//!
//! Live handling parents on the caller's `traceparent`; replays and rebuilds add a link instead,
//! so a projection rebuild is not one months-long trace.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Level;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info,switchyard=debug`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            filter: "info,async_nats=warn,actix_server=warn".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?} is not built in; use http/protobuf or http/json"
    )]
    UnsupportedProtocol { protocol: String },
    #[error("cannot build the OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes pending spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "flushing traces failed"
            );
        }
    }
}

/// True when the standard variables ask for OTLP trace export.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match std::env::var("OTEL_TRACES_EXPORTER") {
        Ok(v) if v == "none" => false,
        Ok(v) if v == "otlp" => true,
        _ => set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    }
}

/// Installs the global subscriber: logs per `config`, plus OTLP export if `OTEL_*` asks for it.
pub fn init(config: &LogConfig) -> Result<Telemetry, TelemetryError> {
    let provider = if otlp_requested() {
        Some(otlp_provider()?)
    } else {
        None
    };
    install(config, provider)
}

/// Installs the global subscriber with a given tracer provider (tests pass an in-memory one).
pub fn install(
    config: &LogConfig,
    provider: Option<SdkTracerProvider>,
) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => config.filter.clone(),
    };
    let filter =
        EnvFilter::try_new(&filter).map_err(|source| TelemetryError::Filter { filter, source })?;
    let logs = match config.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours for people at a terminal, plain text in files and journals.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Switchyard's own spans are at debug level: without an exporter nothing is interested in
    // them and they cost nothing on the hot path; with one, the trace layer takes all of them.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("switchyard"))
            .with_filter(Targets::new().with_target("switchyard", Level::DEBUG))
    });
    Registry::default()
        .with(otel)
        .with(logs.with_filter(filter))
        .try_init()
        .map_err(TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

fn otlp_provider() -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".to_owned());
    let protocol = match protocol.as_str() {
        "http/protobuf" => Protocol::HttpBinary,
        "http/json" => Protocol::HttpJson,
        _ => return Err(TelemetryError::UnsupportedProtocol { protocol }),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(TelemetryError::Exporter)?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("switchyard");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the span's W3C trace context (`traceparent`, `tracestate`) into NATS headers.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// The W3C trace context carried by NATS headers, or an empty context.
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => opentelemetry::Context::new(),
    }
}

/// Makes the caller's trace (if any) the parent of `span`: for live handling.
pub fn continue_trace(span: &Span, headers: Option<&HeaderMap>) {
    let parent = extract(headers);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled or already started; nothing to do then.
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the trace stored on an event: for replays, rebuilds and late reactions.
pub fn link_trace(span: &Span, headers: Option<&HeaderMap>) {
    let stored = extract(headers);
    let context = stored.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// Links `span` to a stored `traceparent` string, if any.
pub fn link_traceparent(span: &Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", traceparent);
        link_trace(span, Some(&headers));
    }
}

/// The current span's `traceparent`, for logs and replies.
pub fn current_traceparent() -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(&Span::current(), &mut headers);
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

/// A debug-level span for one step of a reaction's job, with room for an OpenTelemetry error
/// status (see [`failed`]).
#[macro_export]
macro_rules! step_span {
    ($name:literal $(, $($field:tt)*)?) => {
        tracing::debug_span!(
            $name,
            $($($field)*,)?
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty
        )
    };
}

/// Marks a [`step_span!`] as failed, with why: Jaeger shows it as an error.
pub fn failed(span: &tracing::Span, why: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", why);
}

/// Makes `span` continue the trace a stored `traceparent` names (a job continuing the request
/// that caused it); nothing without one.
pub fn continue_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", traceparent);
        continue_trace(span, Some(&headers));
    }
}
