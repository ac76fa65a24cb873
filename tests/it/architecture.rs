//! Architecture invariants that a reviewer should not have to check by eye.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn source(dir: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    rust_files(&root)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap()))
        .collect()
}

#[test]
fn the_domain_does_no_io() {
    let forbidden = [
        "tokio",
        "actix",
        "async_nats",
        "kube",
        "russh",
        "reqwest",
        "opentelemetry",
        "std::fs",
        "std::net",
        "std::process",
        "std::thread",
        "std::env",
        "SystemTime",
        "Instant",
        "now_utc",
        "now_v7",
        "new_v4",
        "crate::store",
        "crate::runtime",
        "crate::api",
    ];
    let files = source("src/domain");
    assert!(files.len() >= 4, "found the domain sources");
    for (path, text) in files {
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for word in forbidden {
                assert!(
                    !code.contains(word),
                    "{}:{}: the domain must not use {word}: {line}",
                    path.display(),
                    number + 1
                );
            }
        }
    }
}

#[test]
fn only_the_event_store_publishes_to_jetstream() {
    // clippy.toml bans the JetStream publish methods. Only the store lifts the ban for events; the
    // benchmark's raw baseline and the CLI's fire-and-forget `call` (a publisher's command, not an
    // event) are the other two places.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let allowed = [
        root.join("src/store/mod.rs"),
        root.join("src/bench/raw.rs"),
        root.join("src/main.rs"),
    ];
    for (path, text) in source("src") {
        let lifts_ban = text.contains("allow(clippy::disallowed_methods)");
        let publishes = text.contains("send_publish") || text.contains("js.publish");
        if lifts_ban && publishes {
            assert!(
                allowed.contains(&path),
                "{} publishes to JetStream",
                path.display()
            );
        }
    }
    let clippy = std::fs::read_to_string(root.join("clippy.toml")).unwrap();
    assert!(clippy.contains("async_nats::jetstream::context::Context::send_publish"));
}

#[test]
fn unsafe_code_lives_only_in_the_allocator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (path, text) in source("src") {
        if text.contains("allow(unsafe_code)") {
            assert_eq!(
                path,
                root.join("src/alloc.rs"),
                "unsafe code outside the allocator"
            );
        }
    }
}
