//! The run directory: job.toml (resolved spec), metrics.jsonl, summary.json.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_kernels::Backend;
use lockstep_proto::{JobSpec, MetricsLine, Summary};
use lockstep_worker::{run_training, NoReduce, RunEvent, RunOptions};
use std::io::Write;
use std::path::Path;

/// Appends metrics lines and drives the progress bar.
pub struct RunWriter {
    metrics: std::io::BufWriter<std::fs::File>,
    bar: ProgressBar,
}

impl RunWriter {
    pub fn create(dir: &Path, spec: &JobSpec, progress: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating run directory {}", dir.display()))?;
        std::fs::write(dir.join("job.toml"), spec.to_toml())
            .with_context(|| format!("writing {}/job.toml", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let bar = if progress { ProgressBar::new(0) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Ok(Self { metrics: std::io::BufWriter::new(file), bar })
    }

    pub fn event(&mut self, event: RunEvent) -> Result<()> {
        match event {
            RunEvent::Start { total_steps, params, flops_per_example } => {
                self.bar.set_length(total_steps);
                tracing::info!(params, flops_per_example, total_steps, "model built");
            }
            RunEvent::Step { step, loss, record } => {
                self.bar.set_position(step);
                if let Some(record) = record {
                    self.bar.set_message(format!("loss {:.4}  {:.0} ex/s", loss, record.examples_per_s));
                    self.write(&MetricsLine::Train(record))?;
                }
            }
            RunEvent::Eval(record) => {
                let line = format!(
                    "epoch {} step {}: test loss {:.4} accuracy {:.2}%",
                    record.epoch,
                    record.step,
                    record.loss,
                    record.accuracy * 100.0
                );
                if self.bar.is_hidden() {
                    tracing::info!("{line}");
                } else {
                    self.bar.println(line);
                }
                self.write(&MetricsLine::Eval(record))?;
            }
        }
        Ok(())
    }

    fn write(&mut self, line: &MetricsLine) -> Result<()> {
        serde_json::to_writer(&mut self.metrics, line)?;
        self.metrics.write_all(b"\n")?;
        self.metrics.flush()?;
        Ok(())
    }

    pub fn finish(mut self, dir: &Path, summary: &Summary) -> Result<()> {
        self.bar.finish_and_clear();
        self.metrics.flush()?;
        let path = dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{}: {} steps in {:.1}s, {:.0} examples/s, {} params, test loss {:.4}, test accuracy {:.2}%  -> {}",
            summary.name,
            summary.steps,
            summary.wall_s,
            summary.examples_per_s,
            summary.params,
            summary.test_loss,
            summary.test_accuracy * 100.0,
            dir.display()
        );
        Ok(())
    }
}

/// `lockstep train`: one process, world size 1.
pub fn train_single<B: Backend>(be: B, spec: &JobSpec, dir: &Path, progress: bool) -> Result<()> {
    let mut writer = RunWriter::create(dir, spec, progress)?;
    let mut write_error = None;
    let (summary, _) = run_training(be, spec, RunOptions::default(), &mut NoReduce, &mut |event| {
        if let Err(e) = writer.event(event) {
            write_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    writer.finish(dir, &summary)
}
