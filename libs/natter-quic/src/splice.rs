//! One TCP connection and one QUIC stream, spliced both ways in native code: half-close
//! travels as FIN either way, a reset as a reset. Memory stays bounded by QUIC's flow
//! control (a blocked write stops the TCP reads) and one buffer per direction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub const ERR_RESET: u32 = 0x1; // natter's application error code on RESET_STREAM / STOP_SENDING
const CHUNK: usize = 256 * 1024;

#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub open_streams: AtomicU64,
}

pub struct Spliced {
    pub sent: u64,
    pub received: u64,
    pub error: String,
}

/// Drop a TCP connection with a reset (SO_LINGER 0), as a reset QUIC stream asks.
pub fn abort(write: OwnedWriteHalf) {
    let _ = socket2::SockRef::from(write.as_ref()).set_linger(Some(Duration::ZERO));
    drop(write);
}

async fn tcp_to_quic(mut read: OwnedReadHalf, mut send: SendStream, tunnel: Arc<Counters>) -> Result<u64, String> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match read.read(&mut buf).await {
            Ok(0) => {
                let _ = send.finish();
                return Ok(total);
            }
            Ok(n) => {
                if let Err(e) = send.write_all(&buf[..n]).await {
                    return Err(format!("stream write: {e}"));
                }
                total += n as u64;
                tunnel.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                let _ = send.reset(VarInt::from_u32(ERR_RESET));
                return Err(format!("tcp read: {e}"));
            }
        }
    }
}

async fn quic_to_tcp(mut recv: RecvStream, mut write: OwnedWriteHalf, tunnel: Arc<Counters>) -> (Result<u64, String>, Option<OwnedWriteHalf>) {
    let mut total = 0u64;
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = write.write_all(&chunk.bytes).await {
                    let _ = recv.stop(VarInt::from_u32(ERR_RESET));
                    return (Err(format!("tcp write: {e}")), Some(write));
                }
                total += chunk.bytes.len() as u64;
                tunnel.received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            }
            Ok(None) => {
                let _ = write.shutdown().await;
                return (Ok(total), Some(write));
            }
            Err(e) => {
                abort(write);
                return (Err(format!("stream read: {e}")), None);
            }
        }
    }
}

/// Splice until both directions ended; ``leftover`` is payload that came with the header.
pub async fn splice(tcp: TcpStream, send: SendStream, recv: RecvStream, leftover: Vec<u8>, tunnel: Arc<Counters>) -> Spliced {
    let (read, mut write) = tcp.into_split();
    if !leftover.is_empty() {
        if let Err(e) = write.write_all(&leftover).await {
            abort(write);
            return Spliced { sent: 0, received: 0, error: format!("tcp write: {e}") };
        }
        tunnel.received.fetch_add(leftover.len() as u64, Ordering::Relaxed);
    }
    let extra = leftover.len() as u64;
    tunnel.open_streams.fetch_add(1, Ordering::Relaxed);
    let (up, (down, write)) = tokio::join!(tcp_to_quic(read, send, tunnel.clone()), quic_to_tcp(recv, write, tunnel.clone()));
    tunnel.open_streams.fetch_sub(1, Ordering::Relaxed);
    if let (Err(_), Some(write)) = (&up, write) {
        abort(write); // the TCP side broke: the peer's stream was reset, so is ours
    }
    let error = [&up, &down].iter().filter_map(|r| r.as_ref().err().cloned()).collect::<Vec<_>>().join("; ");
    Spliced { sent: *up.as_ref().unwrap_or(&0), received: down.unwrap_or(0) + extra, error }
}
