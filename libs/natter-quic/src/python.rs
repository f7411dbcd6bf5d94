//! The PyO3 face of the plane: thin conversions, no decisions.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::events::{Event, EventQueue};
use crate::plane::{Decision, Plane, Settings};
use crate::socket::Route;

fn address(host: &str, port: u16) -> PyResult<SocketAddr> {
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| PyValueError::new_err(format!("not an IP address: {host:?}")))?;
    Ok(SocketAddr::new(ip, port))
}

#[pyclass(module = "natter_quic")]
struct Engine {
    plane: Arc<Plane>,
    wake: UnixStream,
}

#[pymethods]
impl Engine {
    /// ``fd`` is a bound UDP socket that the engine owns from now on (pass a dup).
    #[new]
    #[pyo3(signature = (fd, certificate, private_key, *, idle_timeout, stream_window, connection_window, max_streams, max_datagram_size, header_timeout, max_pending_streams, congestion = "cubic".to_string(), keep_alive = 15.0, threads = 1, ack_every = 2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fd: i32,
        certificate: &[u8],
        private_key: &[u8],
        idle_timeout: f64,
        stream_window: u32,
        connection_window: u32,
        max_streams: u32,
        max_datagram_size: u16,
        header_timeout: f64,
        max_pending_streams: u32,
        congestion: String,
        keep_alive: f64,
        threads: usize,
        ack_every: u32,
    ) -> PyResult<Self> {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: the caller hands over a descriptor it duplicated for us and never uses
        // again (natter_agent.engines.native does os.dup); from here on we own and close it.
        let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
        let (ours, theirs) = UnixStream::pair().map_err(|e| PyOSError::new_err(e.to_string()))?;
        theirs.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let events = Arc::new(EventQueue::new(ours));
        let settings = Settings { idle_timeout, stream_window, connection_window, max_streams, max_datagram_size, header_timeout, max_pending_streams, congestion, keep_alive, ack_every };
        let plane = Plane::new(socket, certificate, private_key, settings, events, threads).map_err(PyValueError::new_err)?;
        Ok(Self { plane, wake: theirs })
    }

    /// Readable when events wait; read it empty, then call ``poll_events``.
    fn wake_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.wake.as_raw_fd()
    }

    fn drain_wake(&self) {
        use std::io::Read;
        let mut buf = [0u8; 256];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Events as tuples whose first item names the kind (see ``events::Event``).
    fn poll_events<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for event in self.plane.events.drain(limit) {
            let item: Bound<'py, PyTuple> = match event {
                Event::Datagram { data, from } => ("datagram", PyBytes::new(py, &data), from.ip().to_string(), from.port()).into_pyobject(py)?,
                Event::Send { tunnel, packets } => {
                    let packets: Vec<Bound<'py, PyBytes>> = packets.iter().map(|p| PyBytes::new(py, p)).collect();
                    ("send", tunnel, packets).into_pyobject(py)?
                }
                Event::Authenticated { tunnel, key } => ("authenticated", tunnel, key.map(|k| PyBytes::new(py, &k))).into_pyobject(py)?,
                Event::PeerAccepted { tunnel } => ("peer_accepted", tunnel).into_pyobject(py)?,
                Event::Closed { tunnel, reason } => ("closed", tunnel, reason).into_pyobject(py)?,
                Event::Moved { tunnel, to } => ("moved", tunnel, to.ip().to_string(), to.port()).into_pyobject(py)?,
                Event::MovedVia { tunnel, token } => ("moved_via", tunnel, token).into_pyobject(py)?,
                Event::SendVia { token, packets } => {
                    let packets: Vec<Bound<'py, PyBytes>> = packets.iter().map(|p| PyBytes::new(py, p)).collect();
                    ("send_via", token, packets).into_pyobject(py)?
                }
                Event::Pong { tunnel, uid } => ("pong", tunnel, uid).into_pyobject(py)?,
                Event::Accepted { forward, conn } => ("accepted", forward, conn).into_pyobject(py)?,
                Event::Reply { conn, header } => ("reply", conn, PyBytes::new(py, &header)).into_pyobject(py)?,
                Event::Incoming { tunnel, conn, header } => ("incoming", tunnel, conn, PyBytes::new(py, &header)).into_pyobject(py)?,
                Event::TunnelDatagram { tunnel, data } => ("tunnel_datagram", tunnel, PyBytes::new(py, &data)).into_pyobject(py)?,
                Event::ConnectFailed { conn, reason, errno } => ("connect_failed", conn, reason, errno).into_pyobject(py)?,
                Event::Refused { tunnel, reason } => ("refused", tunnel, reason).into_pyobject(py)?,
                Event::Done { conn, sent, received, error } => ("done", conn, sent, received, error).into_pyobject(py)?,
            };
            list.append(item)?;
        }
        Ok(list)
    }

    fn send_to(&self, data: &[u8], host: &str, port: u16) -> PyResult<()> {
        self.plane.socket.send_plain(data, address(host, port)?).map(|_| ()).map_err(|e| PyOSError::new_err(e.to_string()))
    }

    fn connect(&self, tunnel: u64) -> PyResult<()> {
        self.plane.connect(tunnel).map_err(PyOSError::new_err)
    }

    fn accept_initial(&self, tunnel: u64, initial: &[u8]) -> bool {
        self.plane.accept_initial(tunnel, initial.to_vec())
    }

    /// The tunnel's packets leave straight to (host, port), or, with host None, through Python.
    #[pyo3(signature = (tunnel, host, port = 0))]
    fn route(&self, tunnel: u64, host: Option<&str>, port: u16) -> PyResult<()> {
        let route = match host {
            Some(host) => Route::Direct(address(host, port)?),
            None => Route::ViaPython,
        };
        self.plane.route(tunnel, Some(route));
        Ok(())
    }

    fn hear_on(&self, tunnel: u64, host: &str, port: u16) -> PyResult<()> {
        self.plane.socket.hear_on(tunnel, address(host, port)?);
        Ok(())
    }

    /// A relayed short-header packet of no known tunnel: QUIC finds its connection by ID.
    fn inject_stranger(&self, token: u64, packet: &[u8]) -> bool {
        self.plane.socket.inject_stranger(token, packet.to_vec())
    }

    fn inject(&self, tunnel: u64, packet: &[u8]) -> bool {
        self.plane.socket.inject(tunnel, packet.to_vec())
    }

    #[pyo3(signature = (tunnel, refusal = None))]
    fn verdict(&self, tunnel: u64, refusal: Option<String>) {
        self.plane.verdict(tunnel, refusal);
    }

    fn close_tunnel(&self, tunnel: u64, reason: &str) {
        self.plane.close_tunnel(tunnel, reason);
    }

    fn ping(&self, tunnel: u64, uid: u64) {
        self.plane.ping(tunnel, uid);
    }

    /// (rtt s, path MTU, payload bytes sent, received, open streams, lost packets) or None.
    fn stats(&self, tunnel: u64) -> Option<(f64, u16, u64, u64, u64, u64)> {
        let (connection, counters, _) = self.plane.connection(tunnel)?;
        let path = connection.stats().path;
        Some((
            connection.rtt().as_secs_f64(),
            path.current_mtu,
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
            counters.open_streams.load(Ordering::Relaxed),
            path.lost_packets,
        ))
    }

    /// Accept a forward's connections on ``fd``, a listening TCP socket (pass a dup: it is ours).
    fn listen_tcp(&self, forward: u64, fd: i32) -> PyResult<(String, u16)> {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: as in ``new``: a duplicated descriptor that the caller hands over for good.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        let bound = self.plane.listen_tcp(forward, listener).map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())))?;
        Ok((bound.ip().to_string(), bound.port()))
    }

    /// Take over a connected TCP socket Python accepted (its descriptor, duplicated for
    /// good); returns the connection's number, as an ``accepted`` event would.
    fn adopt_tcp(&self, fd: i32) -> PyResult<u64> {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: as in ``listen_tcp``: the caller hands over a duplicated descriptor for good.
        let tcp = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        tcp.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let _guard = self.plane.runtime.enter();
        let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(self.plane.adopt(tcp))
    }

    fn send_datagram(&self, tunnel: u64, data: &[u8]) -> bool {
        self.plane.send_datagram(tunnel, data.to_vec())
    }

    fn datagram_room(&self, tunnel: u64) -> usize {
        self.plane.datagram_room(tunnel)
    }

    fn stop_tcp(&self, forward: u64) {
        self.plane.stop_tcp(forward);
    }

    fn open_stream(&self, conn: u64, tunnel: u64, header: &[u8]) -> bool {
        self.plane.decide(conn, Decision::Open { tunnel, header: header.to_vec() })
    }

    fn splice(&self, conn: u64) -> bool {
        self.plane.decide(conn, Decision::Splice)
    }

    #[pyo3(signature = (conn, reply = None))]
    fn refuse(&self, conn: u64, reply: Option<&[u8]>) -> bool {
        self.plane.decide(conn, Decision::Refuse { reply: reply.map(<[u8]>::to_vec).unwrap_or_default() })
    }

    fn connect_target(&self, conn: u64, addresses: Vec<String>, port: u16, reply: &[u8]) -> PyResult<bool> {
        let addresses = addresses.iter().map(|a| address(a, port)).collect::<PyResult<Vec<_>>>()?;
        Ok(self.plane.decide(conn, Decision::Connect { addresses, reply: reply.to_vec() }))
    }

    /// (datagrams dropped because Python's queue was full, short-header datagrams from
    /// unknown senders handed to QUIC to be found by connection ID)
    fn counters(&self) -> (u64, u64) {
        (self.plane.events.dropped(), self.plane.socket.to_quic_by_id.load(Ordering::Relaxed))
    }

    fn shutdown(&self) {
        self.plane.shutdown();
    }
}

#[pymodule]
fn natter_quic(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Engine>()?;
    module.add("ALPN", std::str::from_utf8(crate::tls::ALPN).unwrap_or("natter/1"))?;
    Ok(())
}
