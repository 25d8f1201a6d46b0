use lockstep_collective::shm::{ShmComm, ShmGroupSpec, DEFAULT_SUB_LEN};
use lockstep_collective::Communicator;
use std::time::{Duration, Instant};
fn main() {
    let world: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let sub: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(DEFAULT_SUB_LEN);
    let threads: Vec<_> = (0..world)
        .map(|m| {
            std::thread::spawn(move || {
                let spec = ShmGroupSpec {
                    secret: b"x".to_vec(),
                    group: format!("probe{}", std::process::id()),
                    member: m,
                    ranks: (0..world).collect(),
                    timeout: Duration::from_secs(30),
                    sub_len: sub,
                };
                let mut c = ShmComm::connect(&spec).unwrap();
                let mut out = Vec::new();
                for bytes in [1usize << 20, 4 << 20, 16 << 20, 64 << 20] {
                    let mut buf = vec![1.0f32; bytes / 4];
                    let mut times = Vec::new();
                    for i in 0..21 {
                        c.barrier().unwrap();
                        let t = Instant::now();
                        c.all_reduce_sum(&mut buf).unwrap();
                        if i > 0 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    times.sort_by(f64::total_cmp);
                    out.push((bytes, times[10], times[0]));
                }
                out
            })
        })
        .collect();
    let res: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, &(bytes, _, _)) in res[0].iter().enumerate() {
        let med = res.iter().map(|r| r[i].1).fold(0.0, f64::max);
        let best = res.iter().map(|r| r[i].2).fold(0.0, f64::max);
        let f = 2.0 * (world as f64 - 1.0) / world as f64;
        println!(
            "{bytes:>10} median {:.3} ms busbw {:.2} GB/s   best {:.2}",
            med * 1e3,
            bytes as f64 / med * f / 1e9,
            bytes as f64 / best * f / 1e9
        );
    }
}
