//! GANs end to end (T43): configs/mnist-gan.toml trains on one process and on two
//! data-parallel workers with both losses in the metrics; `lockstep sample` draws a PNG
//! grid and runs a classifier over the digits; a discriminator of the wrong width is named.

mod common;
use common::*;

fn short() -> Vec<String> {
    ["train.max_steps=12", "data.train_limit=1024", "data.test_limit=128", "train.log_every=4"]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

fn train(workers: usize, name: &str) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let mut cmd = bin();
    match workers {
        1 => cmd.arg("train"),
        n => cmd.args(["local", "--workers", &n.to_string()]),
    };
    let out = run(cmd.args(["configs/mnist-gan.toml", "--quiet", "--out"]).arg(&dir).args(short()));
    assert!(out.status.success(), "{}", stderr(&out));
    dir
}

/// The named part `name` of every training record in `dir`'s metrics.
fn parts(dir: &std::path::Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let train = records.filter(|r| r["kind"] == "train");
    let part = |r: serde_json::Value| {
        let parts = r["parts"].as_array().cloned().unwrap_or_default();
        parts.iter().find(|p| p["name"] == name).and_then(|p| p["value"].as_f64())
    };
    train.map(|r| part(r).unwrap_or_else(|| panic!("a training record without {name}"))).collect()
}

#[test]
fn a_gan_trains_on_one_and_two_workers_and_samples_digits() {
    let single = train(1, "gan-single");
    let dp = train(2, "gan-dp");
    for dir in [&single, &dp] {
        let (d, g) = (parts(dir, "d_loss"), parts(dir, "g_loss"));
        assert_eq!((d.len(), g.len()), (3, 3), "steps 4, 8, 12");
        assert!(d.iter().chain(&g).all(|v| v.is_finite() && *v > 0.0), "d {d:?} g {g:?}");
        let s = summary(dir);
        assert_eq!(s["steps"], 12);
        // The evaluation is the discriminator's accuracy on real test digits and fakes.
        let accuracy = s["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{s}");
    }
    // Both ranks ended with the same weights (the coordinator compares them).
    let hashes = summary(&dp)["rank_weight_hashes"].as_array().cloned().unwrap_or_default();
    assert!(hashes.len() == 2 && hashes[0] == hashes[1], "{hashes:?}");
    let out = run(bin().args(["plot"]).arg(&dp).arg("--output").arg(dp.join("curves.png")));
    assert!(out.status.success() && dp.join("curves.png").exists(), "{}", stderr(&out));

    // The grid: 10 images of 28x28 in 4 columns and 3 rows, 2 pixels apart.
    let grid = dp.join("digits.png");
    let model = dp.join("model.safetensors");
    let out = run(bin().arg("sample").arg(&model).args(["--count", "10", "--out"]).arg(&grid));
    assert!(out.status.success(), "{}", stderr(&out));
    let png = std::fs::read(&grid).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let (width, height) =
        (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert_eq!((width, height), (4 * 30 + 2, 3 * 30 + 2));
    // The same seed draws the same digits.
    let again = dp.join("again.png");
    let out = run(bin().arg("sample").arg(&model).args(["--count", "10", "--out"]).arg(&again));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&again).unwrap(), png);

    // A classifier's verdict: a briefly trained MLP, over 50 generated digits.
    let classifier = temp_dir("gan-classifier");
    let out = run(bin().args(["train", "configs/mnist-mlp.toml", "--quiet", "--out"]).arg(&classifier).args([
        "--set",
        "train.max_steps=10",
        "--set",
        "data.train_limit=1000",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(bin()
        .arg("sample")
        .arg(&model)
        .args(["--count", "50", "--out"])
        .arg(dp.join("fifty.png"))
        .arg("--classifier")
        .arg(classifier.join("model.safetensors")));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout.contains("of 50 images") && stdout.contains("predicted classes: 0: "), "{stdout}");
}

#[test]
fn a_discriminator_must_end_in_two_logits() {
    let dir = temp_dir("gan-bad");
    let config = std::fs::read_to_string(repo().join("configs/mnist-gan.toml")).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, config.replace("{ type = \"linear\", out = 2 },", "{ type = \"linear\", out = 3 },"))
        .unwrap();
    let out = run(bin().arg("train").arg(&path).args(["--quiet", "--out"]).arg(dir.join("run")).args(short()));
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("model.discriminator outputs [3]"), "{err}");
}
