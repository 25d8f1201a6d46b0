//! `lockstep-linkem`: a userspace link emulator for test hosts made of network namespaces,
//! for kernels without `sch_netem` (`tc qdisc add ... netem` fails with "Specified qdisc
//! kind is unknown"). It gives each namespace a TUN interface and forwards IPv4 packets
//! between them, dropping each with probability `--loss` and delivering the rest
//! `--delay-ms` later (one-way, like netem's `delay` on each egress).
//!
//! ```text
//! lockstep-linkem --delay-ms 20 --loss 0.005 ls0=10.77.0.1 ls1=10.77.0.2 ...
//! ```
//! The interfaces (`lk<namespace>`) live while this process does; scripts/netns-cluster.sh
//! starts it in the background and kills it on `down`.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

struct Options {
    delay: Duration,
    loss: f64,
    seed: u64,
    mtu: u32,
    hosts: Vec<(String, Ipv4Addr)>,
}

fn parse_args() -> Result<Options> {
    let mut opts = Options { delay: Duration::ZERO, loss: 0.0, seed: 1, mtu: 9000, hosts: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--delay-ms" => opts.delay = Duration::from_secs_f64(value("--delay-ms")?.parse::<f64>()? / 1e3),
            "--loss" => opts.loss = value("--loss")?.parse()?,
            "--seed" => opts.seed = value("--seed")?.parse()?,
            "--mtu" => opts.mtu = value("--mtu")?.parse()?,
            host => {
                let (ns, ip) =
                    host.split_once('=').with_context(|| format!("expected NAMESPACE=IPV4, got {host:?}"))?;
                // The TUN interface is named after it (15 bytes at most): ASCII names only.
                let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
                if ns.is_empty() || !ns.chars().all(valid) {
                    bail!("namespace name {ns:?} in {host:?}: use ASCII letters, digits, '-', '_' or '.'");
                }
                opts.hosts.push((ns.to_string(), ip.parse().with_context(|| format!("bad IPv4 address in {host:?}"))?));
            }
        }
    }
    if !(0.0..1.0).contains(&opts.loss) {
        bail!("--loss must be in [0, 1), got {}", opts.loss);
    }
    if opts.hosts.len() < 2 {
        bail!("usage: lockstep-linkem [--delay-ms MS] [--loss P] [--seed S] [--mtu BYTES] NS=IP NS=IP...");
    }
    Ok(opts)
}

/// Opens a TUN interface named `name` in this (the root) namespace.
fn open_tun(name: &str) -> Result<File> {
    let file =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    // IFNAMSIZ is 16 with the NUL: longer names are cut (parse_args admits ASCII only).
    let bytes = &name.as_bytes()[..name.len().min(15)];
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status().context("running ip")?;
    if !status.success() {
        bail!("ip {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// xorshift64*: a seeded, reproducible loss pattern per interface.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    let mut tuns = Vec::new();
    for (ns, addr) in &opts.hosts {
        // Named after the namespace, so several emulators (test clusters) can run at once.
        let name: String = format!("lk{ns}").chars().take(15).collect();
        let tun = open_tun(&name)?;
        // A TUN interface keeps its file descriptor when moved into another namespace.
        ip(&["link", "set", &name, "netns", ns])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", &name])?;
        ip(&["-n", ns, "link", "set", &name, "mtu", &opts.mtu.to_string(), "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        tuns.push(tun);
    }
    let by_addr: HashMap<Ipv4Addr, usize> = opts.hosts.iter().enumerate().map(|(i, (_, a))| (*a, i)).collect();
    // One writer thread per interface delivers its packets in arrival order once due:
    // the delay is constant, so FIFO order is due order.
    let mut outlets = Vec::new();
    for tun in &tuns {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let mut out = tun.try_clone()?;
        std::thread::spawn(move || {
            for (due, packet) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let _ = out.write(&packet);
            }
        });
        outlets.push(tx);
    }
    println!("linkem: {} hosts, delay {:?}, loss {}", tuns.len(), opts.delay, opts.loss);
    let _ = std::io::stdout().flush();
    let mut readers = Vec::new();
    for (i, mut tun) in tuns.into_iter().enumerate() {
        let (outlets, by_addr) = (outlets.clone(), by_addr.clone());
        let (delay, loss) = (opts.delay, opts.loss);
        let mut rng = Rng(opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64 + 1) | 1);
        readers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = match tun.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("linkem: reading the interface of host {i}: {e}");
                        return;
                    }
                };
                // IPv4 only: the destination address is bytes 16..20 of the header.
                if n < 20 || buf[0] >> 4 != 4 {
                    continue;
                }
                let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                let Some(&to) = by_addr.get(&dst) else { continue };
                if loss > 0.0 && rng.uniform() < loss {
                    continue;
                }
                let _ = outlets[to].send((Instant::now() + delay, buf[..n].to_vec()));
            }
        }));
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn loss_draws_are_uniform_and_seeded() {
        let mut a = Rng(0x9E37_79B9_7F4A_7C15 | 1);
        let draws: Vec<f64> = (0..200_000).map(|_| a.uniform()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let lost = draws.iter().filter(|&&u| u < 0.005).count() as f64 / draws.len() as f64;
        assert!((lost - 0.005).abs() < 0.001, "loss fraction {lost}");
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let mut b = Rng(0x9E37_79B9_7F4A_7C15 | 1);
        assert!(draws[..100].iter().all(|&u| u == b.uniform()), "same seed, same pattern");
    }
}
