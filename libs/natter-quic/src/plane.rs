//! The native data plane: one quinn endpoint on the agent's socket, its tunnels, and the
//! decisions it waits for from Python (keys, ACLs, which tunnel a connection takes).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::oneshot;

use crate::events::{Event, EventQueue};
use crate::socket::{tunnel_of, virtual_addr, NatterSocket, Route, Stranger};
use crate::splice::Counters;
use crate::tls;

#[derive(Clone, Debug)]
pub struct Settings {
    pub idle_timeout: f64,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_streams: u32,
    pub max_datagram_size: u16,
    pub header_timeout: f64,
    pub max_pending_streams: u32,
    pub congestion: String,
    pub keep_alive: f64,
    pub ack_every: u32,
}

/// What Python decided about a connection that waits in a native task.
pub enum Decision {
    /// Forward side: open a stream on this tunnel and send this header.
    Open { tunnel: u64, header: Vec<u8> },
    /// Forward side: the peer accepted; splice.
    Splice,
    /// Listener side: connect to the first of these addresses that answers, then reply.
    Connect { addresses: Vec<SocketAddr>, reply: Vec<u8> },
    /// Either side: end it (listener: send this reply first, if any).
    Refuse { reply: Vec<u8> },
}

pub struct Tunnel {
    pub connection: Option<Connection>,
    verdict: Option<oneshot::Sender<Result<(), String>>>,
    pub counters: Arc<Counters>,
    pub pending_headers: Arc<AtomicU64>,
}

pub struct Plane {
    pub runtime: tokio::runtime::Runtime,
    pub endpoint: Endpoint,
    pub socket: Arc<NatterSocket>,
    pub events: Arc<EventQueue>,
    pub settings: Settings,
    client_config: quinn::ClientConfig,
    pub tunnels: Mutex<HashMap<u64, Tunnel>>,
    decisions: Mutex<HashMap<u64, oneshot::Sender<Decision>>>,
    forwards: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    pending_server: Mutex<HashMap<u64, oneshot::Receiver<Result<(), String>>>>,
    next_conn: AtomicU64,
}

const PING: &[u8] = &[0]; // a ping's DATAGRAM: its ACK is the pong (natter_proto.udpframes never starts with 0)
const DATAGRAM_BUFFER: usize = 1 << 20;

fn transport(settings: &Settings) -> Result<quinn::TransportConfig, String> {
    let mut t = quinn::TransportConfig::default();
    let idle = Duration::from_secs_f64(settings.idle_timeout);
    t.max_idle_timeout(Some(idle.try_into().map_err(|_| "idle timeout out of range")?));
    t.keep_alive_interval(Some(Duration::from_secs_f64(settings.keep_alive)));
    t.max_concurrent_bidi_streams(VarInt::from_u32(settings.max_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(1)); // natter/2's acceptance
    t.stream_receive_window(VarInt::from_u32(settings.stream_window));
    t.receive_window(VarInt::from_u32(settings.connection_window));
    t.send_window(u64::from(settings.connection_window));
    t.initial_mtu(1200);
    t.min_mtu(1200);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(settings.max_datagram_size.max(1200));
    t.mtu_discovery_config(Some(mtu));
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER)); // UDP forwards' flows, and pings
    if settings.ack_every > 1 {
        // ask the peer (if it speaks the ACK frequency extension) to acknowledge every Nth
        // packet rather than every second one: fewer packets, less CPU on both ends
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(settings.ack_every - 1));
        t.ack_frequency_config(Some(ack));
    }
    let congestion: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> = match settings.congestion.as_str() {
        "cubic" => Arc::new(quinn::congestion::CubicConfig::default()),
        "newreno" => Arc::new(quinn::congestion::NewRenoConfig::default()),
        "bbr" => Arc::new(quinn::congestion::BbrConfig::default()),
        other => return Err(format!("unknown congestion controller {other:?} (cubic, newreno, bbr)")),
    };
    t.congestion_controller_factory(congestion);
    Ok(t)
}

