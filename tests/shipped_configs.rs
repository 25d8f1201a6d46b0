//! Every shipped config in `configs/` runs to its end, shortened to a few dozen steps but
//! otherwise unchanged: a guard, default or timeout that stops a healthy run fails here.

mod common;
use common::*;

/// Shortening that every config accepts: fewer steps, a smaller test split for images.
fn short(config: &str) -> Vec<String> {
    let mut sets = vec!["train.max_steps=40".to_string(), "schedule.warmup_steps=10".into()];
    if config.starts_with("mnist") {
        sets.push("data.test_limit=1000".into());
    }
    sets.into_iter().flat_map(|s| ["--set".to_string(), s]).collect()
}

#[test]
fn every_shipped_config_runs_to_its_end() {
    let mut configs: Vec<_> = std::fs::read_dir(repo().join("configs"))
        .expect("configs/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 6, "{configs:?}");
    for config in &configs {
        let name = config.file_stem().expect("name").to_string_lossy().into_owned();
        let dir = temp_dir(&format!("shipped-{name}"));
        let out = run(bin().arg("train").arg(config).args(["--quiet", "--out"]).arg(&dir).args(short(&name)));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let s = summary(&dir);
        assert_eq!(s["steps"].as_u64(), Some(40), "{name}: {s}");
        assert!(s["test_loss"].as_f64().is_some_and(f64::is_finite), "{name}: {s}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
