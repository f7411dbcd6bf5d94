"""Which way frames to the broker go: the UDP socket, or a TCP stream when UDP is blocked.

Happy eyeballs (RFC 8305 in spirit): registration starts over UDP; if nothing at all comes
back from the broker within ``stream_after``, the TCP stream (TLS, WebSocket) opens too
and registration goes both ways; the first way the broker answers a registration on wins,
and carries every frame from then on (relay packets too). The race starts again when the
registration is lost. A stream that fails is opened again with backoff. While it carries
the registration, a small question goes to the broker's UDP port now and then
(``udp_recheck_interval``); once UDP answers, the agent registers over UDP again and the
stream closes. Pure: it returns actions and says where frames go; the shell opens and
closes the stream.
"""

from __future__ import annotations

import enum

from .. import frames
from ..backoff import Backoff
from ..endpoints import Endpoint
from ..natmap import mapping_query
from .actions import Action, CloseSocket, Level, Notice, NoticeKind, OpenStream, SendFrame
from .kinds import BROKER_STREAM, MAIN_SOCKET
from .settings import AgentSettings


class StreamState(enum.Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"


class BrokerPath:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.socket = MAIN_SOCKET  # the way the broker last answered a registration on
        self.won = False  # registered over self.socket: frames go there alone
        self.stream = StreamState.CLOSED
        self.failure = ""  # why the stream last failed, for the one-line answer
        self.udp_heard = False  # anything from the broker over UDP, since the race began
        self._race_since: float | None = None  # when registration began, and has not won yet
        self._open_at: float | None = None
        self._backoff = Backoff(initial=1.0, maximum=settings.stream_retry_max)
        self._recheck_at: float | None = None  # on TCP: ask UDP again then
        self.udp_back = False  # UDP answered while on TCP: register over it again
        self._udp_back_until = 0.0
        self._out: list[Action] = []

    @property
    def race_since(self) -> float | None:
        return self._race_since

    @property
    def on_stream(self) -> bool:
        """Registered over the TCP stream."""
        return self.won and self.socket == BROKER_STREAM

    @property
    def on_udp(self) -> bool:
        """Registered over UDP."""
        return self.won and self.socket == MAIN_SOCKET

    @property
    def via(self) -> str:
        return "tcp" if self.socket == BROKER_STREAM else "udp"

    def sockets(self) -> tuple[int, ...]:
        """Where a frame for the broker goes now."""
        if self.won:
            return (self.socket,)
        if self.udp_back:  # registering over UDP again, for a moment over UDP alone
            return (MAIN_SOCKET,)
        if self.stream is StreamState.OPEN:
            return (MAIN_SOCKET, BROKER_STREAM)
        return (MAIN_SOCKET,)

    def carries(self, socket: int) -> bool:
        """May frames from the broker arrive on this socket?"""
        return socket == MAIN_SOCKET or (socket == BROKER_STREAM and self.stream is StreamState.OPEN)

    # -- inputs -----------------------------------------------------------------------
    def racing(self, now: float) -> None:
        """Registration is under way (at start, or after it was lost)."""
        self.won = False
        if self._race_since is None:
            self._race_since = now
            self.udp_heard = False
            if self.stream is StreamState.CLOSED and self._open_at is None:
                self._open_at = now + self.settings.stream_after

    def heard(self, socket: int) -> None:
        if socket == MAIN_SOCKET:
            self.udp_heard = True
            if self.stream is StreamState.CLOSED and not self.won:
                self._open_at = None  # UDP works: no stream unless it fails again

    def registered_on(self, socket: int, broker: Endpoint, now: float) -> None:
        """The broker answered a registration that came on ``socket``: that way wins."""
        first = not self.won or socket != self.socket
        self.won, self.socket, self._race_since = True, socket, None
        self._open_at, self.udp_back = None, False
        self._recheck_at = now + self.settings.udp_recheck_interval if socket == BROKER_STREAM else None
        if socket == MAIN_SOCKET and self.stream is not StreamState.CLOSED:
            self.stream = StreamState.CLOSED
            self._out.append(CloseSocket(BROKER_STREAM))
        if first and socket == BROKER_STREAM:
            self._out.append(
                Notice(
                    NoticeKind.BROKER_TRANSPORT,
                    Level.WARNING,
                    f"no UDP answer from the broker {broker}: using TCP",
                    {"broker": str(broker), "transport": "tcp"},
                )
            )

    def stream_opened(self) -> None:
        if self.stream is StreamState.OPENING:
            self.stream = StreamState.OPEN
            self.failure = ""
            self._backoff.reset()

    def stream_closed(self, reason: str, now: float) -> bool:
        """The stream failed or ended; True if it carried our registration (now lost)."""
        carried = self.on_stream
        was_open = self.stream is not StreamState.CLOSED
        self.stream = StreamState.CLOSED
        self.failure = reason
        if carried:
            self.won, self.socket = False, MAIN_SOCKET
        if was_open and not self.on_udp:
            self._open_at = now + self._backoff.next_delay()
        return carried

    def changed_broker(self, now: float) -> None:
        """Another broker: its race starts afresh (a stream to the old one closes)."""
        if self.stream is not StreamState.CLOSED:
            self.stream = StreamState.CLOSED
            self._out.append(CloseSocket(BROKER_STREAM))
        self.won, self.socket, self._race_since, self._open_at = False, MAIN_SOCKET, None, None
        self._backoff.reset()
        self.racing(now)

    def udp_answered(self, now: float) -> bool:
        """A reply to our UDP question came while the stream carries us: True the first
        time (the caller registers again, over UDP alone; if UDP does not answer that
        within a moment, over both ways as in any race)."""
        if not self.on_stream or self.udp_back:
            return False
        self.udp_back = True
        self._udp_back_until = now + 4 * self.settings.stream_after
        return True

    # -- time and output --------------------------------------------------------------
    def get_timer(self) -> float | None:
        back = self._udp_back_until if self.udp_back and not self.won else None
        return min((t for t in (self._open_at, self._recheck_at, back) if t is not None), default=None)

    def handle_timer(self, now: float, broker: Endpoint) -> None:
        if self.udp_back and not self.won and now >= self._udp_back_until:
            self.udp_back = False  # UDP did not carry the registration after all: both ways
        if self._recheck_at is not None and now >= self._recheck_at:
            self._recheck_at = now + self.settings.udp_recheck_interval
            if self.on_stream:
                self._out.append(SendFrame(MAIN_SOCKET, broker, frames.encode(mapping_query())))
        if self._open_at is None or now < self._open_at:
            return
        self._open_at = None
        if self.stream is StreamState.CLOSED and not self.on_udp:
            self.stream = StreamState.OPENING
            self._out.append(OpenStream(BROKER_STREAM, broker))

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def unanswered(self, broker: Endpoint) -> str:
        """What was tried, in one line, for a broker that does not answer."""
        udp = "no UDP answer" if not self.udp_heard else "UDP answered, then nothing"
        if self.stream is StreamState.OPEN:
            return f"broker {broker}: {udp}; TCP: connected, no answer"
        if self.failure:
            return f"broker {broker}: {udp}; TCP: {self.failure}"
        return f"broker {broker}: {udp}"
