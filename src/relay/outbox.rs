//! A client's outbox: the queue of encoded frames waiting for its socket, and the only code
//! that writes to a WebSocket after the handshake.
//!
//! # Why an outbox at all
//!
//! Two threads want to write to each client: the broadcaster (room messages, pings, shutdown
//! closes) and the client's own connection thread (tungstenite's pong and close replies). Two
//! writers on one socket interleave frames, and a blocking write to a client that stopped
//! reading would freeze whoever made it. So every frame for a client is appended here, under
//! one mutex (in [`Client`](crate::relay::client::Client)), and sent with a *non-blocking* `sendmsg`:
//! whatever the kernel will not take right now stays queued, with its offset, for the next
//! attempt. Nobody ever waits on a slow client; the queue just grows, and its growth (bytes,
//! and how long it has been non-empty) is what evicts a client that cannot keep up.
//!
//! Frames are `Bytes`: the broadcaster encodes a room message once and every member's outbox
//! holds a reference to the same allocation. One `sendmsg` writes every queued frame (up to
//! `MAX_IOVECS`), so a burst of messages costs one syscall per client, not one per frame.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use tungstenite::Bytes;

/// Frames gathered into one `sendmsg`. Linux's `IOV_MAX` is 1024, but the iovec array lives
/// on the flushing thread's stack (16 bytes each), and connection threads flush too (the
/// `101`, pongs). Measured with 5,000 idle clients: 256 entries (4 KiB) made every connection
/// stack touch one more page, 17.2 instead of 13.2 KiB RSS per client. 64 frames per syscall
/// already makes the per-frame syscall cost negligible.
const MAX_IOVECS: usize = 64;

/// What each queued frame is charged against the outbox's bound besides its bytes: its slot
/// in the queue (a 32-byte `Bytes`, up to twice that while the deque grows) and the small
/// allocation a frame of its own (a pong) brings. Without it, a stalled member of a room fed
/// one tiny message per batch could hold half a million entries, 16 MiB of queue, within a
/// 1 MiB bound.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// The queue itself. Pure bookkeeping plus [`Outbox::send_to`]; locking is the caller's.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames[0]` already sent.
    offset: usize,
    /// Unsent bytes across all frames (`offset` already subtracted).
    queued_bytes: usize,
    /// When the queue last went from empty to non-empty without draining since.
    backlog_since: Option<Instant>,
    /// Set once a close frame is queued: RFC 6455 §5.5.1 forbids sending anything after it,
    /// so later frames (including tungstenite's own close reply) are dropped.
    is_closed: bool,
    /// The last frame of each `Latest` class queued, so a newer one can take its place while
    /// it is still unsent (see `push_latest`): the address of its bytes, 0 for none. An
    /// address, not a `Bytes`, to keep every client's outbox small; it is only ever compared
    /// with frames in the queue, and cleared when its frame leaves the queue, so it never
    /// outlives the allocation it names.
    latest: [usize; 2],
}

/// Frames of which only the newest matters: a backlogged client holds at most one of each,
/// and gets the latest when it drains (PROTOCOL §5). A client is in one room, so one per
/// class is one per room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latest {
    Presence = 0,
    Reactions = 1,
}

/// What happened to a frame offered to the outbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; `was_empty` says the outbox had nothing pending before, i.e. the caller must
    /// make sure somebody flushes it.
    Queued { was_empty: bool },
    /// The outbox already holds a close frame; the frame was dropped.
    Closed,
    /// Queuing would exceed the bound: the client is too slow and must be evicted.
    Overflow,
}

