"""The client agent: how tunnels find and keep their paths, on top of ``AgentCore``.

Punching (with the birthday method's extra sockets against a symmetric NAT), the broker's
relay when no path answers, and moving the same QUIC connection between paths: onto a
punched path while relayed, back to the relay when a direct path goes silent, and after
our NAT moved us.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from natter_proto import frames
from natter_proto.endpoints import Endpoint
from natter_proto.frames import FrameError, Probe, ProbeAck, Punch
from natter_proto.punch import PathFound, PunchSession, PunchTimedOut
from natter_proto.registration import RegState
from natter_proto.relay import encode_relay
from natter_proto.relay import session_key as relay_key

from .agent_core import PATH_CHECK_INTERVAL, RELAY_PATH, AgentCore
from .errors import NatterError, PeerUnavailable
from .link import PeerLink
from .udp import AgentSocket


class Agent(AgentCore):
    """One natter client (see ``AgentCore``), with the tunnels' path finding."""

    # -- punching -----------------------------------------------------------------------
    def _start_punch(self, punch: Punch, now: float) -> None:
        if punch.role == "server" and not self.listening:
            self._log.warning("ignoring punch: not listening", peer=punch.peer)
            return
        if punch.session_id in self._sessions:
            return  # a repeated instruction for a session already under way
        self._log.info(
            f"punching to {punch.peer}",
            peer_nat=punch.peer_nat or "unknown",
            role=punch.role,
            public=str(punch.peer_public),
            candidates=len(punch.peer_locals) + 1,
            session=punch.session_id,
            request_id=punch.request_id,
        )
        sources, spray = 1, 0
        if self.nat == "hard" and punch.peer_nat == "easy":
            sources = self.config.hard_nat_sockets  # birthday method, hard side
            self._extra[punch.session_id] = self._open_extra_sockets(punch.session_id, sources - 1)
        elif self.nat == "easy" and punch.peer_nat == "hard":
            spray = self.config.spray_probes  # birthday method, easy side
        if sources > 1 or spray:
            self._log.info("peer behind a symmetric NAT: birthday punching", sockets=sources, spray=spray)
        self._sessions[punch.session_id] = PunchSession(
            self.name,
            punch,
            now,
            interval=self.config.punch_interval,
            timeout=self.config.punch_timeout,
            sources=sources,
            spray=spray,
        )
        # Keep the session a while after it ends: the peer may still be probing and needs
        # answers, and the QUIC server accepts the peer's Initial only from a known path.
        linger = punch.delay_ms / 1000 + self.config.punch_timeout + self.config.handshake_timeout
        self._loop_call_later(linger, self._end_session, punch.session_id)
        if punch.role == "client" and punch.relay and self.nat == punch.peer_nat == "hard":
            # two symmetric NATs: no probe can meet a mapping, so do not wait for the punch
            self._sessions[punch.session_id].succeed(RELAY_PATH)
            self._start_relay(self._sessions[punch.session_id], "both NATs are symmetric")

    # -- extra sockets for the birthday method ---------------------------------------------
    def _open_extra_sockets(self, session_id: str, count: int) -> list[AgentSocket]:
        opened = []
        for index in range(1, count + 1):
            sock = AgentSocket(
                functools.partial(self._on_extra_control, session_id, index),
                functools.partial(self._on_extra_quic, session_id, index),
                self._service,
            )
            try:
                sock.bind(self.config.udp_host, 0)
            except OSError:
                break  # out of ports or descriptors: punch with what we have
            opened.append(sock)
        return opened

    def _socket_for(self, session_id: str, source: int) -> AgentSocket:
        extra = self._extra.get(session_id)
        if source == 0 or extra is None or source > len(extra):
            return self.sock
        return extra[source - 1]

    def _on_extra_control(self, session_id: str, source: int, data: bytes, addr: Endpoint) -> None:
        session = self._sessions.get(session_id)
        try:
            message = frames.decode(data)
        except FrameError:
            self.stats["dropped_bad_frame"] += 1
            return
        if session is None or not isinstance(message, Probe | ProbeAck) or message.session_id != session_id:
            self.stats["dropped_unknown_session"] += 1
            return
        self.stats["accepted_probe"] += 1
        session.receive(message, addr, self._now(), source)

    def _on_extra_quic(self, session_id: str, source: int, data: bytes, addr: Endpoint) -> None:
        link = self._extra_links.get((session_id, source))
        if link is not None:
            self.stats["accepted_quic"] += 1
            link.datagram_received(data, addr)
            return
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.role != "server"
            or not self.listening
            or not session.knows(addr, source)
        ):
            self.stats["dropped_quic_unknown_source"] += 1
            return
        conn = self.engine.server_connection(data)
        if conn is None:
            self.stats["dropped_not_initial"] += 1
            return
        self.stats["accepted_quic"] += 1
        session.succeed(addr, source)
        link = self._new_link(conn, session.punch, addr, "server", source=source)
        link.datagram_received(data, addr)
        self._track(self._loop_create(self._await_handshake(link, session.punch)))

    def _end_session(self, session_id: str) -> None:
        """The session's linger is over: close its extra sockets but the one a tunnel uses."""
        self._sessions.pop(session_id, None)
        in_use = {source for (sid, source) in self._extra_links if sid == session_id}
        for index, sock in enumerate(self._extra.get(session_id, []), start=1):
            if index not in in_use:
                sock.close()

    def _on_punch_event(self, session: PunchSession, event: object) -> None:
        if isinstance(event, PathFound):
            self._log.info(
                "punch answered",
                peer=session.peer,
                path=str(event.path),
                probe_rtt_ms=round(event.rtt * 1000, 2),
            )
            if session.role == "client" and session.peer in self._refreshing:
                self._refreshing.discard(session.peer)
                self._log.info(
                    f"path to {session.peer} refreshed: its NAT now lets our new endpoint in",
                    path=str(event.path),
                )
                link = self._links.get(session.peer)
                if link is not None and link.is_alive and event.source == 0 and event.path != link.addr:
                    if link.path_kind == "relayed":
                        self._migrate(link, session.punch, event.path)
                    else:  # the peer's endpoint moved too: send there
                        link.direct_route = event.path
                        self._links_by_addr[event.path] = link
                        link.addr = event.path
            elif (
                session.role == "client"
                and event.source == 0
                and (moving := self._relayed_client(session.peer))
            ):
                self._migrate(moving, session.punch, event.path)
            elif session.role == "client":
                conn = self.engine.client_connection()
                link = self._new_link(conn, session.punch, event.path, "client", source=event.source)
                link.start_client()
                self._track(self._loop_create(self._await_handshake(link, session.punch)))
        elif isinstance(event, PunchTimedOut):
            tried = ", ".join(str(c) for c in event.tried)
            self._log.warning("punch failed: no answer", peer=session.peer, tried=tried)
            if session.role == "client" and session.peer in self._refreshing:
                self._refreshing.discard(session.peer)
                link = self._links.get(session.peer)
                silent = link is not None and link.is_alive and link.silent_for() > self.config.path_silence
                if silent and link is not None and session.punch.relay and link.path_kind != "relayed":
                    self._fall_back_to_relay(link, session.punch)
            elif session.role == "client" and session.punch.relay and session.peer not in self._upgrading:
                self._start_relay(session, "no probe was answered")
            elif session.role == "client":
                self._fail_waiter(
                    session.peer,
                    PeerUnavailable(
                        session.peer,
                        "punch_failed",
                        f"no direct path to {session.peer} (tried {tried})",
                    ),
                )

    def _relayed_client(self, peer: str) -> PeerLink | None:
        """Our relayed tunnel to peer, if we are its QUIC client and are looking for a path."""
        link = self._links.get(peer)
        looking = peer in self._upgrading and link is not None and link.is_alive
        if looking and link is not None and link.path_kind == "relayed" and link.role == "client":
            return link
        return None

    def _start_relay(self, session: PunchSession, why: str) -> None:
        self._log.info(f"no direct path to {session.peer} ({why}): tunnelling through the broker's relay")
        conn = self.engine.client_connection()
        link = self._new_link(conn, session.punch, RELAY_PATH, "client", relayed=True)
        link.start_client()
        self._track(self._loop_create(self._await_handshake(link, session.punch)))

    def _new_link(
        self, conn: object, punch: Punch, addr: Endpoint, role: str, *, relayed: bool = False, source: int = 0
    ) -> PeerLink:
        sock = self._socket_for(punch.session_id, source)
        link = PeerLink(
            send=sock.send_batch,  # a direct path: straight out of the socket
            conn=conn,  # type: ignore[arg-type]
            peer=punch.peer,
            addr=addr,
            role=role,
            on_incoming=self._on_incoming_stream,
            on_closed=self._on_link_closed,
            verify=self._verify_peer,
            expected_key=punch.peer_key,
            ping_interval=self.config.ping_interval,
            send_buffer_limit=self.config.send_buffer_limit,
        )
        if role == "client":
            link.receive_as = (addr.host, addr.port)  # QUIC's peer address, wherever we route
        if relayed:
            link.path_kind = "relayed"
            self._use_relay(link, relay_key(punch.session_id), via_relay=role == "client")
            return link
        link.path_kind, link.probes = self._path_kind(punch, addr)
        if source:
            self._extra_links[(punch.session_id, source)] = link  # its datagrams come on that socket
            return link
        old = self._links_by_addr.get(addr)
        if old is not None:
            old.close("replaced by a new tunnel")
        self._links_by_addr[addr] = link
        return link

    def _use_relay(self, link: PeerLink, key: bytes, *, via_relay: bool) -> None:
        """Let link reach its peer through the broker's relay under session key. A client
        sends everything there (via_relay); a server follows its QUIC peer address, which
        is the relay's placeholder or, after the client moved, a real one."""
        link.via_relay = via_relay
        self._relay_links[key] = link
        broker = self.broker  # the relay is the broker the session was introduced by
        relay_host, relay_port = RELAY_PATH.host, RELAY_PATH.port

        def send(datagrams: list[tuple[bytes, Any]]) -> None:
            direct: list[tuple[bytes, Any]] = []
            route = link.direct_route
            for data, addr in datagrams:
                if link.via_relay or (route is None and addr[1] == relay_port and addr[0] == relay_host):
                    self.sock.sendto(encode_relay(key, data), broker)
                else:
                    direct.append((data, (route.host, route.port) if route is not None else addr))
            if direct:
                self.sock.send_batch(direct)

        link.set_sender(send)

    def _fall_back_to_relay(self, link: PeerLink, punch: Punch) -> None:
        """Our direct tunnel went silent and a new punch found no path: move the same QUIC
        connection onto the broker's relay (the session just introduced allows it); the
        listener finds it there by connection ID. The upgrade loop looks for a path again."""
        self._log_migration(link, "relayed", str(link.addr), "relay " + str(self.broker))
        link.direct_route = None
        link.path_kind = "relayed"
        self._use_relay(link, relay_key(punch.session_id), via_relay=True)
        link.conn.send_ping(0)
        link.flush()
        if self.config.upgrade_interval > 0:
            self._track(self._loop_create(self._keep_trying_direct(link)))

    def _log_migration(self, link: PeerLink, new_kind: str, old: str, new: str) -> None:
        """The one line a tunnel's move gets: the same QUIC connection, another path."""
        self._log.info(
            f"path change for {link.peer}: {link.path_kind} -> {new_kind}",
            old=old,
            new=new,
            open_connections=link.open_streams,
            migrated=True,
        )

    def _path_kind(self, punch: Punch, addr: Endpoint) -> tuple[str, int]:
        """lan, predicted (birthday method, with its probes) or direct; for status and logs."""
        session = self._sessions.get(punch.session_id)
        if addr in punch.peer_locals and addr != punch.peer_public:
            return "lan", 0
        if session is not None and session.predicting:
            return "predicted", session.probes_sent
        return "direct", 0

    def _migrate(self, link: PeerLink, punch: Punch, path: Endpoint) -> None:
        """The relayed tunnel's client found a direct path: send the same QUIC connection
        there. The listener sees our packets arrive from a new address, finds the tunnel by
        connection ID and validates the path (QUIC migration); connections in flight go on."""
        kind, link.probes = self._path_kind(punch, path)
        self._log_migration(link, kind, "relay " + str(self.broker), str(path))
        link.direct_route = path
        link.via_relay = False
        link.addr = path
        link.path_kind = kind
        self._links_by_addr[path] = link
        link.conn.send_ping(0)  # something for the listener to see on the new path at once
        link.flush()
        waiter = self._waiters.pop(link.peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(link)

    async def _await_handshake(self, link: PeerLink, punch: Punch) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), self.config.handshake_timeout)
        except (TimeoutError, ConnectionError) as exc:
            reason = "QUIC handshake timed out" if isinstance(exc, TimeoutError) else str(exc)
            self._log.warning("tunnel failed", peer=link.peer, path=str(link.addr), reason=reason)
            link.close(reason)
            if link.role == "client":
                self._fail_waiter(link.peer, PeerUnavailable(link.peer, "handshake_failed", reason))
            return
        previous = self._links.get(link.peer)
        self._links[link.peer] = link
        if previous is not None and previous is not link and previous.is_alive:
            self._log.info(
                f"path change for {link.peer}: {previous.path_kind} -> {link.path_kind}",
                old=str(previous.addr),
                new=str(link.addr),
                open_connections=previous.open_streams,
            )
            self._track(self._loop_create(self._drain(previous, f"moved to a {link.path_kind} path")))
        if link.path_kind == "relayed" and link.role == "client" and self.config.upgrade_interval > 0:
            self._track(self._loop_create(self._keep_trying_direct(link)))
        self._log.info(
            f"{'relayed' if link.path_kind == 'relayed' else 'direct'} path up with {link.peer}",
            peer_endpoint=str(link.addr),
            path=link.path_kind,
            probes=link.probes or None,
            relay=str(self.broker) if link.path_kind == "relayed" else None,
            rtt_ms=round(link.rtt * 1000, 2),
            role=link.role,
        )
        waiter = self._waiters.pop(link.peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(link)

    async def _drain(self, link: PeerLink, reason: str) -> None:
        """A replaced tunnel serves its open connections to their end, then closes."""
        while link.is_alive and link.open_streams > 0:
            await asyncio.sleep(0.5)
        link.close(reason)

    def _refresh_paths(self) -> None:
        """Our NAT moved us to a new public endpoint. A QUIC client's new address reaches a
        peer whose NAT filters by address only once that peer has sent to it: punch again
        (the broker tells the peer our new endpoint, its probes open its NAT) and keep the
        tunnel, which QUIC moves to the new path (the listener finds it by connection ID)."""
        for peer, link in list(self._links.items()):
            movable = link.is_alive and link.role == "client" and link.path_kind in ("direct", "predicted")
            if movable:
                self._punch_again(peer, f"punching to {peer} again: our public endpoint changed")

    def _watch_paths(self) -> None:
        """A tunnel that sends but hears nothing back may have lost its NAT mapping: ask the
        broker where it sees us now instead of waiting for the next keepalive."""
        now = self._now()
        if self.registration is None or self.registration.state is not RegState.REGISTERED:
            return
        for peer, link in list(self._links.items()):
            if not link.is_alive or link.path_kind == "relayed" or link.role != "client":
                continue
            silent = link.silent_for()
            if silent > self.config.path_silence and now - self._endpoint_checked >= PATH_CHECK_INTERVAL:
                self._endpoint_checked = now
                self.registration.check_endpoint(now)
                self._service()
            if silent > self.config.path_dead:
                # still nothing back, and our endpoint did not move: punch again, and go to
                # the relay if no path answers
                self._punch_again(
                    peer,
                    f"tunnel to {peer} hears nothing back: punching again",
                    warning=True,
                    silent_s=round(silent, 1),
                )

    def _punch_again(self, peer: str, why: str, *, warning: bool = False, **fields: object) -> None:
        """A new punch for a tunnel we keep: its outcome moves the tunnel (see _on_punch_event)."""
        if peer not in self._refreshing and peer not in self._upgrading:
            self._refreshing.add(peer)
            (self._log.warning if warning else self._log.info)(why, **fields)
            self._send_connect(peer, "")

    async def _keep_trying_direct(self, relayed: PeerLink) -> None:
        """While relayed, punch again now and then; a direct path takes new connections."""
        peer = relayed.peer
        while True:
            await asyncio.sleep(self.config.upgrade_interval)
            if not relayed.is_alive or self._links.get(peer) is not relayed or self._closed:
                return
            if relayed.path_kind != "relayed":
                return  # moved onto a direct path
            self._upgrading.add(peer)
            try:
                await asyncio.shield(self._start_connect(peer, ""))
            except (NatterError, ConnectionError):
                self._log.info(f"still no direct path to {peer}; staying on the relay")
            finally:
                self._upgrading.discard(peer)
