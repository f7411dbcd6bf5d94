//! The two ends of a forwarded connection, in native tasks. Python decides at each step
//! (which tunnel, whether the peer's reply is an acceptance, whether a target is allowed);
//! bytes never go to Python. Stream headers are natter_proto's, passed raw both ways.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::events::Event;
use crate::plane::{Decision, Plane};
use crate::splice::{self, ERR_RESET};

pub const MAX_HEADER: usize = 1024; // natter_proto.streamhdr.MAX_HEADER
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Read a length-prefixed header; returns (the header with its prefix, what followed).
async fn read_header(recv: &mut RecvStream) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut got: Vec<u8> = Vec::new();
    loop {
        if got.len() >= 2 {
            let size = usize::from(u16::from_be_bytes([got[0], got[1]]));
            if size > MAX_HEADER {
                return Err(format!("stream header of {size} bytes exceeds {MAX_HEADER}"));
            }
            if got.len() >= 2 + size {
                let rest = got.split_off(2 + size);
                return Ok((got, rest));
            }
        }
        match recv.read_chunk(2 + MAX_HEADER, true).await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err("stream ended before its header".into()),
            Err(e) => return Err(format!("stream: {e}")),
        }
    }
}

fn reset_both(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = send.reset(VarInt::from_u32(ERR_RESET));
    let _ = recv.stop(VarInt::from_u32(ERR_RESET));
}

impl Plane {
    /// Forward side: a TCP connection was accepted; Python picks its tunnel.
    pub fn forwarded(self: Arc<Self>, forward: u64, tcp: TcpStream) {
        let conn = self.adopt(tcp);
        self.events.push(Event::Accepted { forward, conn });
    }

    /// A connection Python accepted itself (a SOCKS client, after its handshake): from
    /// here on it is a forwarded connection like the others, waiting for its tunnel.
    pub fn adopt(self: &Arc<Self>, tcp: TcpStream) -> u64 {
        let (conn, decision) = self.new_conn();
        let plane = self.clone();
        self.runtime.spawn(async move { plane.serve_forwarded(conn, tcp, decision).await });
        conn
    }

