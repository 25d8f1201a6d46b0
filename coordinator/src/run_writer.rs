//! The run directory: job.toml (resolved spec), metrics.jsonl, summary.json.

use crate::{CoordError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_proto::{EvalRecord, JobSpec, MetricsLine, Summary, TrainRecord};
use std::io::Write;
use std::path::{Path, PathBuf};

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> CoordError {
    move |source| CoordError::Io { what, source }
}

/// Appends metrics lines and drives the progress bar.
pub struct RunWriter {
    dir: PathBuf,
    metrics: std::io::BufWriter<std::fs::File>,
    bar: ProgressBar,
}

impl RunWriter {
    pub fn create(dir: &Path, spec: &JobSpec, progress: bool) -> Result<Self> {
        Self::open(dir, spec, progress, false)
    }

    /// `append`: a resumed run adds to the existing metrics.jsonl instead of replacing it.
    pub fn open(dir: &Path, spec: &JobSpec, progress: bool, append: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating run directory {}", dir.display())))?;
        std::fs::write(dir.join("job.toml"), spec.to_toml())
            .map_err(io_err(format!("writing {}/job.toml", dir.display())))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let bar = if progress { ProgressBar::new(0) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Ok(Self { dir: dir.to_path_buf(), metrics: std::io::BufWriter::new(file), bar })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn start(&mut self, total_steps: u64, params: usize, flops_per_example: u64) {
        self.bar.set_length(total_steps);
        tracing::info!(params, flops_per_example, total_steps, "model built");
    }

    pub fn progress(&mut self, step: u64) {
        self.bar.set_position(step);
    }

    pub fn train(&mut self, record: TrainRecord) -> Result<()> {
        self.bar.set_position(record.step);
        self.bar.set_message(format!("loss {:.4}  {:.0} ex/s", record.loss, record.examples_per_s));
        self.write(&MetricsLine::Train(record))
    }

    pub fn eval(&mut self, record: EvalRecord) -> Result<()> {
        let line = format!(
            "epoch {} step {}: {} loss {:.4} accuracy {:.2}%",
            record.epoch,
            record.step,
            record.split,
            record.loss,
            record.accuracy * 100.0
        );
        if self.bar.is_hidden() {
            tracing::info!("{line}");
        } else {
            self.bar.println(line);
        }
        self.write(&MetricsLine::Eval(record))
    }

    fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let mut text = serde_json::to_string(line).map_err(|e| CoordError::Protocol(e.to_string()))?;
        text.push('\n');
        let what = format!("writing {}/metrics.jsonl", self.dir.display());
        self.metrics.write_all(text.as_bytes()).and_then(|_| self.metrics.flush()).map_err(io_err(what))
    }

    pub fn finish(mut self, summary: &Summary) -> Result<()> {
        self.bar.finish_and_clear();
        let dir = self.dir.clone();
        self.metrics.flush().map_err(io_err(format!("writing {}/metrics.jsonl", dir.display())))?;
        let path = dir.join("summary.json");
        let text = serde_json::to_string_pretty(summary).map_err(|e| CoordError::Protocol(e.to_string()))? + "\n";
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
        // A closed stdout (a pipe whose reader went away) must not fail the run.
        let _ = writeln!(
            std::io::stdout(),
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
