//! The shared segment of one group of ranks on a host: a memfd mapping (it has no name in
//! `/dev/shm` and is freed when the last process holding it exits, however it exits), a
//! control area with one cache line pair per rank, and the staging buffers.
//!
//! Layout (`world` = P ranks, `sub_len` = S floats per rank per round, double-buffered):
//! ```text
//! line 0          header: magic, world, sub_len
//! line 1          abort word (0 = running, else 1 + the member that aborted); arrivals,
//!                 arrival sleepers
//! line 2 + q      member q: progress, (unused), pid, heartbeat
//! data            slots   [P members][2 buffers][P regions][S]  f32   (staged inputs)
//!                 results [2 buffers][P regions][S]             f32   (reduced regions)
//! ```
//! Lines are 128 bytes so that adjacent-line prefetch never makes two ranks' words share.

use crate::{CollectiveError, Result};
use memmap2::MmapMut;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const LINE: usize = 128;
const MAGIC: u32 = 0x4c4b_5348; // "LKSH"
const PAGE: usize = 4096;

/// Geometry of a segment, the same on every member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub world: usize,
    pub sub_len: usize,
}

impl Geometry {
    fn data_offset(&self) -> usize {
        (LINE * (2 + self.world)).div_ceil(PAGE) * PAGE
    }

    fn slot_floats(&self) -> usize {
        self.world * 2 * self.world * self.sub_len
    }

    pub fn bytes(&self) -> usize {
        self.data_offset() + 4 * (self.slot_floats() + 2 * self.world * self.sub_len)
    }

    /// Offset in floats (from the data start) of member `q`'s staging region `l`, buffer `b`.
    fn slot(&self, q: usize, b: usize, l: usize) -> usize {
        ((q * 2 + b) * self.world + l) * self.sub_len
    }

    /// Offset in floats of reduced region `l`, buffer `b`.
    fn result(&self, b: usize, l: usize) -> usize {
        self.slot_floats() + (b * self.world + l) * self.sub_len
    }
}

/// A sealed memfd of a fixed size and its mapping.
pub struct Mapping {
    map: MmapMut,
    /// The memfd, kept to hand to members that join.
    pub file: File,
}

fn os_err(what: &str) -> CollectiveError {
    CollectiveError::Link(format!("shared memory: {what}: {}", std::io::Error::last_os_error()))
}

impl Mapping {
    /// A new zeroed mapping of `len` bytes; `name` shows in /proc/PID/fd.
    pub fn create(name: &std::ffi::CStr, len: usize) -> Result<Self> {
        // SAFETY: a valid NUL-terminated name; the flags are constants.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(os_err("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64).map_err(|e| CollectiveError::Link(format!("shared memory: size: {e}")))?;
        // Its size is fixed: a member cannot shrink it under the others (SIGBUS).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(os_err("sealing"));
        }
        Self::map(file)
    }

    /// Maps a memfd received from another member, checking its size and seals (an unsealed
    /// file could shrink under us: SIGBUS).
    pub fn open(file: File, len: usize) -> Result<Self> {
        let got = file.metadata().map_err(|e| CollectiveError::Link(format!("shared memory: {e}")))?.len();
        if got != len as u64 {
            return Err(CollectiveError::Protocol(format!("shared segment is {got} bytes, expected {len}")));
        }
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(CollectiveError::Protocol("shared segment is not sealed against shrinking".into()));
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<Self> {
        // SAFETY: the memfd is sealed against shrinking, so the mapping stays backed; every
        // access to it goes through atomics or bounds-checked slices.
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| CollectiveError::Link(format!("shared memory: mmap: {e}")))?;
        Ok(Self { map, file })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The u32 at byte `offset` (4-aligned), shared by every process that maps it.
    pub fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.map.len());
        // SAFETY: in bounds and aligned (checked above; the mapping is page-aligned), and
        // only ever accessed atomically by every process that maps it.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// `len` bytes at `offset`, for the one process that writes them (callers keep the
    /// protocol that no other process touches them meanwhile).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.map.len());
        // SAFETY: in bounds; exclusive by the callers' protocol.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(offset) as *mut u8, len) }
    }

    fn ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }
}

pub struct Segment {
    map: Mapping,
    pub geometry: Geometry,
}

impl Segment {
    /// A new zeroed segment (the group's first member makes it).
    pub fn create(geometry: Geometry) -> Result<Self> {
        let segment = Self { map: Mapping::create(c"lockstep-allreduce", geometry.bytes())?, geometry };
        segment.word(0, 0).store(MAGIC, Ordering::Relaxed);
        segment.word(0, 1).store(geometry.world as u32, Ordering::Relaxed);
        segment.word(0, 2).store(geometry.sub_len as u32, Ordering::Release);
        Ok(segment)
    }

