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
    // Distillation configs learn from the mnist-cnn model this test trains first.
    let teacher = temp_dir("shipped-teacher");
    let cnn = repo().join("configs/mnist-cnn.toml");
    let out = run(bin().arg("train").arg(&cnn).args(["--quiet", "--out"]).arg(&teacher).args(short("mnist-cnn")));
    assert!(out.status.success(), "mnist-cnn: {}", stderr(&out));
    let teacher_set = format!("distill.teacher={}", teacher.join("model.safetensors").display());
    for config in &configs {
        let name = config.file_stem().expect("name").to_string_lossy().into_owned();
        let dir = temp_dir(&format!("shipped-{name}"));
        let mut cmd = bin();
        cmd.arg("train").arg(config).args(["--quiet", "--out"]).arg(&dir).args(short(&name));
        if std::fs::read_to_string(config).expect("config").contains("[distill]") {
            cmd.args(["--set", &teacher_set]);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let s = summary(&dir);
        assert_eq!(s["steps"].as_u64(), Some(40), "{name}: {s}");
        assert!(s["test_loss"].as_f64().is_some_and(f64::is_finite), "{name}: {s}");
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&teacher).ok();
}
