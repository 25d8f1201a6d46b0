//! How the members of a group get its segment: the first member listens on an abstract
//! Unix socket (per network namespace, so the netns test hosts never see each other's),
//! checks each caller's uid with SO_PEERCRED, and both sides prove knowledge of the job's
//! secret (from the authenticated control plane) by HMAC over fresh nonces before the
//! memfd is passed with SCM_RIGHTS. A process without the secret learns nothing and gets
//! no descriptor; the secret itself never crosses the socket.

use crate::{CollectiveError, Result};
use ring::hmac;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

const NONCE: usize = 32;

fn err(what: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Link(format!("shared-memory rendezvous: {what}"))
}

/// The socket name of a group: derived from the secret, so only members can compute it.
pub(super) fn address(secret: &[u8], group: &str) -> Result<SocketAddr> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, format!("lockstep shm address {group}").as_bytes());
    let name: String = tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    SocketAddr::from_abstract_name(format!("lockstep-shm-{name}")).map_err(err)
}

/// What a side signs to prove it knows the secret: its role, the other side's fresh
/// nonce (no replay) and the member index (no taking another member's place).
fn mac_input(role: &str, nonce: &[u8], member: u32) -> Vec<u8> {
    let mut msg = role.as_bytes().to_vec();
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(&member.to_le_bytes());
    msg
}

fn mac(secret: &[u8], role: &str, nonce: &[u8], member: u32) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), &mac_input(role, nonce, member))
}

fn mac_ok(secret: &[u8], role: &str, nonce: &[u8], member: u32, tag: &[u8]) -> bool {
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), &mac_input(role, nonce, member), tag).is_ok()
}

fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n).map_err(|_| err("no randomness"))?;
    Ok(n)
}

/// The uid of the process at the other end of a Unix socket.
fn peer_uid(stream: &UnixStream) -> Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error())));
    }
    Ok(cred.uid)
}

fn my_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Room for one control message carrying one descriptor.
fn fd_control() -> Vec<u8> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    vec![0u8; unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize]
}

/// A message of one buffer and a control buffer; both must outlive its use.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: msghdr is plain data: all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    msg
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS).
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: &File) -> Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut control = fd_control();
    let msg = message(&mut iov, &mut control);
    // SAFETY: the control buffer holds one cmsg with room for one descriptor.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd.as_raw_fd());
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent != bytes.len() as isize {
        return Err(err(format!("sending the segment: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes in one message and the descriptor attached to it.
fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> Result<Option<File>> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut control = fd_control();
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: recvmsg writes into the buffers described by msg.
    let got = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITALL) };
    if got != buf.len() as isize {
        return Err(err(format!("the first member closed the handshake ({got} of {} bytes)", buf.len())));
    }
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const i32);
        Ok(Some(File::from(OwnedFd::from_raw_fd(fd))))
    }
}

/// The first member: hands `segment` to `members - 1` others before `deadline`.
/// Callers that fail the checks are refused and logged; the wait goes on.
pub fn serve(secret: &[u8], group: &str, members: usize, segment: &File, deadline: Instant) -> Result<()> {
    let listener = UnixListener::bind_addr(&address(secret, group)?).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let mut joined = vec![false; members];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (0..members).filter(|&m| !joined[m]).collect();
                    return Err(err(format!("members {missing:?} of group {group} did not join in time")));
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(err(e)),
        };
        match admit(&stream, secret, &joined, segment) {
            Ok(member) => joined[member] = true,
            Err(e) => tracing::warn!("shared-memory rendezvous: refused a caller: {e}"),
        }
    }
    Ok(())
}

/// Checks one caller; on success sends it the segment and returns its member index.
fn admit(stream: &UnixStream, secret: &[u8], joined: &[bool], segment: &File) -> Result<usize> {
    stream.set_nonblocking(false).map_err(err)?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(err)?;
    let uid = peer_uid(stream)?;
    if uid != my_uid() {
        return Err(err(format!("caller runs as uid {uid}, this job as uid {}", my_uid())));
    }
    let challenge = nonce()?;
    (&*stream).write_all(&challenge).map_err(err)?;
    let mut hello = [0u8; 4 + NONCE + 32];
    (&*stream).read_exact(&mut hello).map_err(err)?;
    let member = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
    let (their_nonce, their_mac) = hello[4..].split_at(NONCE);
    if !mac_ok(secret, "member", &challenge, member, their_mac) {
        (&*stream).write_all(&[0u8; 33]).ok();
        return Err(err("caller does not know the job's secret"));
    }
    let m = member as usize;
    if m == 0 || m >= joined.len() || joined[m] {
        return Err(err(format!("caller claims member {member}, not an open place")));
    }
    let mut reply = vec![1u8];
    reply.extend_from_slice(mac(secret, "leader", their_nonce, member).as_ref());
    send_with_fd(stream, &reply, segment)?;
    Ok(m)
}

/// Any other member: fetches the segment from the first, before `deadline`.
pub fn join(secret: &[u8], group: &str, member: usize, deadline: Instant) -> Result<File> {
    join_at(&address(secret, group)?, secret, member, deadline)
}

/// `join` at a given socket address.
pub(super) fn join_at(addr: &SocketAddr, secret: &[u8], member: usize, deadline: Instant) -> Result<File> {
    let group = "at this address";
    let stream = loop {
        match UnixStream::connect_addr(addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(err(format!("the first member of group {group} is not listening: {e}"))),
        }
    };
    stream
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))))
        .map_err(err)?;
    let uid = peer_uid(&stream)?;
    if uid != my_uid() {
        return Err(err(format!("the listener runs as uid {uid}, this job as uid {}", my_uid())));
    }
    let mut challenge = [0u8; NONCE];
    (&stream).read_exact(&mut challenge).map_err(err)?;
    let mine = nonce()?;
    let mut hello = (member as u32).to_le_bytes().to_vec();
    hello.extend_from_slice(&mine);
    hello.extend_from_slice(mac(secret, "member", &challenge, member as u32).as_ref());
    (&stream).write_all(&hello).map_err(err)?;
    let mut reply = [0u8; 33];
    let fd = recv_with_fd(&stream, &mut reply)?;
    if reply[0] != 1 || !mac_ok(secret, "leader", &mine, member as u32, &reply[1..]) {
        return Err(err("the listener does not know the job's secret (or refused this member)"));
    }
    fd.ok_or_else(|| err("no segment descriptor in the reply"))
}
