"""The machine's events as log lines: words for people, and the event's kind and fields
(``kind``: a NoticeKind, ``tunnel_up`` or ``path_changed``) for programs and the NAT lab."""

from __future__ import annotations

from typing import Any

from natter_proto.agent import actions as act
from natter_proto.agent.kinds import path_label

from .links import AnyLink


def log_event(log: Any, event: act.Action, link: AnyLink | None) -> None:
    if isinstance(event, act.Notice):
        getattr(log, event.level.value)(event.text, kind=event.kind.value, **event.fields)
    elif isinstance(event, act.TunnelUp):
        words = path_label(event.path, event.kind) if event.path.relayed else "direct"
        log.info(
            f"{words} path up with {event.peer}",
            kind="tunnel_up",
            transport=event.path.transport.carrier,
            peer=event.peer,
            peer_endpoint=str(event.path),
            path=event.kind.value,
            probes=event.probes or None,
            relay=str(event.path.addr) if event.path.relayed else None,
            rtt_ms=round(link.rtt * 1000, 2) if link is not None else None,
            role=event.role.value,
        )
    elif isinstance(event, act.PathChanged):
        change = (
            f"{event.old_kind.value} -> {event.new_kind.value}"
            if event.old_kind is not event.new_kind
            else event.reason
        )
        log.info(
            f"path change for {event.peer}: {change}",
            kind="path_changed",
            peer=event.peer,
            old_kind=event.old_kind.value,
            new_kind=event.new_kind.value,
            old=str(event.old),
            new=str(event.new),
            new_path=path_label(event.new, event.new_kind),
            reason=event.reason,
            open_connections=link.open_streams if link is not None else 0,
            migrated=not event.replaced,
        )
