//! What the native side tells Python: a queue of events and a wake-up byte on a socket
//! pair, so that tokio's threads never take the GIL and Python reads on its own loop.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Bound on queued events: past it, datagrams for Python are dropped (and counted), so a
/// flood on the socket cannot grow memory while Python is busy. Control events still queue.
pub const MAX_QUEUED_DATAGRAMS: usize = 4096;

#[derive(Debug)]
pub enum Event {
    /// A datagram the engine does not own (broker frames, probes, an unknown QUIC sender).
    Datagram { data: Vec<u8>, from: SocketAddr },
    /// QUIC packets of a tunnel whose path Python carries (a relay, another socket).
    Send { tunnel: u64, packets: Vec<Vec<u8>> },
    /// The handshake finished: the peer proved this Ed25519 key.
    Authenticated { tunnel: u64, key: Option<[u8; 32]> },
    /// As the QUIC client: the server checked us too (natter/2 says so; natter/1 cannot).
    PeerAccepted { tunnel: u64 },
    Closed { tunnel: u64, reason: String },
    /// The peer's packets come from a new address, and QUIC followed it there.
    Moved { tunnel: u64, to: SocketAddr },
    /// ... or from a path Python carries (its token): a relay.
    MovedVia { tunnel: u64, token: u64 },
    /// QUIC packets for such a path.
    SendVia { token: u64, packets: Vec<Vec<u8>> },
    Pong { tunnel: u64, uid: u64 },
    /// A TCP connection on a forward's port (waits for ``open_stream`` or ``drop_conn``).
    Accepted { forward: u64, conn: u64 },
    /// The peer's answer to a stream we opened: its raw header (length prefix included).
    Reply { conn: u64, header: Vec<u8> },
    /// A stream the peer opened, with its raw header: Python decides where it may go.
    Incoming { tunnel: u64, conn: u64, header: Vec<u8> },
    /// A DATAGRAM frame from the peer (not a ping): a UDP forward's, for Python.
    TunnelDatagram { tunnel: u64, data: Vec<u8> },
    /// The target of an incoming stream refused the connection.
    ConnectFailed { conn: u64, reason: String, errno: Option<i32> },
    /// A stream was refused before it had a header (over the pending limit, no header in time, ...).
    Refused { tunnel: u64, reason: &'static str },
    /// A spliced connection ended (or a waiting one failed): bytes both ways.
    Done { conn: u64, sent: u64, received: u64, error: String },
}

pub struct EventQueue {
    queue: Mutex<VecDeque<Event>>,
    wake: UnixStream,
    dropped: std::sync::atomic::AtomicU64,
}

impl EventQueue {
    pub fn new(wake: UnixStream) -> Self {
        wake.set_nonblocking(true).ok();
        Self { queue: Mutex::new(VecDeque::new()), wake, dropped: Default::default() }
    }

    pub fn push(&self, event: Event) {
        let mut queue = self.queue.lock().expect("event queue poisoned");
        if matches!(event, Event::Datagram { .. }) && queue.len() >= MAX_QUEUED_DATAGRAMS {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let was_empty = queue.is_empty();
        queue.push_back(event);
        drop(queue);
        if was_empty {
            // a full pipe means Python has a wake-up pending already: losing this byte is fine
            let _ = (&self.wake).write(&[1]);
        }
    }

    pub fn drain(&self, limit: usize) -> Vec<Event> {
        let mut queue = self.queue.lock().expect("event queue poisoned");
        let take = queue.len().min(limit);
        let events: Vec<Event> = queue.drain(..take).collect();
        if !queue.is_empty() {
            let _ = (&self.wake).write(&[1]);
        }
        events
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}
