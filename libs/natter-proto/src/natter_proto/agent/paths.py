"""PeerPaths: everything about how one peer is reached, as a table of transitions.

One object per peer owns that peer's tunnels, each tunnel's current path and its kind,
and the rules that move them: silence judged by acknowledged pings (not by the gaps of a
one-way transfer), a re-punch when a path dies, the relay when no path answers, an
upgrade from the relay, and following the peer when its datagrams arrive on a new path.
It never sends anything itself: it appends actions to the machine's outbox and asks the
machine for punches (``wants``), whose outcomes come back as signals.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from .actions import (
    Action,
    CloseTunnel,
    Level,
    Notice,
    NoticeKind,
    PathChanged,
    PeerReady,
    PeerUnreachable,
    PingTunnel,
    RouteTunnel,
    TunnelUp,
)
from .kinds import Path, PathKind, Role
from .pathstate import TRANSITIONS, Health, Purpose, Signal, Tunnel
from .settings import AgentSettings


class PeerPaths:
    """One peer's tunnels and paths (see the module docstring)."""

    def __init__(
        self,
        peer: str,
        settings: AgentSettings,
        outbox: deque[Action],
        ids: Callable[[], int],
    ) -> None:
        self.peer = peer
        self.settings = settings
        self._out = outbox
        self._ids = ids
        self.tunnels: dict[int, Tunnel] = {}
        self.current: int | None = None  # the tunnel new connections use
        self.wants: deque[Purpose] = deque()  # punches to ask the broker for
        self.repairing: Purpose | None = None  # the re-punch in flight for our tunnel
        self.check_endpoint = False  # a tunnel went quiet: ask the broker where it sees us
        self.next_upgrade: float | None = None
        self._uids = itertools.count(1)

    # -- queries ----------------------------------------------------------------------
    def usable(self) -> Tunnel | None:
        tunnel = self.tunnels.get(self.current) if self.current is not None else None
        return tunnel if tunnel is not None and tunnel.usable else None

    def client_tunnel(self) -> Tunnel | None:
        """The tunnel whose paths we decide (we are its QUIC client)."""
        tunnel = self.tunnels.get(self.current) if self.current is not None else None
        return tunnel if tunnel is not None and tunnel.role is Role.CLIENT else None

    # -- tunnels come and go ---------------------------------------------------------
    def add(self, role: Role, route: Path, kind: PathKind, now: float, probes: int = 0) -> Tunnel:
        tunnel = Tunnel(self._ids(), role, route, kind, now, probes, route_since=now, routes={route})
        self.tunnels[tunnel.id] = tunnel
        return tunnel

    def signal(self, tunnel: Tunnel, signal: Signal, now: float) -> None:
        """Apply one transition of the table to ``tunnel``."""
        step = TRANSITIONS.get((tunnel.health, signal))
        if step is None:
            return
        tunnel.health, effect = step
        if effect:
            getattr(self, "_on_" + effect)(tunnel, now)

    # -- inputs -----------------------------------------------------------------------
    def ready(self, tunnel_id: int, now: float) -> None:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is not None:
            self.signal(tunnel, Signal.READY, now)

    def closed(self, tunnel_id: int, now: float) -> None:
        tunnel = self.tunnels.pop(tunnel_id, None)
        if tunnel is None:
            return
        self.signal(tunnel, Signal.CLOSED, now)
        if self.current == tunnel_id:
            self.current = None
            self.repairing = None
            self.next_upgrade = None

    def pong(self, tunnel_id: int, uid: int, busy: bool, now: float) -> None:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or uid < tunnel.ping_uid:
            return  # an answer to a ping older than the oldest one we wait for
        if tunnel.silent_since is not None and uid == tunnel.ping_uid:
            tunnel.rtt = now - tunnel.silent_since  # the oldest ping we waited for is the newest answer
        tunnel.ping_uid, tunnel.silent_since, tunnel.busy, tunnel.quick_quiet = 0, None, busy, None
        tunnel.next_ping = now + self._ping_gap(tunnel)
        self.signal(tunnel, Signal.PONG, now)

    def activity(self, tunnel_id: int, now: float) -> None:
        """A new connection: check the tunnel's path now, not at the next ping. Its answer is
        due within a few (measured, so loaded) round trips, not path_silence: the ping
        already on its way, or one sent now (the tunnel was idle, or was busy a moment ago
        and is between pings: a peer that restarted meanwhile is found as fast)."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.health is not Health.HEALTHY or tunnel.quick_quiet is not None:
            return
        due = now + max(self.settings.idle_check_floor, 4 * tunnel.rtt)
        if tunnel.silent_since is None:
            tunnel.busy = True
            self._restart_silence(tunnel)
            self._ping(tunnel, now)
        tunnel.quick_quiet = due

    def heard_on(self, tunnel_id: int, path: Path, kind: PathKind, now: float) -> None:
        """The peer's datagrams came on another path than the tunnel's route: follow it if
        it is new (the peer's NAT moved, or its client moved the tunnel), or if we left it
        more than a moment ago (not a straggler of a move just made). A client does not
        follow onto the relay: whether to use it is its own decision."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or path == tunnel.route or tunnel.health is Health.CLOSED:
            return
        if path.relayed and tunnel.role is Role.CLIENT:
            return
        if path in tunnel.routes and now - tunnel.route_since < self.settings.path_settle:
            return
        reason = "peer moved" if not path.relayed else "peer moved to the relay"
        self._route(tunnel, path, kind, now, reason)

    def endpoint_moved(self, now: float) -> None:
        """Our NAT gave us a new public endpoint: a peer whose NAT filters by address lets it
        in only once it has sent to it, so punch again (the tunnel stays, and moves)."""
        tunnel = self.client_tunnel()
        if tunnel is not None and tunnel.usable and not tunnel.route.relayed:
            self._repair(Purpose.REFRESH, f"punching to {self.peer} again: our public endpoint changed")

    def punch_found(self, purpose: Purpose, path: Path, kind: PathKind, probes: int, now: float) -> None:
        """A re-punch (refresh or upgrade) found a path for the current tunnel."""
        self.repairing = None
        tunnel = self.client_tunnel()
        if tunnel is None:
            return
        tunnel.found, tunnel.found_kind, tunnel.probes = path, kind, probes
        if purpose is Purpose.REFRESH:
            self._note(
                NoticeKind.REFRESHED,
                Level.INFO,
                f"path to {self.peer} refreshed: its NAT now lets our new endpoint in",
                path=str(path),
            )
        self.signal(tunnel, Signal.PATH_FOUND, now)

    def direct_found(self, tunnel_id: int, path: Path, kind: PathKind, probes: int, now: float) -> None:
        """The punch of a tunnel that started on the relay (relay first) found a direct
        path: the tunnel moves there, at once or as soon as its handshake is done (QUIC's
        long-header packets are placed by path, not by connection ID)."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.role is not Role.CLIENT or not tunnel.route.relayed:
            return
        tunnel.found, tunnel.found_kind, tunnel.probes = path, kind, probes
        if tunnel.health is not Health.HANDSHAKING:
            self.signal(tunnel, Signal.PATH_FOUND, now)

    def punch_failed(self, purpose: Purpose, relay: Path | None, now: float) -> None:
        self.repairing = None
        tunnel = self.client_tunnel()
        if tunnel is None:
            return
        if purpose is Purpose.UPGRADE:
            self._note(
                NoticeKind.STILL_RELAYED,
                Level.INFO,
                f"still no direct path to {self.peer}; staying on the relay",
            )
            self._schedule_upgrade(tunnel, now)
            return
        tunnel.found = relay
        self.signal(tunnel, Signal.NO_PATH, now)

    def peer_lost_tunnel(self, now: float) -> bool:
        """The peer, answering our re-punch, says it has no tunnel with us: a quiet tunnel is
        dead (an answer about a healthy one is ignored: it is not authenticated). True if it
        was: the caller builds the new tunnel on the path that punch found."""
        tunnel = self.client_tunnel()
        if tunnel is None or tunnel.health not in (Health.SUSPECT, Health.DEAD, Health.VERIFYING):
            return False
        self.repairing = None
        self.signal(tunnel, Signal.LOST, now)
        return True

    def refused(self, purpose: Purpose, message: str, now: float) -> None:
        """The broker could not introduce us again (the peer is gone, or unknown to it)."""
        self.repairing = None
        tunnel = self.client_tunnel()
        if tunnel is None:
            return
        if purpose is Purpose.UPGRADE:
            self._schedule_upgrade(tunnel, now)
            return
        self.signal(tunnel, Signal.REFUSED, now)
        if tunnel.health is Health.CLOSED:
            self._out.append(PeerUnreachable(self.peer, "peer_gone", message))

    def handle_timer(self, now: float) -> None:
        for tunnel in list(self.tunnels.values()):
            deadline = self._silence_deadline(tunnel)
            if deadline is not None and now >= deadline[0]:
                self.signal(tunnel, deadline[1], now)
            if tunnel.health not in (Health.HANDSHAKING, Health.CLOSED) and now >= tunnel.next_ping:
                if tunnel.health in (Health.SUSPECT, Health.DEAD):
                    self.check_endpoint = True  # still silent: does the broker still know us?
                self._ping(tunnel, now)
        client = self.client_tunnel()
        if client is not None and client.retry_at is not None and now >= client.retry_at:
            client.retry_at = None
            if client.health is Health.DEAD:
                self._repair(
                    Purpose.REFRESH,
                    f"punching to {self.peer} again",
                    silent_s=round(now - (client.silent_since or now), 1),
                )
        if self.next_upgrade is not None and now >= self.next_upgrade:
            self.next_upgrade = None
            if client is not None and client.route.relayed and client.health is Health.HEALTHY:
                self._repair(Purpose.UPGRADE, "")

    def get_timer(self) -> float | None:
        times: list[float] = []
        for tunnel in self.tunnels.values():
            if tunnel.health in (Health.HANDSHAKING, Health.CLOSED):
                continue
            times.append(tunnel.next_ping)
            deadline = self._silence_deadline(tunnel)
            if deadline is not None:
                times.append(deadline[0])
            if tunnel.retry_at is not None:
                times.append(tunnel.retry_at)
        if self.next_upgrade is not None:
            times.append(self.next_upgrade)
        return min(times, default=None)

    def _silence_deadline(self, tunnel: Tunnel) -> tuple[float, Signal] | None:
        """When the tunnel's silence next means something, given its health (each health
        waits for one threshold, so a deadline that has passed never fires twice)."""
        if tunnel.silent_since is None:
            return None
        if tunnel.health is Health.VERIFYING:  # a path that answers probes: a pong is due
            return tunnel.silent_since + self.settings.path_dead, Signal.QUIET
        if tunnel.health is Health.HEALTHY:
            quiet = tunnel.silent_since + self.settings.path_silence
            if tunnel.quick_quiet is not None:
                quiet = min(quiet, tunnel.quick_quiet)
            return quiet, Signal.QUIET
        if tunnel.health is Health.SUSPECT:
            return tunnel.silent_since + self.settings.path_dead, Signal.SILENT
        return None

    # -- effects of the table -----------------------------------------------------------
    def _on_up(self, tunnel: Tunnel, now: float) -> None:
        previous = self.tunnels.get(self.current) if self.current is not None else None
        self.current = tunnel.id
        tunnel.next_ping = now + self._ping_gap(tunnel)
        self._out.append(
            TunnelUp(self.peer, tunnel.id, tunnel.role, tunnel.route, tunnel.kind, tunnel.probes)
        )
        if previous is not None and previous is not tunnel and previous.role is tunnel.role:
            self._out.append(
                PathChanged(
                    self.peer,
                    tunnel.id,
                    previous.route,
                    tunnel.route,
                    previous.kind,
                    tunnel.kind,
                    f"moved to a {tunnel.kind.value} path",
                    replaced=True,
                )
            )
            self._retire(previous, f"moved to a {tunnel.kind.value} path")
        self._out.append(PeerReady(self.peer, tunnel.id))
        if tunnel.role is Role.CLIENT and tunnel.route.relayed:
            if tunnel.found is not None:  # its punch found a direct path while it shook hands
                self.signal(tunnel, Signal.PATH_FOUND, now)
            else:
                self._schedule_upgrade(tunnel, now)

    def _on_suspect(self, tunnel: Tunnel, now: float) -> None:
        """Quiet for path_silence: ask the broker where it sees us and, as the client, punch
        again at once (a restarted or moved peer is found a punch sooner)."""
        self.check_endpoint = True
        self._on_repair(tunnel, now)
        self._note(
            NoticeKind.SILENT,
            Level.INFO,
            f"tunnel to {self.peer} hears nothing back",
            silent_s=round(now - (tunnel.silent_since or now), 1),
            check_endpoint=True,
        )

    def _on_repair(self, tunnel: Tunnel, now: float) -> None:
        if tunnel.role is Role.CLIENT and tunnel.id == self.current:
            silent = round(now - (tunnel.silent_since or now), 1)
            self._repair(
                Purpose.REFRESH,
                f"tunnel to {self.peer} hears nothing back: punching again",
                warning=True,
                silent_s=silent,
            )

    def _on_recovered(self, tunnel: Tunnel, now: float) -> None:
        tunnel.found, tunnel.repairs, tunnel.retry_at = None, 0, None

    def _on_move(self, tunnel: Tunnel, now: float) -> None:
        path = tunnel.found
        if path is None:
            return
        if path == tunnel.route:
            # the path that went silent answers probes again: if the tunnel still does not
            # answer within path_dead (VERIFYING), the peer no longer has it (see _on_replace)
            self._restart_silence(tunnel)
            self._ping(tunnel, now)
            return
        reason = "a direct path answered" if tunnel.route.relayed else "punched again"
        self._route(tunnel, path, tunnel.found_kind, now, reason)
        if tunnel.health is Health.HEALTHY:
            tunnel.found = None
            self._schedule_upgrade(tunnel, now)

    def _on_refreshed(self, tunnel: Tunnel, now: float) -> None:
        tunnel.found, tunnel.repairs = None, 0
        self._schedule_upgrade(tunnel, now)

    def _on_replace(self, tunnel: Tunnel, now: float) -> None:
        """The tunnel stays silent on the path a new punch found: the peer no longer has
        this connection (it restarted). A new tunnel takes over, introduced afresh."""
        self._on_lost(tunnel, now)
        self.wants.append(Purpose.NEW)

    def _on_lost(self, tunnel: Tunnel, now: float) -> None:
        """The peer no longer has this connection: it closes at once (its successor comes
        from the caller, on the path the punch that said so found)."""
        self._note(
            NoticeKind.TUNNEL_DEAD,
            Level.WARNING,
            f"tunnel to {self.peer} is dead (the peer restarted?): building a new one",
        )
        self._retire(tunnel, "the peer no longer answers on this tunnel", drain=False)

    def _on_fall_back(self, tunnel: Tunnel, now: float) -> None:
        relay = tunnel.found
        tunnel.found = None
        if relay is None and tunnel.repairs < self.settings.repair_attempts:
            # the broker may still have had the peer's old endpoint (its NAT moved and its
            # own silence check re-registers it): punch again in a moment
            tunnel.retry_at = now + self.settings.path_dead
            return
        if relay is None or tunnel.route.relayed:
            # nowhere else to go: end it, so that new connections build a tunnel afresh
            tunnel.health = Health.CLOSED
            self._retire(tunnel, "no path to the peer answers")
            self._out.append(PeerUnreachable(self.peer, "punch_failed", f"no path to {self.peer} answers"))
            return
        self._route(tunnel, relay, PathKind.RELAYED, now, "no direct path answers")
        tunnel.health = Health.HEALTHY  # judged afresh there, by the ordinary silence rules

    def _on_give_up(self, tunnel: Tunnel, now: float) -> None:
        self._retire(tunnel, "the broker no longer knows the peer", drain=False)

    # -- helpers ----------------------------------------------------------------------
    def _route(self, tunnel: Tunnel, path: Path, kind: PathKind, now: float, reason: str) -> None:
        old, old_kind = tunnel.route, tunnel.kind
        tunnel.route, tunnel.kind, tunnel.route_since = path, kind, now
        tunnel.routes.add(path)
        self._out.append(RouteTunnel(tunnel.id, path, kind))
        self._out.append(PathChanged(self.peer, tunnel.id, old, path, old_kind, kind, reason))
        self._restart_silence(tunnel)
        self._ping(tunnel, now)  # something for the peer to see on the new path at once
        if kind is PathKind.RELAYED:
            self._schedule_upgrade(tunnel, now)

    def _restart_silence(self, tunnel: Tunnel) -> None:
        """Judge the tunnel afresh from the next ping (pongs to older ones are ignored)."""
        tunnel.ping_uid, tunnel.silent_since, tunnel.quick_quiet = 0, None, None

    def _ping(self, tunnel: Tunnel, now: float) -> None:
        uid = next(self._uids)
        if tunnel.silent_since is None:
            tunnel.ping_uid, tunnel.silent_since = uid, now
        tunnel.next_ping = now + self.settings.path_check_interval
        self._out.append(PingTunnel(tunnel.id, uid))

    def _ping_gap(self, tunnel: Tunnel) -> float:
        return self.settings.path_check_interval if tunnel.busy else self.settings.ping_interval

    def _retire(self, tunnel: Tunnel, reason: str, *, drain: bool = True) -> None:
        """No new connections on it; it closes once its open ones end (or at once: a tunnel
        the peer no longer has serves nothing)."""
        if self.current == tunnel.id:
            self.current = None
        self._out.append(CloseTunnel(tunnel.id, reason, drain=drain))

    def _repair(self, purpose: Purpose, why: str, *, warning: bool = False, **fields: object) -> None:
        """Ask for one punch for our tunnel; its outcome moves the tunnel."""
        if self.repairing is not None:
            return
        self.repairing = purpose
        self.wants.append(purpose)
        tunnel = self.client_tunnel()
        if tunnel is not None and purpose is Purpose.REFRESH:
            tunnel.repairs += 1
        if why:
            kind = NoticeKind.REPUNCH
            self._note(kind, Level.WARNING if warning else Level.INFO, why, **fields)

    def _schedule_upgrade(self, tunnel: Tunnel, now: float) -> None:
        if tunnel.role is Role.CLIENT and tunnel.route.relayed and self.settings.upgrade_interval > 0:
            self.next_upgrade = now + self.settings.upgrade_interval

    def _note(self, kind: NoticeKind, level: Level, text: str, **fields: object) -> None:
        self._out.append(Notice(kind, level, text, {"peer": self.peer, **fields}))
