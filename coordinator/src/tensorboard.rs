//! TensorBoard event files (`events.out.tfevents.*` in the run directory): scalars and
//! histograms as `tensorflow.Event` protos in TFRecord framing, which the `tensorboard`
//! package reads (tests/observability.rs checks that with the real package).
//!
//! TFRecord: u64 length (LE), u32 masked CRC-32C of the length bytes, the payload, u32
//! masked CRC-32C of the payload; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.

use lockstep_proto::Histogram;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `tensorflow.Event` (event.proto), with its `what` oneof written as optional fields:
/// on the wire a oneof member and an optional field are the same thing.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "5")]
    histo: Option<HistogramProto>,
}

#[derive(Clone, PartialEq, Message)]
struct HistogramProto {
    #[prost(double, tag = "1")]
    min: f64,
    #[prost(double, tag = "2")]
    max: f64,
    #[prost(double, tag = "3")]
    num: f64,
    #[prost(double, tag = "4")]
    sum: f64,
    #[prost(double, tag = "5")]
    sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    bucket: Vec<f64>,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `payload`.
fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (a resumed run adds a second file: TensorBoard reads all).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let host = lockstep_proto::hostname();
        let secs = wall_time() as u64;
        let mut path = dir.join(format!("events.out.tfevents.{secs}.{host}"));
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{secs}.{host}.{n}"));
            n += 1;
        }
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut writer = Self { path, file };
        let version =
            Event { wall_time: wall_time(), step: 0, file_version: Some("brain.Event:2".into()), summary: None };
        writer.write(&version)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        self.file.write_all(&record(&event.encode_to_vec()))?;
        self.file.flush()
    }

    fn summary(&mut self, step: u64, value: Vec<SummaryValue>) -> std::io::Result<()> {
        let event =
            Event { wall_time: wall_time(), step: step as i64, file_version: None, summary: Some(Summary { value }) };
        self.write(&event)
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> std::io::Result<()> {
        // Non-finite values go in as they are: TensorBoard marks a NaN or infinite loss
        // instead of silently missing the step where a run blew up.
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue { tag: tag.clone(), simple_value: Some(*v as f32), histo: None })
            .collect();
        self.summary(step, value)
    }

    pub fn histograms(&mut self, step: u64, histograms: &[(String, Histogram)]) -> std::io::Result<()> {
        let value = histograms
            .iter()
            .map(|(tag, h)| SummaryValue {
                tag: tag.clone(),
                simple_value: None,
                histo: Some(HistogramProto {
                    min: h.min,
                    max: h.max,
                    num: h.num,
                    sum: h.sum,
                    sum_squares: h.sum_squares,
                    bucket_limit: h.bucket_limits.clone(),
                    bucket: h.bucket_counts.clone(),
                }),
            })
            .collect();
        self.summary(step, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc32c_matches_tensorflow() {
        // CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720); TensorFlow's
        // masked form of it is computed by hand below.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(masked_crc(b"123456789"), c.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_frame_and_checksum_the_payload() {
        let dir = std::env::temp_dir().join(format!("lockstep-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(3, &[("train/loss".into(), 0.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Walk the records: every length and payload checksum must verify.
        let (mut at, mut events) = (0, Vec::new());
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let payload = &bytes[at + 12..at + 12 + len];
            assert_eq!(
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()),
                masked_crc(payload)
            );
            events.push(Event::decode(payload).unwrap());
            at += 16 + len;
        }
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let value = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((events[1].step, value.tag.as_str(), value.simple_value), (3, "train/loss", Some(0.5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