impl Plane {
    pub fn new(socket: std::net::UdpSocket, cert: &[u8], key: &[u8], settings: Settings, events: Arc<EventQueue>, threads: usize) -> Result<Arc<Self>, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("natter-quic")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the native runtime: {e}"))?;
        let _guard = runtime.enter();
        let socket = Arc::new(NatterSocket::new(socket, events.clone()).map_err(|e| format!("socket: {e}"))?);
        let transport = Arc::new(transport(&settings)?);
        let client_tls = tls::client_config(cert, key).map_err(|e| format!("TLS client: {e}"))?;
        let server_tls = tls::server_config(cert, key).map_err(|e| format!("TLS server: {e}"))?;
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| format!("QUIC client: {e}"))?;
        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| format!("QUIC server: {e}"))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(transport.clone());
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport);
        server_config.migration(true);
        let mut endpoint_config = quinn::EndpointConfig::default();
        // the fixed bit stays set (no RFC 9287 greasing): the socket tells QUIC from broker
        // frames and probes by the first byte (RFC 9443), which a greased bit would break
        endpoint_config.grease_quic_bit(false);
        // what we accept (the peer's ceiling for DPLPMTUD): the same as our own probing's
        endpoint_config
            .max_udp_payload_size(settings.max_datagram_size.max(1200))
            .map_err(|e| format!("max datagram size: {e}"))?;
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| format!("endpoint: {e}"))?;
        let plane = Arc::new(Self {
            runtime,
            endpoint,
            socket,
            events,
            settings,
            client_config,
            tunnels: Mutex::default(),
            decisions: Mutex::default(),
            forwards: Mutex::default(),
            pending_server: Mutex::default(),
            next_conn: AtomicU64::new(1),
        });
        let accepting = plane.clone();
        plane.runtime.spawn(async move { accepting.accept_loop().await });
        Ok(plane)
    }

    fn slot(&self, tunnel: u64) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let entry = Tunnel { connection: None, verdict: Some(tx), counters: Arc::default(), pending_headers: Arc::default() };
        self.tunnels.lock().expect("tunnels poisoned").insert(tunnel, entry);
        rx
    }

    /// Start the QUIC client of ``tunnel`` (its packets go where ``route`` says).
    pub fn connect(self: &Arc<Self>, tunnel: u64) -> Result<(), String> {
        let verdict = self.slot(tunnel);
        let _guard = self.runtime.enter();
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), virtual_addr(tunnel), "natter")
            .map_err(|e| format!("cannot start the tunnel: {e}"))?;
        let plane = self.clone();
        self.runtime.spawn(async move {
            match connecting.await {
                Ok(connection) => plane.run_tunnel(tunnel, connection, verdict).await,
                Err(e) => plane.closed(tunnel, e.to_string()),
            }
        });
        Ok(())
    }

    /// A client's Initial that Python decided to serve as ``tunnel``.
    pub fn accept_initial(&self, tunnel: u64, initial: Vec<u8>) -> bool {
        let rx = self.slot(tunnel);
        self.pending_server.lock().expect("pending poisoned").insert(tunnel, rx);
        self.socket.inject(tunnel, initial)
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let Some(tunnel) = tunnel_of(&incoming.remote_address()) else {
                incoming.ignore();
                continue;
            };
            let verdict = self.pending_server.lock().expect("pending poisoned").remove(&tunnel);
            let Some(verdict) = verdict else {
                incoming.ignore(); // Python never accepted this tunnel
                continue;
            };
            let plane = self.clone();
            self.runtime.spawn(async move {
                match incoming.accept() {
                    Ok(connecting) => match connecting.await {
                        Ok(connection) => plane.run_tunnel(tunnel, connection, verdict).await,
                        Err(e) => plane.closed(tunnel, e.to_string()),
                    },
                    Err(e) => plane.closed(tunnel, e.to_string()),
                }
            });
        }
    }

    async fn run_tunnel(self: Arc<Self>, tunnel: u64, connection: Connection, verdict: oneshot::Receiver<Result<(), String>>) {
        let key = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().and_then(|cert| tls::ed25519_key(cert.as_ref())));
        if let Some(entry) = self.tunnels.lock().expect("tunnels poisoned").get_mut(&tunnel) {
            entry.connection = Some(connection.clone());
        } else {
            connection.close(VarInt::from_u32(0), b"tunnel closed");
            return;
        }
        self.events.push(Event::Authenticated { tunnel, key });
        match verdict.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                connection.close(VarInt::from_u32(0x100), reason.as_bytes());
                self.closed(tunnel, format!("refused: {reason}"));
                return;
            }
            Err(_) => {
                connection.close(VarInt::from_u32(0), b"tunnel closed");
                self.closed(tunnel, "tunnel closed".into());
                return;
            }
        }
        if !self.acceptance(tunnel, &connection).await {
            let reason = connection.closed().await;
            self.closed(tunnel, reason.to_string());
            return;
        }
        let accepting = self.clone();
        let incoming = connection.clone();
        let streams = self.runtime.spawn(async move {
            while let Ok((send, recv)) = incoming.accept_bi().await {
                accepting.clone().incoming_stream(tunnel, send, recv);
            }
        });
        let watching = self.clone();
        let watched = connection.clone();
        let watcher = self.runtime.spawn(async move { watching.watch_moves(tunnel, watched).await });
        let events = self.events.clone();
        let reading = connection.clone();
        let datagrams = self.runtime.spawn(async move {
            while let Ok(data) = reading.read_datagram().await {
                if data.as_ref() != PING {
                    events.push(Event::TunnelDatagram { tunnel, data: data.to_vec() });
                }
            }
        });
        let reason = connection.closed().await;
        streams.abort();
        watcher.abort();
        datagrams.abort();
        self.closed(tunnel, reason.to_string());
    }

    /// natter/2: the server says it accepted us on a unidirectional stream; the client is
    /// ready only then (a refusing server closes with its reason instead).
    async fn acceptance(&self, tunnel: u64, connection: &Connection) -> bool {
        let protocol = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        let accepting = protocol.as_deref() == Some(tls::ALPN_ACCEPTING);
        let is_client = connection.side().is_client();
        if !accepting {
            if is_client {
                self.events.push(Event::PeerAccepted { tunnel });
            }
            return true;
        }
        if !is_client {
            let sent = async {
                let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
                stream.write_all(tls::ACCEPTED).await.map_err(|e| e.to_string())?;
                stream.finish().map_err(|e| e.to_string())
            };
            return sent.await.is_ok();
        }
        let limit = Duration::from_secs_f64(self.settings.idle_timeout);
        let answer = tokio::time::timeout(limit, async {
            let mut stream = connection.accept_uni().await.map_err(|e| e.to_string())?;
            stream.read_to_end(16).await.map_err(|e| e.to_string())
        })
        .await;
        match answer {
            Ok(Ok(body)) if body == tls::ACCEPTED => {
                self.events.push(Event::PeerAccepted { tunnel });
                true
            }
            Ok(Err(_)) => false, // closed: its reason comes with Closed
            _ => {
                connection.close(VarInt::from_u32(0x101), b"no acceptance from the server");
                false
            }
        }
    }

    /// Tell the agent when QUIC followed the peer to an address of no tunnel (see Strangers).
    async fn watch_moves(&self, tunnel: u64, connection: Connection) {
        let mut last = connection.remote_address();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let remote = connection.remote_address();
            if remote != last {
                last = remote;
                match self.socket.moved_to(&remote) {
                    Some(Stranger::Direct(to)) => self.events.push(Event::Moved { tunnel, to }),
                    Some(Stranger::ViaPython(token)) => self.events.push(Event::MovedVia { tunnel, token }),
                    None => {}
                }
            }
        }
    }

    fn closed(&self, tunnel: u64, reason: String) {
        if self.tunnels.lock().expect("tunnels poisoned").remove(&tunnel).is_some() {
            // the path stays a moment: a CONNECTION_CLOSE (with a refusal's reason) still leaves on it
            let socket = self.socket.clone();
            self.runtime.spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                socket.forget(tunnel);
            });
            self.pending_server.lock().expect("pending poisoned").remove(&tunnel);
            self.events.push(Event::Closed { tunnel, reason });
        }
    }

    pub fn verdict(&self, tunnel: u64, refusal: Option<String>) {
        let sender = self.tunnels.lock().expect("tunnels poisoned").get_mut(&tunnel).and_then(|t| t.verdict.take());
        if let Some(sender) = sender {
            let _ = sender.send(refusal.map_or(Ok(()), Err));
        }
    }

    pub fn close_tunnel(&self, tunnel: u64, reason: &str) {
        let connection = self.tunnels.lock().expect("tunnels poisoned").get(&tunnel).and_then(|t| t.connection.clone());
        match connection {
            Some(connection) => connection.close(VarInt::from_u32(0), reason.as_bytes()),
            None => self.closed(tunnel, reason.to_string()),
        }
    }

    pub fn connection(&self, tunnel: u64) -> Option<(Connection, Arc<Counters>, Arc<AtomicU64>)> {
        let tunnels = self.tunnels.lock().expect("tunnels poisoned");
        let t = tunnels.get(&tunnel)?;
        Some((t.connection.clone()?, t.counters.clone(), t.pending_headers.clone()))
    }

    /// An ack-eliciting packet; the pong is the first ACK that arrives after it.
    pub fn ping(self: &Arc<Self>, tunnel: u64, uid: u64) {
        let Some((connection, _, _)) = self.connection(tunnel) else { return };
        let events = self.events.clone();
        self.runtime.spawn(async move {
            let before = connection.stats().frame_rx.acks;
            if connection.max_datagram_size().is_some() {
                let _ = connection.send_datagram(bytes::Bytes::from_static(PING));
            }
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if connection.stats().frame_rx.acks > before {
                    events.push(Event::Pong { tunnel, uid });
                    return;
                }
                if connection.close_reason().is_some() {
                    return;
                }
            }
        });
    }

    /// A DATAGRAM frame (a UDP forward's): false if the tunnel is gone, the peer takes no
    /// datagrams, or it is larger than the path carries (dropped, never fragmented).
    pub fn send_datagram(&self, tunnel: u64, data: Vec<u8>) -> bool {
        let Some((connection, _, _)) = self.connection(tunnel) else { return false };
        match connection.max_datagram_size() {
            Some(room) if data.len() <= room => connection.send_datagram(bytes::Bytes::from(data)).is_ok(),
            _ => false,
        }
    }

    /// The largest DATAGRAM payload the tunnel's path carries now (0: none).
    pub fn datagram_room(&self, tunnel: u64) -> usize {
        self.connection(tunnel).and_then(|(connection, _, _)| connection.max_datagram_size()).unwrap_or(0)
    }

    pub fn route(&self, tunnel: u64, route: Option<Route>) {
        self.socket.set_route(tunnel, route);
    }

    // -- decisions ---------------------------------------------------------------------
    pub fn new_conn(&self) -> (u64, oneshot::Receiver<Decision>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.decisions.lock().expect("decisions poisoned").insert(conn, tx);
        (conn, rx)
    }

    /// The next decision about ``conn``, asked for again after the last one was taken.
    pub fn await_again(&self, conn: u64) -> oneshot::Receiver<Decision> {
        let (tx, rx) = oneshot::channel();
        self.decisions.lock().expect("decisions poisoned").insert(conn, tx);
        rx
    }

    pub fn decide(&self, conn: u64, decision: Decision) -> bool {
        match self.decisions.lock().expect("decisions poisoned").remove(&conn) {
            Some(sender) => sender.send(decision).is_ok(),
            None => false,
        }
    }

    /// Accept on a listening socket Python bound (so a port in use fails there, at once).
    pub fn listen_tcp(self: &Arc<Self>, forward: u64, listener: TcpListener) -> std::io::Result<SocketAddr> {
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let plane = self.clone();
        let task = self.runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        plane.clone().forwarded(forward, tcp);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await, // out of descriptors: wait
                }
            }
        });
        self.forwards.lock().expect("forwards poisoned").insert(forward, task.abort_handle());
        Ok(bound)
    }

    pub fn stop_tcp(&self, forward: u64) {
        if let Some(task) = self.forwards.lock().expect("forwards poisoned").remove(&forward) {
            task.abort();
        }
    }

    pub fn shutdown(&self) {
        for (_, task) in self.forwards.lock().expect("forwards poisoned").drain() {
            task.abort();
        }
        self.endpoint.close(VarInt::from_u32(0), b"agent shutting down");
    }
}
