//! Preemption: Slurm, Kubernetes and a person at the keyboard stop jobs with SIGTERM or
//! SIGINT. The first such signal only records itself here; the step loop finishes the
//! current step, every rank agrees to stop after the same step (a vote that rides on the
//! step's all-reduced scalars), a checkpoint is written and the process exits with
//! 128 + the signal (143, 130). A second signal ends the process at once, killing the
//! worker processes this one started.

use std::sync::atomic::{AtomicI32, Ordering};

pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGINT: i32 = libc::SIGINT;

static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Worker processes to kill on a second signal (`lockstep local`), 0 = free slot.
static CHILDREN: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: atomics, kill, _exit.
    if SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        for child in &CHILDREN {
            let pid = child.load(Ordering::SeqCst);
            if pid > 0 {
                // SAFETY: kill is async-signal-safe.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // SAFETY: _exit is async-signal-safe and ends the process without unwinding.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Installs the handler for SIGTERM and SIGINT (once, at start).
pub fn install() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// The signal that asked this process to stop, if one did (or `request` was called).
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Not a signal: the stop that a `Rescale` asks for. The process goes on afterwards.
pub const RESCALE: i32 = -1;

/// Forgets a `RESCALE` request once its stop is done (a real signal stays).
pub fn clear_rescale() {
    let _ = SIGNAL.compare_exchange(RESCALE, 0, Ordering::SeqCst, Ordering::SeqCst);
}

/// Asks for a stop as if `signal` had arrived (the coordinator's `Preempt` message).
pub fn request(signal: i32) {
    let _ = SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// The exit status for a stop by `signal`: 128 + its number (SIGTERM 143, SIGINT 130).
pub fn exit_code(signal: i32) -> i32 {
    128 + signal
}

/// Registers a worker process to be killed if a second signal arrives.
pub fn register_child(pid: u32) {
    let _ = CHILDREN.iter().any(|s| s.compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst).is_ok());
}

/// Forgets a worker process that has exited.
pub fn forget_child(pid: u32) {
    for slot in &CHILDREN {
        let _ = slot.compare_exchange(pid as i32, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}
