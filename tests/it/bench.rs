//! The benchmark cannot rot: every scenario runs at a tiny size. It asserts that each produced
//! its figures and baselines, never how fast they were (timing lives in `switchyard bench`).

use serde_json::Value;

#[test]
fn every_benchmark_scenario_runs_at_smoke_size() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bench", "--smoke", "--json"])
        .arg(&json)
        .env(
            "SWITCHYARD_TOOLS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.tools"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    for scenario in [
        "throughput",
        "latency",
        "replay",
        "activation",
        "memory",
        "replicas",
        "durable",
        "sessions",
        "lessons",
        "kubernetes",
    ] {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["scenario"] == scenario).collect();
        assert!(!mine.is_empty(), "no {scenario} rows:\n{stdout}");
        assert!(
            // Thread-busy shares are sampled in 10 ms ticks and may round to 0 at this size.
            mine.iter().all(|r| r["switchyard"]
                .as_f64()
                .is_some_and(|v| v > 0.0 || (r["unit"] == "%" && v == 0.0))),
            "{scenario}: {mine:?}"
        );
    }
    // Every figure with a ratio target was measured next to its raw-JetStream baseline.
    for row in rows.iter().filter(|r| {
        r["target"].get("ratio_at_least").is_some() || r["target"].get("ratio_at_most").is_some()
    }) {
        assert!(row["raw"].as_f64().is_some_and(|v| v > 0.0), "{row}");
    }
    // Memory is measured on the switchboard's real entities too, not only the counter.
    for metric in [
        "per active meeting point actor",
        "per passivated pod or meeting point",
    ] {
        assert!(
            rows.iter()
                .any(|r| r["metric"].as_str().is_some_and(|m| m.starts_with(metric))),
            "no {metric:?} row:\n{stdout}"
        );
    }
    assert!(stdout.contains("raw"), "{stdout}");
}
