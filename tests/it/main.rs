//! The one integration-test binary: each module is an area, each test starts the real servers
//! it needs (see `harness`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod api;
mod architecture;
mod audit;
mod backend;
mod bench;
mod cloud;
mod cluster;
mod crash;
mod external;
mod feed;
mod harness;
mod history;
mod identity;
mod kubernetes;
mod lesson_crash;
mod lessons;
mod reactions;
mod session_crash;
mod sessions;
mod store;
mod switchboard;
mod traces;
mod tunnel;
