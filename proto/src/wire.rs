//! Control-plane messages and their framing. A frame is a little-endian u32 payload length
//! followed by a bincode-2 payload. The length is checked against a maximum *before*
//! anything is allocated, and a payload that does not decode is an error, never a panic.

use crate::trace::TraceSpan;
use crate::{EvalRecord, Histogram, Summary, TrainRecord};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped on any incompatible change of these messages.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest control-plane frame (a job spec, a summary): far above any real message.
pub const MAX_FRAME_BYTES: u32 = 4 << 20;

/// Worker -> coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
// Done and Eval carry a run's metrics; they are rare (once per evaluation / run), so the
// size of the enum costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum ToCoordinator {
    /// Every rank stopped after `step` because of a preemption signal; rank 0 wrote the
    /// checkpoint `checkpoint` (if it has a checkpoint directory).
    Preempted {
        rank: usize,
        step: u64,
        checkpoint: Option<String>,
    },
    /// First message on a connection.
    Hello {
        version: u32,
        token: String,
        host: String,
        /// Which ranks share memory with this one: equal ids are one host (hostname, boot
        /// id and network namespace, so the netns test hosts differ).
        host_id: String,
        pid: u32,
        /// Where this worker's data-plane endpoint listens (its ring neighbour connects here).
        data_addr: String,
        /// SHA-256 of this worker's data-plane certificate (hex), pinned by its neighbours.
        fingerprint: String,
        /// The rank this worker was launched as (RANK, from a launcher), if any.
        rank: Option<usize>,
        /// The world size it was launched into (WORLD_SIZE), checked against the job's.
        world_size: Option<usize>,
        /// Its index among the workers of its host (LOCAL_RANK).
        local_rank: Option<usize>,
    },
    /// First message of `lockstep status`: asks for a [`ClusterStatus`], then closes.
    StatusQuery {
        version: u32,
        token: String,
    },
    /// Model built: the initial weights' hash, compared across ranks before step 0.
    Ready {
        rank: usize,
        init_weight_hash: u64,
        /// Steps the run will take (for progress and status).
        total_steps: u64,
    },
    /// Every `log_every` steps, from every rank (hashes compared across ranks).
    Step {
        rank: usize,
        record: TrainRecord,
        weight_hash: u64,
        /// Per-layer histograms of the batch-mean gradient (rank 0 only; TensorBoard).
        grad_histograms: Vec<(String, Histogram)>,
    },
    /// At most twice a second from every rank while training: the status table's row.
    Progress {
        rank: usize,
        step: u64,
        examples_per_s: f64,
        /// Share of wall time the compute thread waited on communication, since the last report.
        comm_share: f64,
    },
    /// Timeline spans (sent in chunks before `Done` when the task asked for a trace).
    Trace {
        rank: usize,
        spans: Vec<TraceSpan>,
    },
    /// Log lines this rank wrote during the task (for RUN_DIR/logs/rank-R.log).
    Log {
        rank: usize,
        text: String,
    },
    Eval {
        rank: usize,
        record: EvalRecord,
    },
    Done {
        rank: usize,
        summary: Summary,
    },
    Failed {
        rank: usize,
        error: String,
    },
    /// Result of `lockstep bench allreduce` on this rank.
    BenchResult {
        rank: usize,
        results: Vec<AllReduceTiming>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllReduceTiming {
    pub bytes: u64,
    pub median_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    pub rank: usize,
    pub data_addr: String,
    pub fingerprint: String,
    /// The rank's host identity (see `ToCoordinator::Hello`).
    pub host_id: String,
}

/// What a worker is asked to do once the group has formed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Task {
    /// Train the job (TOML text of the resolved spec).
    Train {
        job_toml: String,
        threads: usize,
        bucket_bytes: u64,
        /// Where rank 0 writes the final weights (safetensors), if anywhere.
        weights_path: Option<String>,
        /// Where rank 0 writes training checkpoints, if anywhere.
        checkpoint_dir: Option<String>,
        /// Every rank restores this checkpoint before step 0 (a path all ranks can read).
        resume_path: Option<String>,
        /// Record timeline spans and send them before `Done`.
        trace: bool,
    },
    /// Time ring all-reduces of these sizes.
    BenchAllReduce { sizes: Vec<u64>, iters: usize, transport: crate::toolbox::Transport },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assign {
    pub rank: usize,
    pub world: usize,
    pub seed: u64,
    /// Every rank's data-plane address and certificate fingerprint, by rank.
    pub peers: Vec<PeerInfo>,
    /// A fresh random secret of this group (hex), shared over the authenticated control
    /// plane: ranks of one host prove it to each other before sharing memory.
    pub group_secret: String,
    pub task: Task,
}

/// Coordinator -> worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ToWorker {
    Welcome {
        worker_id: u64,
    },
    Rejected {
        reason: String,
    },
    Assign(Assign),
    /// All ranks reported identical initial weights: begin step 0.
    Start,
    /// Abort the current task (another rank failed).
    Abort {
        reason: String,
    },
    /// The run is over; a daemon without `--once` waits for the next job.
    Shutdown,
    /// The coordinator was told to stop (SIGTERM/SIGINT): finish the current step, vote to
    /// stop, checkpoint, report `Preempted`.
    Preempt {
        signal: i32,
    },
    /// The answer to a `StatusQuery`.
    Status(ClusterStatus),
    /// Workers are waiting to join (elastic scale-up): finish the current step, vote to
    /// stop, checkpoint, report `Preempted`, then re-join; the group re-forms larger.
    Rescale,
}

