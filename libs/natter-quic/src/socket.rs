//! The agent's one UDP socket, as quinn sees it. Every tunnel's connection talks to a
//! virtual address of its own (``virtual_addr``); this socket maps it to the path Python
//! chose (``Route``), the way iroh's magicsock does. Datagrams that are not a routed
//! tunnel's QUIC (broker frames, probes, a stranger's Initial) go to Python, which may
//! inject QUIC packets back (relayed ones, or an Initial it decided to accept).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::events::{Event, EventQueue};

const VIRTUAL_PREFIX: [u16; 4] = [0xfd6e, 0x6174, 0x7465, 0x7200]; // fd6e:6174:7465:7200::/64
const STRANGER_PREFIX: [u16; 4] = [0xfd6e, 0x6174, 0x7465, 0x7201]; // an unknown sender's address
pub const MAX_INJECTED: usize = 1024;
pub const MAX_STRANGERS: usize = 4096;

pub fn virtual_addr(tunnel: u64) -> SocketAddr {
    let t = tunnel.to_be_bytes();
    let word = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
    let [a, b, c, d] = VIRTUAL_PREFIX;
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(a, b, c, d, word(0), word(2), word(4), word(6)), 1, 0, 0))
}

pub fn tunnel_of(addr: &SocketAddr) -> Option<u64> {
    let SocketAddr::V6(v6) = addr else { return None };
    let s = v6.ip().segments();
    if s[..4] != VIRTUAL_PREFIX {
        return None;
    }
    Some(s[4..].iter().fold(0u64, |acc, w| (acc << 16) | u64::from(*w)))
}

fn stranger_addr(index: u32) -> SocketAddr {
    let [a, b, c, d] = STRANGER_PREFIX;
    let (hi, lo) = ((index >> 16) as u16, index as u16);
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(a, b, c, d, 0, 0, hi, lo), 1, 0, 0))
}

fn stranger_index(addr: &SocketAddr) -> Option<u32> {
    let SocketAddr::V6(v6) = addr else { return None };
    let s = v6.ip().segments();
    (s[..4] == STRANGER_PREFIX).then(|| (u32::from(s[6]) << 16) | u32::from(s[7]))
}

/// Where short-header QUIC came from that no tunnel's path carries: a peer that moved (its
/// NAT gave it a new port, it roamed, its client moved the tunnel onto the relay). quinn
/// finds the connection by its ID and validates the new path; the address it sees stands
/// for this, and the agent hears of it (``moved_to``).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stranger {
    Direct(SocketAddr),
    /// A path only Python carries (a relay session, another socket), by Python's token.
    ViaPython(u64),
}

#[derive(Default)]
struct Strangers {
    index: HashMap<Stranger, u32>,
    all: Vec<Stranger>,
}

impl Strangers {
    fn index_of(&mut self, stranger: Stranger) -> u32 {
        if let Some(index) = self.index.get(&stranger) {
            return *index;
        }
        if self.all.len() >= MAX_STRANGERS {
            self.index.clear(); // a flood of senders: start over (a real mover asks again)
            self.all.clear();
        }
        let index = self.all.len() as u32;
        self.all.push(stranger);
        self.index.insert(stranger, index);
        index
    }
}

/// An IPv4-mapped IPv6 address as plain IPv4, so that one peer has one address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Where a tunnel's packets go: straight out of this socket, or to Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    ViaPython,
}

#[derive(Default)]
struct Routes {
    out: HashMap<u64, Route>,
    back: HashMap<SocketAddr, u64>, // a direct path's address -> its tunnel
}

#[derive(Default)]
struct Injected {
    queue: VecDeque<(Vec<u8>, SocketAddr)>,
    waker: Option<Waker>,
}

pub struct NatterSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    v6: bool,
    routes: RwLock<Routes>,
    injected: Mutex<Injected>,
    strangers: Mutex<Strangers>,
    /// short-header datagrams from unknown senders handed to quinn (it drops what no
    /// connection's ID and keys claim); counted for the agent's datagram accounting
    pub to_quic_by_id: std::sync::atomic::AtomicU64,
    events: Arc<EventQueue>,
}