    async fn serve_forwarded(self: Arc<Self>, conn: u64, tcp: TcpStream, mut decision: tokio::sync::oneshot::Receiver<Decision>) {
        loop {
            let (tunnel, header) = match decision.await {
                Ok(Decision::Open { tunnel, header }) => (tunnel, header),
                Ok(Decision::Refuse { reply }) => return self.answer_and_close(conn, tcp, reply).await,
                _ => return self.fail(conn, tcp, "refused"),
            };
            let Some((connection, counters, _)) = self.connection(tunnel) else {
                decision = self.ask_again(conn);
                continue;
            };
            // open_bi waits while the peer allows no more streams: connections queue
            let opened = async {
                let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&header).await.map_err(|e| e.to_string())?;
                let (reply, rest) = read_header(&mut recv).await?;
                Ok::<_, String>((send, recv, reply, rest))
            };
            match opened.await {
                Ok((mut send, mut recv, reply, rest)) => {
                    let answer = self.await_again(conn);
                    self.events.push(Event::Reply { conn, header: reply });
                    match answer.await {
                        Ok(Decision::Splice) => {
                            let done = splice::splice(tcp, send, recv, rest, counters).await;
                            self.events.push(Event::Done { conn, sent: done.sent, received: done.received, error: done.error });
                        }
                        Ok(Decision::Refuse { reply }) => {
                            reset_both(&mut send, &mut recv);
                            self.answer_and_close(conn, tcp, reply).await;
                        }
                        _ => {
                            reset_both(&mut send, &mut recv);
                            self.fail(conn, tcp, "refused");
                        }
                    }
                    return;
                }
                Err(_) => {
                    // the tunnel closed before the peer answered: nothing reached the service
                    decision = self.ask_again(conn);
                }
            }
        }
    }

    /// Tell Python a connection's tunnel was lost before an answer (an empty reply).
    fn ask_again(&self, conn: u64) -> tokio::sync::oneshot::Receiver<Decision> {
        let rx = self.await_again(conn);
        self.events.push(Event::Reply { conn, header: Vec::new() });
        rx
    }

    fn fail(&self, conn: u64, tcp: TcpStream, why: &str) {
        let (_, write) = tcp.into_split();
        splice::abort(write);
        self.events.push(Event::Done { conn, sent: 0, received: 0, error: why.into() });
    }

    /// A refused connection that gets a last word (a SOCKS client's failure reply): it is
    /// written and the connection closed in order, so the client reads it before the end.
    /// Without one, the connection is reset as ``fail`` does.
    async fn answer_and_close(&self, conn: u64, mut tcp: TcpStream, reply: Vec<u8>) {
        if reply.is_empty() {
            return self.fail(conn, tcp, "refused");
        }
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, async {
            tcp.write_all(&reply).await?;
            tcp.shutdown().await
        })
        .await;
        self.events.push(Event::Done { conn, sent: 0, received: 0, error: "refused".into() });
    }

    /// Listener side: a stream the peer opened; its header first, within the time limit.
    pub fn incoming_stream(self: Arc<Self>, tunnel: u64, send: SendStream, recv: RecvStream) {
        let plane = self.clone();
        self.runtime.spawn(async move { plane.serve_incoming(tunnel, send, recv).await });
    }

    async fn serve_incoming(self: Arc<Self>, tunnel: u64, mut send: SendStream, mut recv: RecvStream) {
        let Some((_, counters, pending)) = self.connection(tunnel) else {
            return reset_both(&mut send, &mut recv);
        };
        if pending.fetch_add(1, Ordering::Relaxed) >= u64::from(self.settings.max_pending_streams) {
            pending.fetch_sub(1, Ordering::Relaxed);
            reset_both(&mut send, &mut recv);
            return self.events.push(Event::Refused { tunnel, reason: "pending_streams" });
        }
        let limit = Duration::from_secs_f64(self.settings.header_timeout);
        let header = tokio::time::timeout(limit, read_header(&mut recv)).await;
        pending.fetch_sub(1, Ordering::Relaxed);
        let (header, rest) = match header {
            Ok(Ok(found)) => found,
            Ok(Err(_)) => {
                reset_both(&mut send, &mut recv);
                return self.events.push(Event::Refused { tunnel, reason: "bad_header" });
            }
            Err(_) => {
                reset_both(&mut send, &mut recv);
                return self.events.push(Event::Refused { tunnel, reason: "header_timeout" });
            }
        };
        let (conn, decision) = self.new_conn();
        self.events.push(Event::Incoming { tunnel, conn, header });
        let (addresses, reply) = match decision.await {
            Ok(Decision::Connect { addresses, reply }) => (addresses, reply),
            Ok(Decision::Refuse { reply }) => return self.refuse_stream(conn, send, recv, reply).await,
            _ => return reset_both(&mut send, &mut recv),
        };
        let tcp = match connect_first(&addresses).await {
            Ok(tcp) => tcp,
            Err((reason, errno)) => {
                let answer = self.await_again(conn);
                self.events.push(Event::ConnectFailed { conn, reason, errno });
                let reply = match answer.await {
                    Ok(Decision::Refuse { reply }) => reply,
                    _ => Vec::new(),
                };
                return self.refuse_stream(conn, send, recv, reply).await;
            }
        };
        if send.write_all(&reply).await.is_err() {
            reset_both(&mut send, &mut recv);
            return self.events.push(Event::Done { conn, sent: 0, received: 0, error: "stream closed".into() });
        }
        let done = splice::splice(tcp, send, recv, rest, counters).await;
        self.events.push(Event::Done { conn, sent: done.sent, received: done.received, error: done.error });
    }

    async fn refuse_stream(&self, conn: u64, mut send: SendStream, mut recv: RecvStream, reply: Vec<u8>) {
        if reply.is_empty() || send.write_all(&reply).await.is_err() {
            reset_both(&mut send, &mut recv);
        } else {
            let _ = send.finish();
            // what the peer still sends on a refused stream is read and dropped until it ends
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async { while let Ok(Some(_)) = recv.read_chunk(usize::MAX, false).await {} }).await;
            let _ = recv.stop(VarInt::from_u32(ERR_RESET));
        }
        self.events.push(Event::Done { conn, sent: 0, received: 0, error: "refused".into() });
    }
}

/// ``ssh -L``'s way: the first address that takes the connection ('localhost' is often
/// ::1 before 127.0.0.1, and a service may listen on one of them only).
/// Fails with the last reason and its errno (none for a timeout).
async fn connect_first(addresses: &[SocketAddr]) -> Result<TcpStream, (String, Option<i32>)> {
    let mut last = (String::from("no address"), None);
    for addr in addresses {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = (e.kind().to_string(), e.raw_os_error()),
            Err(_) => last = ("timed out".into(), None),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::MAX_HEADER;

    #[test]
    fn the_header_bound_is_natter_protos() {
        assert_eq!(MAX_HEADER, 1024);
    }
}