    /// Maps a segment received from the first member, checking that it is one.
    pub fn open(file: File, geometry: Geometry) -> Result<Self> {
        let segment = Self { map: Mapping::open(file, geometry.bytes())?, geometry };
        let header = [0, 1, 2].map(|i| segment.word(0, i).load(Ordering::Acquire));
        if header != [MAGIC, geometry.world as u32, geometry.sub_len as u32] {
            return Err(CollectiveError::Protocol(format!("shared segment header {header:?} does not match")));
        }
        Ok(segment)
    }

    pub fn file(&self) -> &File {
        &self.map.file
    }

    /// The `i`-th u32 of control line `line`.
    fn word(&self, line: usize, i: usize) -> &AtomicU32 {
        assert!(line < 2 + self.geometry.world && i < LINE / 4);
        self.map.word(line * LINE + 4 * i)
    }

    pub fn abort_word(&self) -> &AtomicU32 {
        self.word(1, 0)
    }
    /// Arrivals at synchronisations, summed over members (futex word)...
    pub fn arrivals(&self) -> &AtomicU32 {
        self.word(1, 16)
    }
    /// ...and how many members sleep on it. (Words 16 and 17: their own 64 bytes of the
    /// line, away from the abort word that every waiter polls.)
    pub fn arrival_sleepers(&self) -> &AtomicU32 {
        self.word(1, 17)
    }
    pub fn progress(&self, member: usize) -> &AtomicU32 {
        self.word(2 + member, 0)
    }
    pub fn pid(&self, member: usize) -> &AtomicU32 {
        self.word(2 + member, 2)
    }
    /// Bumped every `HEARTBEAT_PERIOD` by the member's heartbeat thread.
    pub fn heartbeat(&self, member: usize) -> &AtomicU32 {
        self.word(2 + member, 3)
    }

    fn floats(&self, offset: usize, len: usize) -> *mut f32 {
        let start = self.geometry.data_offset() + 4 * offset;
        assert!(start + 4 * len <= self.map.len());
        // SAFETY: in bounds (checked above) and 4-byte aligned.
        unsafe { self.map.ptr().add(start) as *mut f32 }
    }

    /// Member `q`'s staging region `l` of buffer `b`, `len` floats. Regions of different
    /// (q, b, l) never overlap; the round protocol of `ShmComm` orders every write to one
    /// before every read of it (release/acquire on the progress words).
    pub fn slot(&self, q: usize, b: usize, l: usize, len: usize) -> &[f32] {
        assert!(len <= self.geometry.sub_len);
        // SAFETY: see `floats`; no member writes this region while others read it.
        unsafe { std::slice::from_raw_parts(self.floats(self.geometry.slot(q, b, l), len), len) }
    }

    /// This member's own staging region, for writing.
    #[allow(clippy::mut_from_ref)]
    pub fn slot_mut(&self, q: usize, b: usize, l: usize, len: usize) -> &mut [f32] {
        assert!(len <= self.geometry.sub_len);
        // SAFETY: only member q writes its slots, and only in the phase nobody reads them.
        unsafe { std::slice::from_raw_parts_mut(self.floats(self.geometry.slot(q, b, l), len), len) }
    }

    pub fn result(&self, b: usize, l: usize, len: usize) -> &[f32] {
        assert!(len <= self.geometry.sub_len);
        // SAFETY: as `slot`.
        unsafe { std::slice::from_raw_parts(self.floats(self.geometry.result(b, l), len), len) }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn result_mut(&self, b: usize, l: usize, len: usize) -> &mut [f32] {
        assert!(len <= self.geometry.sub_len);
        // SAFETY: only the owner of region l writes it, in the phase nobody reads it.
        unsafe { std::slice::from_raw_parts_mut(self.floats(self.geometry.result(b, l), len), len) }
    }

    /// All P result regions of buffer `b` as one span of `len` ≤ P·S floats (broadcast).
    pub fn result_span(&self, b: usize, len: usize) -> &[f32] {
        assert!(len <= self.geometry.world * self.geometry.sub_len);
        // SAFETY: as `slot`.
        unsafe { std::slice::from_raw_parts(self.floats(self.geometry.result(b, 0), len), len) }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn result_mut_span(&self, b: usize, len: usize) -> &mut [f32] {
        assert!(len <= self.geometry.world * self.geometry.sub_len);
        // SAFETY: only the broadcast root writes, in the phase nobody reads.
        unsafe { std::slice::from_raw_parts_mut(self.floats(self.geometry.result(b, 0), len), len) }
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout` (a shared, not private, futex:
/// the word lives in a mapping of several processes).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: word is a valid aligned u32 for the duration of the call.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec);
    }
}

pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: as `futex_wait`.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// A descriptor that becomes readable when process `pid` exits (zombies included).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a negative result is an error.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind a pidfd has exited.
pub fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut poll, 1, 0) > 0 }
}