impl fmt::Debug for NatterSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatterSocket").field("v6", &self.v6).finish_non_exhaustive()
    }
}

impl NatterSocket {
    pub fn new(socket: std::net::UdpSocket, events: Arc<EventQueue>) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let v6 = socket.local_addr()?.is_ipv6();
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Self { io: tokio::net::UdpSocket::from_std(socket)?, state, v6, routes: Default::default(), injected: Default::default(), strangers: Default::default(), to_quic_by_id: Default::default(), events })
    }

    pub fn set_route(&self, tunnel: u64, route: Option<Route>) {
        let mut routes = self.routes.write().expect("routes poisoned");
        if let Some(Route::Direct(old)) = routes.out.get(&tunnel).copied() {
            if routes.back.get(&old) == Some(&tunnel) {
                routes.back.remove(&old);
            }
        }
        match route {
            Some(route) => {
                if let Route::Direct(addr) = route {
                    routes.back.insert(canonical(addr), tunnel);
                }
                routes.out.insert(tunnel, route);
            }
            None => {
                routes.out.remove(&tunnel);
            }
        }
    }

    /// Also take a path's datagrams as this tunnel's without sending on it (stragglers of a move).
    pub fn hear_on(&self, tunnel: u64, addr: SocketAddr) {
        self.routes.write().expect("routes poisoned").back.insert(canonical(addr), tunnel);
    }

    /// The path behind a connection's remote address, if a moved peer's.
    pub fn moved_to(&self, remote: &SocketAddr) -> Option<Stranger> {
        let index = stranger_index(remote)?;
        self.strangers.lock().expect("strangers poisoned").all.get(index as usize).copied()
    }

    /// A short-header QUIC packet that reached Python on a path of no tunnel (relayed).
    pub fn inject_stranger(&self, token: u64, data: Vec<u8>) -> bool {
        let index = self.strangers.lock().expect("strangers poisoned").index_of(Stranger::ViaPython(token));
        self.push_injected(data, stranger_addr(index))
    }

    pub fn forget(&self, tunnel: u64) {
        let mut routes = self.routes.write().expect("routes poisoned");
        routes.out.remove(&tunnel);
        routes.back.retain(|_, owner| *owner != tunnel);
    }

    /// A QUIC packet of ``tunnel`` that reached Python (relayed, or an Initial it accepted).
    pub fn inject(&self, tunnel: u64, data: Vec<u8>) -> bool {
        self.push_injected(data, virtual_addr(tunnel))
    }

    fn push_injected(&self, data: Vec<u8>, from: SocketAddr) -> bool {
        let mut injected = self.injected.lock().expect("injected poisoned");
        if injected.queue.len() >= MAX_INJECTED {
            return false;
        }
        injected.queue.push_back((data, from));
        if let Some(waker) = injected.waker.take() {
            waker.wake();
        }
        true
    }

    fn outward(&self, addr: SocketAddr) -> SocketAddr {
        match (self.v6, addr) {
            (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            _ => addr,
        }
    }

    /// Send a datagram Python built (broker frames, probes) on the same socket.
    pub fn send_plain(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let to = self.outward(to);
        match self.io.try_send_to(data, to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0), // as UDP: dropped
            other => other,
        }
    }

    fn take_injected(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut injected = self.injected.lock().expect("injected poisoned");
        let mut count = 0;
        while count < bufs.len().min(meta.len()) {
            let Some((data, from)) = injected.queue.pop_front() else { break };
            if data.len() > bufs[count].len() {
                continue; // larger than any QUIC datagram quinn reads: not a valid packet
            }
            bufs[count][..data.len()].copy_from_slice(&data);
            meta[count] = RecvMeta { addr: from, len: data.len(), stride: data.len(), ecn: None, dst_ip: None };
            count += 1;
        }
        injected.waker = Some(cx.waker().clone());
        count
    }

    /// Give quinn what is a routed tunnel's QUIC; hand the rest to Python (len 0 for quinn).
    fn sort(&self, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) {
        let routes = self.routes.read().expect("routes poisoned");
        for (buf, m) in bufs.iter().zip(meta.iter_mut()) {
            let from = canonical(m.addr);
            let data = &buf[..m.len];
            let stride = m.stride.max(1);
            let all_quic = data.chunks(stride).all(|segment| !segment.is_empty() && segment[0] >= 0x40);
            match routes.back.get(&from) {
                Some(tunnel) if all_quic => {
                    m.addr = virtual_addr(*tunnel);
                    m.dst_ip = None;
                }
                None if all_quic && data[0] & 0x80 == 0 => {
                    self.to_quic_by_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let index = self.strangers.lock().expect("strangers poisoned").index_of(Stranger::Direct(from));
                    m.addr = stranger_addr(index);
                    m.dst_ip = None;
                }
                _ => {
                    for segment in data.chunks(stride) {
                        self.events.push(Event::Datagram { data: segment.to_vec(), from });
                    }
                    m.len = 0;
                }
            }
        }
    }
}

