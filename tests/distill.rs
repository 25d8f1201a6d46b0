//! Knowledge distillation end to end (T39): a student learns from a teacher model file on
//! one process and on two data-parallel workers; alpha = 0 is exactly cross-entropy; a
//! missing or mismatched teacher is a clear error.

mod common;
use common::*;

fn short(extra: &[&str]) -> Vec<String> {
    let mut sets =
        vec!["train.max_steps=30", "schedule.warmup_steps=5", "data.test_limit=500", "data.train_limit=4000"];
    sets.extend_from_slice(extra);
    sets.into_iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
}

fn hash(dir: &std::path::Path) -> String {
    summary(dir)["weight_hash"].as_str().expect("weight_hash").to_string()
}

#[test]
fn a_student_learns_from_a_teacher_file() {
    // The teacher: a briefly trained mnist-mlp (any lockstep model file will do).
    let teacher = temp_dir("distill-teacher");
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&teacher).args(short(&[])));
    assert!(out.status.success(), "{}", stderr(&out));
    let teacher_set = format!("distill.teacher={}", teacher.join("model.safetensors").display());
    let student = |name: &str, extra: &[&str], workers: usize| {
        let dir = temp_dir(name);
        let mut cmd = bin();
        match workers {
            1 => cmd.arg("train"),
            n => cmd.args(["local", "--workers", &n.to_string()]),
        };
        cmd.args(["configs/mnist-distill.toml", "--quiet", "--out"]).arg(&dir);
        cmd.args(short(&[&teacher_set])).args(short(extra));
        (run(&mut cmd), dir)
    };
    let (out, distilled) = student("distill-student", &[], 1);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(summary(&distilled)["test_accuracy"].as_f64().unwrap() > 0.5, "{}", summary(&distilled));
    // Two workers, the teacher on each: the same weights as one process, to rounding.
    let (out, dp) = student("distill-dp", &[], 2);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (summary(&distilled)["test_loss"].as_f64().unwrap(), summary(&dp)["test_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-3, "one process {a} vs two workers {b}");
    // alpha = 0 is plain cross-entropy: bitwise the weights of a student without the section.
    let (out, alone) = student("distill-alpha0", &["distill.alpha=0"], 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let plain = temp_dir("distill-plain");
    let config = std::fs::read_to_string(repo().join("configs/mnist-distill.toml")).unwrap();
    let without = config[..config.find("[distill]").unwrap()].to_string();
    let path = plain.join("student.toml");
    std::fs::write(&path, without).unwrap();
    let out = run(bin().arg("train").arg(&path).args(["--quiet", "--out"]).arg(plain.join("run")).args(short(&[])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hash(&alone), hash(&plain.join("run")), "alpha = 0 differs from cross-entropy");
    assert_ne!(hash(&alone), hash(&distilled), "the teacher changed nothing");

    // A missing teacher, and one trained on differently normalised data, are named.
    let (out, _) = student("distill-missing", &["distill.teacher=/nonexistent/model.safetensors"], 1);
    assert!(!out.status.success() && stderr(&out).contains("/nonexistent/model.safetensors"), "{}", stderr(&out));
    let (out, _) = student("distill-norm", &["data.normalize=min_max"], 1);
    assert!(!out.status.success() && stderr(&out).contains("normalised"), "{}", stderr(&out));
}
