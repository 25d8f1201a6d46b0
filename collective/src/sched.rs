//! Scheduling hints for communication threads.

/// Asks the kernel to run the calling thread promptly when it wakes, by requesting a short
/// time slice (EEVDF, Linux 6.12+: a fair-class task with a shorter slice preempts the
/// running one on wake-up). A communication thread sharing its core with a trainer thread
/// otherwise waits out the trainer's whole slice (1.5 ms on 2 CPUs) every time a peer wakes
/// it, and a bucket that needs a few microseconds of work takes milliseconds (measured:
/// the first gradient bucket of the MNIST MLP, 2 workers on 2 cores, finished only after
/// backward ended). Needs no privilege; older kernels refuse it, which costs nothing.
pub fn request_prompt_wakeups() -> bool {
    /// The shortest slice the kernel accepts.
    const SLICE_NS: u64 = 100_000;
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice: 0,
        priority: 0,
        runtime: SLICE_NS,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr(2) reads `size` bytes of `attr`, a live, initialised struct laid
    // out as the kernel's `struct sched_attr` (version 0, 48 bytes); pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc != 0 {
        tracing::debug!("no short time slice for the communication thread: {}", std::io::Error::last_os_error());
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    /// Where the kernel takes the request (EEVDF, 6.12+), the thread's slice reads 100 µs
    /// in its scheduler statistics; elsewhere the call reports that it was refused.
    #[test]
    fn a_granted_request_shows_as_the_threads_slice() {
        std::thread::spawn(|| {
            let granted = super::request_prompt_wakeups();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let stats = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).unwrap_or_default();
            let slice = stats.lines().find(|l| l.starts_with("se.slice")).and_then(|l| l.split(':').nth(1));
            match (granted, slice) {
                (true, Some(ns)) => assert_eq!(ns.trim(), "100000"),
                (true, None) => println!("granted; this kernel does not show se.slice"),
                (false, _) => println!("skipped: this kernel refuses a custom slice"),
            }
        })
        .join()
        .expect("probe thread");
    }
}
