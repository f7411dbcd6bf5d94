"""The path machine's recoveries through real NATs: each failure real clients found, as a
test. A listener's NAT rebinding, a restarted listener, a broker restart with the client
back first, a stopped listener, a bulk upload. Needs root (see test_natlab.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from labscene import Scene
from natlab import NatLab
from procs import NATTER, NETCHECK, Proc, direct, natter

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(240)]


def status(proc: Proc) -> dict[str, object]:
    """`natter status --json` of an agent of the lab (its control socket is a file)."""
    home = proc.home
    out = subprocess.run(
        [NATTER, "status", "--json", "--state-dir", str(Path(home) / "natter")],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def tunnel_path(proc: Proc) -> str:
    tunnels = status(proc)["tunnels"]
    assert isinstance(tunnels, list) and len(tunnels) == 1, tunnels
    return str(tunnels[0]["path"])


def echo_works(scene: Scene, port: int, timeout: float = 30.0) -> bool:
    """A new connection through alice's forward gets its bytes echoed (False: it failed)."""
    argv = [*scene.lab.prefix("alice"), *NETCHECK, "echo-check", "127.0.0.1", str(port), "2000"]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout.strip() == b"ok"


def flush(lab: NatLab, nat: str) -> None:
    flushed = subprocess.run([*lab.prefix(nat), "conntrack", "-F"], capture_output=True, check=False)
    assert flushed.returncode == 0, flushed.stderr


@pytest.mark.parametrize("nats", [("natB",), ("natA", "natB")], ids=["listener", "both"])
def test_transfer_survives_the_listeners_nat_rebinding(lab: NatLab, nats: tuple[str, ...]) -> None:
    """Mid-transfer, the listener's NAT (or both NATs at once) forgets every mapping: bob's
    next packets leave from a new port; the broker learns it from bob's endpoint check, alice
    punches again, and the same tunnel carries the transfer to its end byte-exact."""
    with Scene(lab) as scene:
        scene.broker(10020)
        sink_port = scene.service("sink", str(4 << 20))  # slow start: in flight at the flush
        scene.listener(10020)
        alice = scene.agent("alice", "alice", 10020, f"8040:bob:{sink_port}")
        alice.wait_path("bob", direct, timeout=30)
        transfer = scene.send_in_background(8040, 40 << 20)
        time.sleep(2.0)
        for nat in nats:
            flush(lab, nat)
        transfer.finish()
        assert not [e for e in alice.lines if e.get("kind") in ("tunnel_closed", "tunnel_failed")]


def test_a_restarted_listener_is_reached_again_within_seconds(lab: NatLab) -> None:
    """kill -9 of bob and an immediate restart (same identity): alice's next connection finds
    the tunnel dead, a new one is built, and the connection goes through it: no 60 s wait
    for QUIC's idle timeout."""
    with Scene(lab) as scene:
        _, bob, alice = scene.forward_to_bob(10021, 8041)
        assert echo_works(scene, 8041)
        bob.popen.send_signal(signal.SIGKILL)
        bob.popen.wait()
        again = scene.add(
            natter(
                "-name",
                "bob",
                "-broker",
                "10.200.0.1:10021",
                "-quic-engine",
                scene.engine,
                "-listen",
                prefix=lab.prefix("bob"),
                home=bob.home,
            )
        )
        again.wait_kind("registered", name="bob", timeout=20)
        started = time.monotonic()
        assert echo_works(scene, 8041, timeout=30)
        took = time.monotonic() - started
        print(f"a new connection through the restarted listener after {took:.2f} s")  # pytest -s shows it
        assert took < 2.5, f"a new connection took {took:.1f} s after bob's return"  # target 2 s; 0.7-0.9 s
        alice.wait_kind("tunnel_dead", peer="bob")


def test_a_forward_recovers_when_the_client_is_back_before_the_listener(lab: NatLab) -> None:
    """The broker restarts and forgets everyone; alice registers again while bob is stopped
    and is told bob is unknown. Once bob is back, alice's forward works again by itself
    (it used to be stuck until alice was restarted)."""
    with Scene(lab) as scene:
        broker, bob, alice = scene.forward_to_bob(10022, 8042)
        bob.popen.send_signal(signal.SIGSTOP)
        try:
            broker.stop()
            scene.broker(10022)
            mark = alice.mark()
            assert not echo_works(scene, 8042, timeout=40)  # bob is stopped: this one fails
            alice.wait_kind("registered", name="alice", timeout=30, since=mark)
            alice.wait_kind("introduction_failed", timeout=30, since=mark)
        finally:
            bob.popen.send_signal(signal.SIGCONT)
        bob.wait_kind("registered", name="bob", timeout=40, since=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if echo_works(scene, 8042, timeout=30):
                break
        else:
            pytest.fail("the forward never worked again after bob came back")


def test_both_ends_agree_and_the_tunnel_outlives_the_broker_after_a_stop(lab: NatLab) -> None:
    """bob is stopped long enough for the tunnel to give up, then resumes: the tunnel that
    comes back is direct on both ends (what each status says), so it survives the broker."""
    with Scene(lab) as scene:
        broker, bob, alice = scene.forward_to_bob(10023, 8043)
        bob.popen.send_signal(signal.SIGSTOP)
        time.sleep(12.0)
        bob.popen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while not echo_works(scene, 8043, timeout=30) and time.monotonic() < deadline:
            time.sleep(1.0)
        # on resuming, bob may first follow alice's relayed datagrams that waited for him, and
        # takes her direct ones as stragglers for path_settle (1 s) before he follows them too
        settled = time.monotonic() + 3.0
        while (tunnel_path(alice), tunnel_path(bob)) != ("direct", "direct") and time.monotonic() < settled:
            time.sleep(0.2)
        assert tunnel_path(alice) == tunnel_path(bob) == "direct"
        broker.stop()
        assert echo_works(scene, 8043)


def test_a_bulk_upload_does_not_trip_the_silence_check(lab: NatLab) -> None:
    """Seen: 'hears nothing back: punching again' after every bulk upload. Pings the peer
    acknowledges decide now: a 100 MB upload and the quiet after it raise no alarm."""
    with Scene(lab) as scene:
        _, _, alice = scene.forward_to_bob(10024, 8044, "sink")
        scene.send_checked(8044, 100 << 20)
        time.sleep(6.0)
        alarms = [e for e in alice.lines if e.get("kind") in ("silent", "repunch")]
        assert not alarms, alarms
