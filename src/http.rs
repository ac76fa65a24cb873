//! The operator's HTTP endpoint (actix-web): `/healthz` (the process is alive), `/readyz`
//! (connected to NATS, serving the API, and every read model caught up) and `/metrics`
//! (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::dev::ServerHandle;
use actix_web::{HttpResponse, web};
use async_nats::connection::State;
use serde_json::json;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::runtime::Readiness;

/// What the probes look at.
#[derive(Clone)]
pub struct Probes {
    pub metrics: Metrics,
    pub client: async_nats::Client,
    pub read_models: Vec<(String, watch::Receiver<Readiness>)>,
    /// Shown, not required: see `Services::informational`.
    pub informational: Vec<(String, watch::Receiver<Readiness>)>,
    pub api_serving: Arc<AtomicBool>,
}

impl Probes {
    /// Each check with its status, and whether all pass.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let nats = self.client.connection_state() == State::Connected;
        let api = self.api_serving.load(Ordering::Acquire);
        let mut checks = serde_json::Map::new();
        checks.insert(
            "nats".to_owned(),
            json!(if nats { "connected" } else { "disconnected" }),
        );
        checks.insert(
            "api".to_owned(),
            json!(if api { "serving" } else { "not serving" }),
        );
        let mut ready = nats && api;
        for (name, readiness) in &self.read_models {
            let readiness = readiness.borrow();
            ready &= readiness.is_ready();
            checks.insert(name.clone(), json!(readiness.describe()));
        }
        for (name, readiness) in &self.informational {
            checks.insert(name.clone(), json!(readiness.borrow().describe()));
        }
        let mut body = json!({ "ready": ready, "checks": checks });
        // Reported, not failed: the store skips them, so nothing is wrong with serving; an
        // operator should still look, and acknowledge them with `switchyard repair`.
        let (count, latest) = self.metrics.foreign.summary(10);
        if count > 0 {
            body["foreign_messages"] = json!({ "count": count, "latest": latest });
        }
        (ready, body)
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(probes: web::Data<Probes>) -> HttpResponse {
    let (ready, body) = probes.readiness();
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(probes: web::Data<Probes>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(probes.metrics.render())
}

/// Serves the probes on `listen`; returns the handle and the address actually bound (port 0
/// picks a free one).
pub fn start(listen: SocketAddr, probes: Probes) -> std::io::Result<(ServerHandle, SocketAddr)> {
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(web::Data::new(probes.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(5)
    .bind(listen)?;
    let addr = server.addrs().first().copied().unwrap_or(listen);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
}
