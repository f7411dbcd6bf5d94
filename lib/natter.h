/*
 * libnatter: natter's C API.
 *
 * natter makes a TCP port on one machine appear as a local port on another when both sit
 * behind NATs (a broker introduces them, they punch through, the bytes ride QUIC).
 * The library embeds natter's Python implementation; a C program links -lnatter and never
 * sees Python.
 *
 * Conventions
 * - Brokers, clients and forwards are named by handles (positive integers). Closing a
 *   handle twice, or using a closed one, returns NATTER_E_HANDLE; it never crashes.
 * - Every call returns 0 (or a handle/port, which are positive) on success and a negative
 *   NATTER_E_* code on failure; natter_last_error() then describes the failure in words.
 *   The message belongs to the calling thread and stays valid until its next natter call.
 * - Every call is thread-safe. Calls that run forever in the original natter (a broker
 *   serving, a client listening) run on a background thread inside the library and return
 *   at once; close the handle to stop them.
 * - Addresses are "HOST:PORT" or ":PORT" (all interfaces for a broker, 127.0.0.1 for a
 *   forward's local side, the peer's localhost for a forward's remote side). Port 0 asks
 *   for any free port; natter_broker_port() and natter_forward_port() tell which.
 * - Logging goes to stderr; set NATTER_LOG_LEVEL=debug|info|warning|error (default warning).
 */
#ifndef NATTER_H
#define NATTER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int64_t natter_handle;

#define NATTER_OK 0
#define NATTER_E_INVALID (-1) /* NULL or malformed argument (address, name)          */
#define NATTER_E_HANDLE (-2)  /* unknown or already closed handle                     */
#define NATTER_E_FAILED (-3)  /* the operation failed: port taken, peer unknown, ...  */
#define NATTER_E_TIMEOUT (-4) /* the operation did not finish in time                 */

/* The library's version, e.g. "0.1.0". Static storage; never NULL. */
const char *natter_version(void);

/* The calling thread's last error message ("" if the last call succeeded). Never NULL. */
const char *natter_last_error(void);

/* Start a broker listening on addr (e.g. ":10000"). Returns a broker handle (> 0). */
natter_handle natter_broker_listen(const char *addr);
/* The UDP port the broker listens on (> 0). */
int natter_broker_port(natter_handle broker);
/* Stop the broker (its agents are told to move to another broker). */
int natter_broker_close(natter_handle broker);

/* Create a client named name, registering with the broker at broker_addr. state_dir holds
 * its identity key (NULL: ~/.config/natter). The environment variable NATTER_QUIC_ENGINE
 * picks its QUIC engine (aioquic, qh3 or native) as for the natter command; unset: qh3.
 * Returns a client handle (> 0). */
natter_handle natter_client_new(const char *name, const char *broker_addr, const char *state_dir);
/* Accept forwards from peers; returns once the broker has registered the client. */
int natter_client_listen(natter_handle client);
/* Forward TCP connections on local_addr to remote_addr as seen from peer; a remote_addr
 * ending in "/udp" (":53/udp") forwards UDP datagrams instead, and remote_addr "socks" makes
 * local_addr a SOCKS5 server whose connections go where they ask, from peer's side (as
 * ssh -D). Returns a forward handle (> 0) once the local port is bound; the tunnel comes
 * up in the background. */
natter_handle natter_client_forward(natter_handle client, const char *local_addr, const char *peer,
                                    const char *remote_addr);
/* Wait up to timeout_seconds for the tunnel to peer (optional; forwards wait by themselves). */
int natter_client_connect(natter_handle client, const char *peer, double timeout_seconds);
/* The local TCP port of a forward (> 0). */
int natter_forward_port(natter_handle forward);
/* Stop one forward; the client and its other forwards go on. */
int natter_forward_close(natter_handle forward);
/* Stop a client and all its forwards. */
int natter_client_close(natter_handle client);

#ifdef __cplusplus
}
#endif

#endif /* NATTER_H */