/// The result of a send attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued is in the kernel.
    Drained,
    /// The kernel's send buffer is full; bytes remain queued.
    Backlogged,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Appends a frame unless that would take the queue past `limit` bytes (counting
    /// `ENTRY_OVERHEAD_BYTES` per frame).
    pub fn push(&mut self, frame: Bytes, limit: usize) -> Push {
        if self.is_closed {
            return Push::Closed;
        }
        if self.charged_bytes() + frame.len() + ENTRY_OVERHEAD_BYTES > limit {
            return Push::Overflow;
        }
        let was_empty = self.frames.is_empty();
        if frame.is_empty() {
            return Push::Queued { was_empty };
        }
        if was_empty {
            self.backlog_since = Some(Instant::now());
        }
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
        Push::Queued { was_empty }
    }

    /// Queues a frame of a `Latest` class: if one of its class is still waiting whole in the
    /// queue, the new frame takes its place (so its position, behind the messages queued
    /// before the older one); otherwise it is appended like any frame.
    pub fn push_latest(&mut self, frame: Bytes, class: Latest, limit: usize) -> Push {
        if self.is_closed {
            return Push::Closed;
        }
        let older = self.latest[class as usize];
        if older != 0 {
            // Not the head frame once its sending has begun: its bytes are partly out.
            let start = usize::from(self.offset > 0);
            let found = self
                .frames
                .iter()
                .skip(start)
                .position(|queued| queued.as_ptr() as usize == older);
            if let Some(index) = found.map(|i| i + start) {
                let grown = frame.len().saturating_sub(self.frames[index].len());
                if self.charged_bytes() + grown > limit {
                    return Push::Overflow;
                }
                self.queued_bytes = self.queued_bytes - self.frames[index].len() + frame.len();
                self.latest[class as usize] = frame.as_ptr() as usize;
                self.frames[index] = frame;
                return Push::Queued { was_empty: false };
            }
        }
        let address = frame.as_ptr() as usize;
        let is_queued = !frame.is_empty();
        let pushed = self.push(frame, limit);
        if let Push::Queued { .. } = pushed {
            // An empty frame is never queued, so it is never remembered.
            self.latest[class as usize] = if is_queued { address } else { 0 };
        }
        pushed
    }

    /// Appends a close frame (ignoring the bound: it is tiny and the last thing sent) and
    /// refuses everything after it.
    pub fn push_close(&mut self, frame: Bytes) -> Push {
        let pushed = self.push(frame, usize::MAX);
        self.is_closed = true;
        pushed
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// What the queue counts against its bound: unsent bytes plus `ENTRY_OVERHEAD_BYTES` for
    /// every frame.
    pub fn charged_bytes(&self) -> usize {
        self.queued_bytes + self.frames.len() * ENTRY_OVERHEAD_BYTES
    }

    pub fn is_closed(&self) -> bool {
        self.is_closed
    }

    /// When the current backlog began, if anything is queued.
    pub fn backlog_since(&self) -> Option<Instant> {
        self.backlog_since
    }

    /// Drops everything queued, e.g. when the client is evicted: its memory is freed at once
    /// rather than when the connection thread gets round to exiting.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.offset = 0;
        self.queued_bytes = 0;
        self.backlog_since = None;
        self.is_closed = true;
        self.latest = [0, 0];
    }

    /// Writes as much as the kernel takes without blocking, in as few `sendmsg` calls as the
    /// iovec limit allows.
    ///
    /// `MSG_DONTWAIT` makes this one call non-blocking while the socket itself stays in
    /// blocking mode for the connection thread's reads; `MSG_NOSIGNAL` turns a write to a
    /// closed peer into `EPIPE` instead of a process-killing `SIGPIPE`.
    pub fn send_to(&mut self, socket: &impl AsRawFd) -> io::Result<Flush> {
        while !self.frames.is_empty() {
            let mut iovecs = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS];
            let mut count = 0;
            for (i, frame) in self.frames.iter().take(MAX_IOVECS).enumerate() {
                let unsent = if i == 0 {
                    &frame[self.offset..]
                } else {
                    &frame[..]
                };
                iovecs[i] = libc::iovec {
                    iov_base: unsent.as_ptr() as *mut libc::c_void,
                    iov_len: unsent.len(),
                };
                count += 1;
            }
            // SAFETY: `message` points at `count` initialised iovecs, each describing a live
            // slice of a `Bytes` in `self.frames`, which is not touched until `sendmsg`
            // returns. The kernel only reads from them.
            let sent = unsafe {
                let mut message: libc::msghdr = std::mem::zeroed();
                message.msg_iov = iovecs.as_mut_ptr();
                message.msg_iovlen = count as _;
                libc::sendmsg(
                    socket.as_raw_fd(),
                    &message,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if sent < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(Flush::Backlogged),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            self.consume(sent as usize);
        }
        Ok(Flush::Drained)
    }

    /// Forgets the first `sent` bytes after a successful send.
    fn consume(&mut self, mut sent: usize) {
        self.queued_bytes -= sent;
        while sent > 0 {
            let front_unsent = self.frames[0].len() - self.offset;
            if sent >= front_unsent {
                sent -= front_unsent;
                if let Some(sent_frame) = self.frames.pop_front() {
                    // A `Latest` frame that has gone out can no longer be replaced: forget it,
                    // so the next one does not search the queue for it.
                    for latest in &mut self.latest {
                        if *latest == sent_frame.as_ptr() as usize {
                            *latest = 0;
                        }
                    }
                }
                self.offset = 0;
            } else {
                self.offset += sent;
                sent = 0;
            }
        }
        // Partial progress does not reset `backlog_since`: the clock runs from when the
        // backlog began, so a client that drains a trickle forever is still evicted.
        if self.frames.is_empty() {
            self.backlog_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn frame(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    /// A backlogged client holds one frame of each `Latest` class, the newest, in the place
    /// of the first; once that one has begun to go out, a newer one queues behind it.
    #[test]
    fn a_latest_frame_replaces_its_unsent_predecessor() {
        let mut outbox = Outbox::new();
        outbox.push(frame(b'm', 10), 1 << 20);
        outbox.push_latest(frame(b'p', 5), Latest::Presence, 1 << 20);
        outbox.push(frame(b'n', 10), 1 << 20);
        outbox.push_latest(frame(b'q', 7), Latest::Presence, 1 << 20);
        outbox.push_latest(frame(b'r', 3), Latest::Reactions, 1 << 20);
        let queued: Vec<u8> = outbox.frames.iter().map(|f| f[0]).collect();
        assert_eq!(queued, b"mqnr");
        assert_eq!(outbox.queued_bytes(), 10 + 7 + 10 + 3);
        // The head frame partly sent: a newer presence does not touch it.
        let mut outbox = Outbox::new();
        outbox.push_latest(frame(b'p', 5), Latest::Presence, 1 << 20);
        outbox.consume(2);
        outbox.push_latest(frame(b'q', 5), Latest::Presence, 1 << 20);
        let queued: Vec<u8> = outbox.frames.iter().map(|f| f[0]).collect();
        assert_eq!(queued, b"pq");
        assert_eq!(outbox.queued_bytes(), 3 + 5);
    }

    #[test]
    fn push_counts_bytes_and_enforces_the_bound() {
        let mut outbox = Outbox::new();
        let limit = 100 + 2 * ENTRY_OVERHEAD_BYTES;
        assert_eq!(
            outbox.push(frame(1, 60), limit),
            Push::Queued { was_empty: true }
        );
        assert_eq!(
            outbox.push(frame(2, 40), limit),
            Push::Queued { was_empty: false }
        );
        assert_eq!(outbox.queued_bytes(), 100);
        assert_eq!(outbox.charged_bytes(), limit);
        assert_eq!(outbox.push(frame(3, 1), limit), Push::Overflow);
        assert!(outbox.backlog_since().is_some());
    }

    /// Tiny frames are charged for their queue slot too, so a bound in bytes also bounds the
    /// number of entries (and the memory the queue itself takes).
    #[test]
    fn tiny_frames_are_charged_for_their_slot() {
        let mut outbox = Outbox::new();
        let mut entries = 0;
        while let Push::Queued { .. } = outbox.push(frame(0x81, 2), 1 << 20) {
            entries += 1;
        }
        assert_eq!(entries, (1 << 20) / (2 + ENTRY_OVERHEAD_BYTES));
    }

    #[test]
    fn nothing_after_close() {
        let mut outbox = Outbox::new();
        assert_eq!(
            outbox.push_close(frame(8, 2)),
            Push::Queued { was_empty: true }
        );
        assert_eq!(outbox.push(frame(1, 1), 100), Push::Closed);
        assert_eq!(outbox.push_close(frame(8, 2)), Push::Closed);
        assert_eq!(outbox.queued_bytes(), 2);
    }

    #[test]
    fn send_delivers_frames_in_order_and_drains() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut outbox = Outbox::new();
        for i in 0..10u8 {
            outbox.push(frame(i, 100 + i as usize), usize::MAX);
        }
        assert_eq!(outbox.send_to(&a).unwrap(), Flush::Drained);
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(outbox.backlog_since(), None);
        let expected: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 100 + i as usize]).collect();
        let mut got = vec![0; expected.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_full_socket_leaves_a_resumable_backlog() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut outbox = Outbox::new();
        // Far more than a socket buffer holds, as many frames to exercise the iovec limit.
        let frames = 2_000;
        for i in 0..frames {
            outbox.push(frame((i % 251) as u8, 1000), usize::MAX);
        }
        assert_eq!(outbox.send_to(&a).unwrap(), Flush::Backlogged);
        let backlog = outbox.queued_bytes();
        assert!(backlog > 0 && backlog < frames * 1000);
        assert!(outbox.backlog_since().is_some());

        // Read everything while re-flushing: bytes must arrive complete and in order even
        // though sends stopped in the middle of frames.
        let mut received = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        b.set_nonblocking(true).unwrap();
        while received.len() < frames * 1000 {
            let _ = outbox.send_to(&a).unwrap();
            match b.read(&mut buf) {
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let expected: Vec<u8> = (0..frames)
            .flat_map(|i| vec![(i % 251) as u8; 1000])
            .collect();
        assert!(received == expected, "stream was reordered or corrupted");
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn send_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut outbox = Outbox::new();
        outbox.push(frame(1, 10), usize::MAX);
        assert!(outbox.send_to(&a).is_err());
    }
}
