//! `lockstep plot RUN_DIR`: the run's curves as a PNG, from its metrics.jsonl: training and
//! test loss, test accuracy and the learning rate, against the step.

use anyhow::{bail, Context, Result};
use lockstep_proto::MetricsLine;
use plotters::prelude::*;
use std::path::Path;

/// The series of one run.
#[derive(Default)]
struct Curves {
    train_loss: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
    test_loss: Vec<(f64, f64)>,
    test_accuracy: Vec<(f64, f64)>,
    /// Losses of a step's parts (a GAN's d_loss and g_loss), by name.
    part_losses: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
}

fn read_curves(metrics: &Path) -> Result<Curves> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let mut curves = Curves::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let parsed: MetricsLine = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a metrics line", metrics.display(), i + 1))?;
        match parsed {
            MetricsLine::Train(r) => {
                curves.train_loss.push((r.step as f64, r.loss));
                curves.lr.push((r.step as f64, r.lr));
                for part in r.parts.iter().filter(|p| p.name.ends_with("_loss")) {
                    curves.part_losses.entry(part.name.clone()).or_default().push((r.step as f64, part.value));
                }
            }
            MetricsLine::Eval(r) => {
                curves.test_loss.push((r.step as f64, r.loss));
                curves.test_accuracy.push((r.step as f64, r.accuracy * 100.0));
            }
        }
    }
    if curves.train_loss.is_empty() && curves.test_loss.is_empty() {
        bail!("{} holds no training or evaluation records", metrics.display());
    }
    Ok(curves)
}

/// The finite range of `values` with a little margin (a flat series gets a unit span).
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

pub fn plot_run(run_dir: &Path, output: &Path) -> Result<()> {
    let curves = read_curves(&run_dir.join("metrics.jsonl"))?;
    let name = run_dir.file_name().map_or("run".into(), |n| n.to_string_lossy().to_string());
    // The font travels with the binary: a fresh machine may have none installed.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    draw(&curves, &name, output).map_err(|e| anyhow::anyhow!("drawing {}: {e}", output.display()))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

type Panel<'a> = ChartContext<
    'a,
    BitMapBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One panel: its caption, steps 0..last_step across, `y` up.
fn panel<'a>(
    area: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    last_step: f64,
    y: std::ops::Range<f64>,
) -> std::result::Result<Panel<'a>, Box<dyn std::error::Error>> {
    Ok(ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last_step, y)?)
}

fn draw(c: &Curves, name: &str, output: &Path) -> DrawResult {
    let root = BitMapBackend::new(output, (1200, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&format!("lockstep run {name}"), ("sans-serif", 28))?;
    let panels = root.split_evenly((3, 1));
    let last_step = c.train_loss.iter().chain(&c.test_loss).map(|p| p.0).fold(1.0, f64::max);

    // A run with part losses (a GAN) draws those instead of the one training loss.
    let train: Vec<(String, &[(f64, f64)])> = match c.part_losses.is_empty() {
        true => vec![("train".into(), &c.train_loss)],
        false => c.part_losses.iter().map(|(name, points)| (format!("train {name}"), points.as_slice())).collect(),
    };
    let (lo, hi) = span(train.iter().flat_map(|(_, p)| p.iter()).chain(&c.test_loss).map(|p| p.1));
    let mut loss = panel(&panels[0], "loss", last_step, lo..hi)?;
    loss.configure_mesh().x_desc("step").x_label_formatter(&|v| format!("{v:.0}")).draw()?;
    for ((label, points), color) in train.into_iter().zip([BLUE, CYAN, BLACK, YELLOW].into_iter().cycle()) {
        loss.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    loss.draw_series(LineSeries::new(c.test_loss.iter().copied(), RED.stroke_width(2)))?
        .label("test")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    loss.draw_series(c.test_loss.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    loss.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;

    let (lo, hi) = span(c.test_accuracy.iter().map(|p| p.1));
    let mut accuracy = panel(&panels[1], "test accuracy (%)", last_step, lo..hi)?;
    accuracy.configure_mesh().x_desc("step").x_label_formatter(&|v| format!("{v:.0}")).draw()?;
    accuracy.draw_series(LineSeries::new(c.test_accuracy.iter().copied(), GREEN.stroke_width(2)))?;
    accuracy.draw_series(c.test_accuracy.iter().map(|&p| Circle::new(p, 3, GREEN.filled())))?;

    let (_, hi) = span(c.lr.iter().map(|p| p.1));
    let mut lr = panel(&panels[2], "learning rate", last_step, 0.0..hi.max(1e-12))?;
    lr.configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    lr.draw_series(LineSeries::new(c.lr.iter().copied(), MAGENTA.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