/// What `lockstep status` prints: the run and one row per rank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClusterStatus {
    pub job: String,
    /// "waiting for workers", "training", "finished", "failed: ...", "re-forming".
    pub state: String,
    pub total_steps: u64,
    pub uptime_s: f64,
    pub ranks: Vec<RankStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RankStatus {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    /// "joined", "training", "done", "failed", "lost".
    pub state: String,
    pub step: u64,
    /// Seconds since the coordinator last heard from this rank.
    pub since_heard_s: f64,
    pub examples_per_s: f64,
    pub comm_share: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed frame ({len} bytes): {message}")]
    Malformed { len: u32, message: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME_BYTES as usize }>()
}

/// Encodes one frame (length prefix + payload).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut payload = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| FrameError::Malformed { len: 0, message: e.to_string() })?;
    let len = payload.len() as u32;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    let mut frame = len.to_le_bytes().to_vec();
    frame.append(&mut payload);
    Ok(frame)
}

/// Decodes a frame's payload. The whole payload must be consumed.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let len = payload.len() as u32;
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Malformed { len, message: e.to_string() })?;
    if used != payload.len() {
        return Err(FrameError::Malformed { len, message: format!("{} trailing bytes", payload.len() - used) });
    }
    Ok(msg)
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?).await?;
    Ok(())
}

/// Reads one frame. A clean end of stream before the length prefix is `Closed`.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut len_bytes = [0u8; 4];
    match r.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            FrameError::Malformed { len, message: "stream ended inside the payload".into() }
        }
        _ => e.into(),
    })?;
    decode_payload(&payload)
}

/// Constant-time comparison of cluster tokens (no early exit on the first differing byte).
pub fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ToCoordinator {
        ToCoordinator::Hello {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            host: "h".into(),
            host_id: "h/b/net:1".into(),
            pid: 1,
            data_addr: "127.0.0.1:1".into(),
            fingerprint: "ab".into(),
            rank: Some(2),
            world_size: Some(4),
            local_rank: None,
        }
    }

    fn progress() -> ToCoordinator {
        ToCoordinator::Progress { rank: 3, step: 9, examples_per_s: 1.5, comm_share: 0.25 }
    }

    #[tokio::test]
    async fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello()).await.unwrap();
        write_frame(&mut buf, &progress()).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, ToCoordinator>(&mut r).await.unwrap(), hello());
        assert_eq!(read_frame::<_, ToCoordinator>(&mut r).await.unwrap(), progress());
        assert!(matches!(read_frame::<_, ToCoordinator>(&mut r).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn oversized_frame_rejected_without_allocating() {
        let buf = u32::MAX.to_le_bytes();
        let err = read_frame::<_, ToCoordinator>(&mut &buf[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: u32::MAX, .. }), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let mut buf = 16u32.to_le_bytes().to_vec();
        buf.extend([0xff; 16]);
        assert!(matches!(read_frame::<_, ToCoordinator>(&mut &buf[..]).await, Err(FrameError::Malformed { .. })));
        let good = encode_frame(&hello()).unwrap();
        let cut = &good[..good.len() - 3];
        let err = read_frame::<_, ToCoordinator>(&mut &cut[..]).await.unwrap_err();
        assert!(err.to_string().contains("ended inside"), "{err}");
        // A valid frame with extra bytes inside the declared length.
        let mut padded = good[4..].to_vec();
        padded.push(0);
        assert!(decode_payload::<ToCoordinator>(&padded).unwrap_err().to_string().contains("trailing"));
        // Every prefix of a valid frame fails cleanly; every byte flip fails or decodes, never panics.
        for n in 0..good.len() {
            let _ = read_frame::<_, ToCoordinator>(&mut &good[..n]).await;
        }
        for i in 4..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x5a;
            let _ = read_frame::<_, ToCoordinator>(&mut &flipped[..]).await;
        }
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert!(!tokens_equal("", "a"));
    }
}
