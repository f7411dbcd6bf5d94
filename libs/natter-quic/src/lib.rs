//! natter's native QUIC engine: quinn and rustls on tokio, owning the agent's UDP socket,
//! with forwarded TCP connections spliced to QUIC streams in native threads. Python keeps
//! registration, punching, the path machine and every trust decision; it hears about the
//! data plane through ``poll_events`` (woken by a byte on ``wake_fd``).

pub mod events;
pub mod plane;
pub mod socket;
pub mod splice;
pub mod streams;
pub mod tls;

#[cfg(feature = "python")]
mod python;
