//! `bench/run` outside of a benchmark: the parts that need no peers (printing a saved result).

use std::process::Command;

use crate::support::TempDir;

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

#[test]
fn the_table_prints_a_footprint_run_without_an_idle_window() {
    // Issue 12, bug 9: `--rss-seconds 120` ended before the other sections did, so no idle
    // window was measured and the table crashed formatting None. A saved result with that
    // shape must print, saying "n/a".
    let saved = repo().join("bench/results/20261128T0716Z.json");
    let mut result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&saved).expect("a saved bench result")).unwrap();
    let agent = &mut result["6"]["agents"]["sitewatch-c16"];
    agent["idle_cpu_s"] = 0.0.into();
    agent["idle_window_s"] = 0.0.into();
    agent["idle_cpu_percent"] = serde_json::Value::Null;
    let dir = TempDir::new("bench-table");
    let file = dir.path().join("result.json");
    std::fs::write(&file, serde_json::to_vec(&result).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(repo().join("bench/run"))
        .arg("--table")
        .arg(&file)
        .output()
        .expect("python3 runs bench/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench/run --table failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let idle_row = stdout
        .lines()
        .find(|l| {
            l.contains("CPU while idle between rounds, default build, concurrency 16 (default)")
        })
        .unwrap_or_else(|| panic!("no idle row in:\n{stdout}"));
    assert!(idle_row.contains("n/a of a core"), "{idle_row}");
}
