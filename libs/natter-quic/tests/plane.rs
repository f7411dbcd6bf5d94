//! Two planes on loopback, as two agents: the handshake with both natter keys, the
//! verdicts, one forwarded TCP connection spliced both ways with a half-close, and a
//! refused peer. Python's part (the decisions) is played by the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use natter_quic::events::{Event, EventQueue};
use natter_quic::plane::{Decision, Plane, Settings};
use natter_quic::socket::Route;

fn settings() -> Settings {
    Settings {
        idle_timeout: 10.0,
        stream_window: 1 << 20,
        connection_window: 8 << 20,
        max_streams: 64,
        max_datagram_size: 1350,
        header_timeout: 5.0,
        max_pending_streams: 8,
        congestion: "cubic".into(),
        keep_alive: 5.0,
        ack_every: 2,
    }
}

struct Agent {
    plane: Arc<Plane>,
    addr: SocketAddr,
    _wake: UnixStream,
}

fn agent() -> Agent {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["natter".into()]).unwrap().self_signed(&key).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let events = Arc::new(EventQueue::new(ours));
    let plane = Plane::new(socket, cert.der(), &key.serialize_der(), settings(), events, 1).unwrap();
    Agent { plane, addr, _wake: theirs }
}

/// The next event that ``want`` picks, within 10 s; what else comes is answered as the
/// agent would: datagrams from the peer start its tunnel (as the server, number 2).
fn next(a: &Agent, want: impl Fn(&Event) -> bool) -> Event {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        for event in a.plane.events.drain(64) {
            if want(&event) {
                return event;
            }
            if let Event::Datagram { data, from } = event {
                a.plane.route(2, Some(Route::Direct(from)));
                assert!(a.plane.accept_initial(2, data));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no such event within 10 s");
}

fn header(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

#[test]
fn a_forwarded_connection_is_spliced_both_ways() {
    let (alice, bob) = (agent(), agent());
    alice.plane.route(1, Some(Route::Direct(bob.addr)));
    alice.plane.connect(1).unwrap();
    let Event::Authenticated { key: Some(_), .. } = next(&bob, |e| matches!(e, Event::Authenticated { .. })) else { panic!() };
    bob.plane.verdict(2, None);
    let Event::Authenticated { key: Some(_), .. } = next(&alice, |e| matches!(e, Event::Authenticated { .. })) else { panic!() };
    alice.plane.verdict(1, None);
    next(&alice, |e| matches!(e, Event::PeerAccepted { tunnel: 1 }));

    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_addr = service.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = service.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap(); // the forward's half-close arrives as EOF
        conn.write_all(&got).unwrap();
    });
    let port = TcpListener::bind("127.0.0.1:0").unwrap();
    let local = port.local_addr().unwrap();
    alice.plane.listen_tcp(7, port).unwrap();
    let mut user = TcpStream::connect(local).unwrap();
    let Event::Accepted { forward: 7, conn } = next(&alice, |e| matches!(e, Event::Accepted { .. })) else { panic!() };
    assert!(alice.plane.decide(conn, Decision::Open { tunnel: 1, header: header(b"target") }));
    let Event::Incoming { conn: theirs, header: got, .. } = next(&bob, |e| matches!(e, Event::Incoming { .. })) else { panic!() };
    assert_eq!(got, header(b"target"));
    assert!(bob.plane.decide(theirs, Decision::Connect { addresses: vec![service_addr], reply: header(b"ok") }));
    let Event::Reply { header: reply, .. } = next(&alice, |e| matches!(e, Event::Reply { .. })) else { panic!() };
    assert_eq!(reply, header(b"ok"));
    assert!(alice.plane.decide(conn, Decision::Splice));
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    user.write_all(&payload).unwrap();
    user.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    user.read_to_end(&mut back).unwrap();
    assert!(back == payload, "the echo came back byte-exact");
    echo.join().unwrap();
    let Event::Done { sent, received, .. } = next(&alice, |e| matches!(e, Event::Done { .. })) else { panic!() };
    assert_eq!((sent, received), (3_000_000, 3_000_000));
}

#[test]
fn a_refused_peer_hears_the_reason() {
    let (alice, bob) = (agent(), agent());
    alice.plane.route(1, Some(Route::Direct(bob.addr)));
    alice.plane.connect(1).unwrap();
    next(&bob, |e| matches!(e, Event::Authenticated { .. }));
    bob.plane.verdict(2, Some("alice is not allowed".into()));
    next(&alice, |e| matches!(e, Event::Authenticated { .. }));
    alice.plane.verdict(1, None);
    let Event::Closed { reason, .. } = next(&alice, |e| matches!(e, Event::Closed { .. })) else { panic!() };
    assert!(reason.contains("alice is not allowed"), "{reason}");
}

#[test]
fn a_refused_adopted_connection_reads_its_last_word_then_the_end() {
    // a SOCKS client whose request the peer refused: the reply is written, then EOF (no reset)
    let alice = agent();
    let port = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut user = TcpStream::connect(port.local_addr().unwrap()).unwrap();
    let (accepted, _) = port.accept().unwrap();
    let conn = {
        let _guard = alice.plane.runtime.enter();
        accepted.set_nonblocking(true).unwrap();
        alice.plane.adopt(tokio::net::TcpStream::from_std(accepted).unwrap())
    };
    assert!(alice.plane.decide(conn, Decision::Refuse { reply: b"\x05\x02last word".to_vec() }));
    let mut got = Vec::new();
    user.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"\x05\x02last word");
    let Event::Done { error, .. } = next(&alice, |e| matches!(e, Event::Done { .. })) else { panic!() };
    assert_eq!(error, "refused");
}

#[test]
fn datagrams_cross_a_tunnel_and_oversized_ones_are_refused() {
    let (alice, bob) = (agent(), agent());
    alice.plane.route(1, Some(Route::Direct(bob.addr)));
    alice.plane.connect(1).unwrap();
    next(&bob, |e| matches!(e, Event::Authenticated { .. }));
    bob.plane.verdict(2, None);
    next(&alice, |e| matches!(e, Event::Authenticated { .. }));
    alice.plane.verdict(1, None);
    next(&alice, |e| matches!(e, Event::PeerAccepted { tunnel: 1 }));
    let room = alice.plane.datagram_room(1);
    assert!(room > 1000 && room < 1350, "room {room}");
    assert!(!alice.plane.send_datagram(1, vec![7u8; room + 1]));
    assert!(alice.plane.send_datagram(1, vec![0x22, 1, 2, 3]));
    let Event::TunnelDatagram { tunnel: 2, data } = next(&bob, |e| matches!(e, Event::TunnelDatagram { .. })) else { panic!() };
    assert_eq!(data, vec![0x22, 1, 2, 3]);
}