fn segments(transmit: &Transmit) -> Vec<Vec<u8>> {
    let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
    transmit.contents.chunks(size).map(<[u8]>::to_vec).collect()
}

#[derive(Debug)]
struct Poller(Arc<NatterSocket>);

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

impl AsyncUdpSocket for NatterSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.moved_to(&transmit.destination) {
            Some(Stranger::Direct(real)) => {
                let out = Transmit { destination: self.outward(real), src_ip: None, ..*transmit };
                return self.io.try_io(tokio::io::Interest::WRITABLE, || self.state.send((&self.io).into(), &out));
            }
            Some(Stranger::ViaPython(token)) => {
                self.events.push(Event::SendVia { token, packets: segments(transmit) });
                return Ok(());
            }
            None => {}
        }
        let Some(tunnel) = tunnel_of(&transmit.destination) else { return Ok(()) };
        let route = self.routes.read().expect("routes poisoned").out.get(&tunnel).copied();
        match route {
            Some(Route::Direct(addr)) => {
                let out = Transmit { destination: self.outward(addr), src_ip: None, ..*transmit };
                self.io.try_io(tokio::io::Interest::WRITABLE, || self.state.send((&self.io).into(), &out))
            }
            Some(Route::ViaPython) => {
                self.events.push(Event::Send { tunnel, packets: segments(transmit) });
                Ok(())
            }
            None => Ok(()), // no path yet, or the tunnel is gone: as a lost datagram
        }
    }

    fn poll_recv(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        let injected = self.take_injected(cx, bufs, meta);
        if injected > 0 {
            return Poll::Ready(Ok(injected));
        }
        loop {
            match self.io.poll_recv_ready(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|_| 0)),
            }
            if let Ok(count) = self.io.try_io(tokio::io::Interest::READABLE, || self.state.recv((&self.io).into(), bufs, meta)) {
                self.sort(bufs, &mut meta[..count]);
                return Poll::Ready(Ok(count));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // quinn addresses every peer by a virtual IPv6 address, whatever this socket's family
        let port = self.io.local_addr()?.port();
        Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_name_their_tunnel() {
        for tunnel in [0u64, 1, 77, u64::MAX] {
            assert_eq!(tunnel_of(&virtual_addr(tunnel)), Some(tunnel));
        }
        assert_eq!(tunnel_of(&"[::1]:5".parse().unwrap()), None);
        assert_eq!(tunnel_of(&"127.0.0.1:5".parse().unwrap()), None);
    }

    #[test]
    fn stranger_addresses_are_not_tunnels() {
        let addr = stranger_addr(70_000);
        assert_eq!(stranger_index(&addr), Some(70_000));
        assert_eq!(tunnel_of(&addr), None);
        assert_eq!(stranger_index(&virtual_addr(3)), None);
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:9".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:9".parse().unwrap());
    }
}
