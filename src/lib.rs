//! Switchyard: an event-sourced control plane for lab and test infrastructure, over NATS
//! JetStream. See `docs/ARCHITECTURE.md` for the map.

pub mod alloc;
pub mod api;
pub mod app;
pub mod audit;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod cloud;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod counter;
pub mod domain;
pub mod error_chain;
pub mod failpoint;
pub mod http;
pub mod kubernetes;
pub mod lessons;
pub mod metrics;
pub mod nats_server;
pub mod runtime;
pub mod schema;
pub mod sessions;
pub mod store;
pub mod subject;
pub mod switchboard;
pub mod telemetry;
pub mod tunnel;
