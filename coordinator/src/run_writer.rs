//! The run directory: job.toml (resolved spec), metrics.jsonl, TensorBoard event files,
//! per-rank logs (logs/rank-R.log), the trace (`--trace`) and summary.json.

use crate::tensorboard::EventWriter;
use crate::{CoordError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_proto::trace::{chrome_trace, TraceSpan};
use lockstep_proto::{EvalRecord, Histogram, JobSpec, MetricsLine, Summary, TrainRecord};
use std::io::Write;
use std::path::{Path, PathBuf};

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> CoordError {
    move |source| CoordError::Io { what, source }
}

/// The progress bar on the screen, if any: log lines written to stderr while it is drawn
/// go through [`BelowBar`], which takes the bar off the screen for the line and redraws it
/// after, so the two never tear each other.
static ACTIVE_BAR: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);

fn set_active_bar(bar: Option<ProgressBar>) {
    if let Ok(mut active) = ACTIVE_BAR.lock() {
        *active = bar;
    }
}

/// A writer that writes to `sink` with the active progress bar suspended:
/// `fmt::layer().with_writer(|| BelowBar(std::io::stderr()))` (tracing writes one event per
/// `write_all`).
pub struct BelowBar<W: Write>(pub W);

impl<W: Write> Write for BelowBar<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| self.0.write_all(bytes)).map(|()| bytes.len()),
            None => self.0.write(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Appends metrics lines and drives the progress bar.
pub struct RunWriter {
    dir: PathBuf,
    metrics: std::io::BufWriter<std::fs::File>,
    events: EventWriter,
    bar: ProgressBar,
    job_name: String,
}

impl Drop for RunWriter {
    fn drop(&mut self) {
        set_active_bar(None);
    }
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
        if progress {
            set_active_bar(Some(bar.clone()));
        }
        let events = EventWriter::create(dir)
            .map_err(io_err(format!("creating a TensorBoard event file in {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics: std::io::BufWriter::new(file),
            events,
            bar,
            job_name: spec.name.clone(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn job_name(&self) -> &str {
        &self.job_name
    }

    pub fn set_total_steps(&mut self, total_steps: u64) {
        self.bar.set_length(total_steps);
    }

    pub fn start(&mut self, total_steps: u64, params: usize, flops_per_example: u64) {
        self.bar.set_length(total_steps);
        tracing::info!(params, flops_per_example, total_steps, "model built");
    }

    pub fn progress(&mut self, step: u64) {
        self.bar.set_position(step);
    }

    /// A logged step: metrics.jsonl, TensorBoard scalars and (if given) gradient histograms.
    pub fn train(&mut self, record: TrainRecord, grad_histograms: &[(String, Histogram)]) -> Result<()> {
        self.bar.set_position(record.step);
        self.bar.set_message(format!("loss {:.4}  {:.0} ex/s", record.loss, record.examples_per_s));
        let mut scalars = vec![
            ("train/loss".to_string(), record.loss),
            ("train/lr".to_string(), record.lr),
            ("train/grad_norm".to_string(), record.grad_norm),
            ("train/examples_per_s".to_string(), record.examples_per_s),
        ];
        scalars.extend(record.layer_grad_norms.iter().map(|l| (format!("grad_norm/{}", l.layer), l.norm)));
        if let (Some(first), Some(last)) = (record.layer_grad_norms.first(), record.layer_grad_norms.last()) {
            if record.layer_grad_norms.len() >= 2 && last.norm > 0.0 {
                scalars.push(("train/grad_norm_ratio_first_last".to_string(), first.norm / last.norm));
            }
        }
        let what = format!("writing {}", self.events.path().display());
        self.events.scalars(record.step, &scalars).map_err(io_err(what.clone()))?;
        if !grad_histograms.is_empty() {
            let tagged: Vec<(String, Histogram)> =
                grad_histograms.iter().map(|(layer, h)| (format!("grad/{layer}"), h.clone())).collect();
            self.events.histograms(record.step, &tagged).map_err(io_err(what))?;
        }
        self.write(&MetricsLine::Train(record))
    }

    /// Appends `text` to logs/rank-R.log.
    pub fn rank_log(&mut self, rank: usize, text: &str) -> Result<()> {
        let dir = self.dir.join("logs");
        let path = dir.join(format!("rank-{rank}.log"));
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::OpenOptions::new().create(true).append(true).open(&path))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io_err(format!("writing {}", path.display())))
    }

    /// Writes the Chrome trace of every rank's spans `(rank, host, spans)` to `path`.
    pub fn write_trace(&self, path: &Path, ranks: &[(usize, String, Vec<TraceSpan>)]) -> Result<()> {
        let json = chrome_trace(ranks);
        let text = serde_json::to_string(&json)?;
        std::fs::write(path, text).map_err(io_err(format!("writing trace {}", path.display())))?;
        let spans: usize = ranks.iter().map(|(_, _, s)| s.len()).sum();
        tracing::info!("trace of {} ranks ({spans} spans) written to {}", ranks.len(), path.display());
        if let Some(b) = lockstep_proto::trace::comm_breakdown(ranks) {
            tracing::info!(
                "over {} steps: communication after the last rank's backward {:.1}% of the step, \
                 ranks waiting for slower ones {:.1}%",
                b.steps,
                b.exposed * 100.0,
                b.imbalance * 100.0
            );
        }
        Ok(())
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
        let scalars =
            [(format!("{}/loss", record.split), record.loss), (format!("{}/accuracy", record.split), record.accuracy)];
        let what = format!("writing {}", self.events.path().display());
        self.events.scalars(record.step, &scalars).map_err(io_err(what))?;
        self.write(&MetricsLine::Eval(record))
    }

    fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        let what = format!("writing {}/metrics.jsonl", self.dir.display());
        self.metrics.write_all(text.as_bytes()).and_then(|_| self.metrics.flush()).map_err(io_err(what))
    }

    pub fn finish(mut self, summary: &Summary) -> Result<()> {
        self.bar.finish_and_clear();
        let dir = self.dir.clone();
        self.metrics.flush().map_err(io_err(format!("writing {}/metrics.jsonl", dir.display())))?;
        let path = dir.join("summary.json");
        let text = serde_json::to_string_pretty(summary)? + "\n";
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

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::{InMemoryTerm, ProgressDrawTarget};

    /// Records what the terminal showed at the moment each line was written.
    struct ScreenAtWrite(InMemoryTerm, Vec<String>);

    impl Write for ScreenAtWrite {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.1.push(self.0.contents());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_are_written_with_the_bar_off_the_screen() {
        let term = InMemoryTerm::new(10, 100);
        let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::term_like(Box::new(term.clone())));
        bar.set_style(ProgressStyle::with_template("{bar:20} {pos}/{len} steps").unwrap());
        bar.set_position(40);
        bar.tick();
        assert!(term.contents().contains("40/100 steps"), "the bar is drawn: {:?}", term.contents());
        set_active_bar(Some(bar.clone()));
        let mut log = BelowBar(ScreenAtWrite(term.clone(), Vec::new()));
        log.write_all(b"2026-12-01T00:00:00Z  INFO a log line\n").unwrap();
        assert_eq!(log.0 .1, vec![String::new()], "the bar was on the screen while the line was written");
        assert!(term.contents().contains("40/100 steps"), "the bar is back: {:?}", term.contents());
        set_active_bar(None);
        let mut plain = BelowBar(ScreenAtWrite(term.clone(), Vec::new()));
        plain.write_all(b"no bar\n").unwrap();
        assert_eq!(plain.0 .1.len(), 1);
    }
}
