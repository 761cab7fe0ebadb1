"""The work an agent does once online: on a nicer thread, stoppable, and what it publishes."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeswarm.device_agent import protocol, topics
from edgeswarm.device_agent.agent import WARM_UP_NICE, Agent, AgentConfig
from edgeswarm.device_agent.control import ControlClient
from edgeswarm.device_agent.coordinator import Coordinator
from edgeswarm.device_agent.warm_up import WarmUp, set_thread_nice, thread_nice

KEY = bytes(range(32))
linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="threads have nice values of their own on Linux only")


@linux
def test_steps_run_in_order_on_a_nicer_thread_and_no_other(no_leaked_threads) -> None:
    seen: list[tuple[str, int, int]] = []

    def step(name: str) -> None:
        seen.append((name, threading.get_native_id(), thread_nice()))

    base = thread_nice()
    warm = WarmUp([lambda: step("a"), lambda: step("b")], nice=5).start()
    assert warm.wait(30)
    assert [s[0] for s in seen] == ["a", "b"]
    assert {s[1] for s in seen} != {threading.get_native_id()}
    assert {s[2] for s in seen} == {min(19, base + 5)} and warm.reniced
    assert thread_nice() == base             # the starter keeps its priority


def test_a_failing_step_does_not_stop_the_next(no_leaked_threads) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    warm = WarmUp([broken, lambda: ran.append("next")]).start()
    assert warm.wait(30) and ran == ["next"]


def test_stop_skips_what_has_not_begun_and_waits_for_the_step_under_way(
        no_leaked_threads) -> None:
    inside, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> None:
        inside.set()
        release.wait(30)
        ran.append("slow")

    warm = WarmUp([slow, lambda: ran.append("later")]).start()
    assert inside.wait(30)
    stopper = threading.Thread(target=lambda: ran.append(f"stopped {warm.stop(30)}"))
    stopper.start()
    release.set()
    stopper.join(30)
    assert ran == ["slow", "stopped True"]          # waited for slow, skipped later
    assert WarmUp([lambda: ran.append("x")]).stop() and "x" not in ran
    never = WarmUp([lambda: ran.append("y")])
    never.stop()
    never.start()                                    # after stop(): a no-op
    assert never.wait(1) and "y" not in ran


@linux
@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a nice value needs privileges")
def test_stop_gives_the_step_under_way_its_priority_back(no_leaked_threads) -> None:
    inside, release = threading.Event(), threading.Event()
    nice_after: list[int] = []
    base = thread_nice()

    def step() -> None:
        inside.set()
        release.wait(30)
        nice_after.append(thread_nice())

    warm = WarmUp([step], nice=7).start()
    assert inside.wait(30)
    stopper = threading.Thread(target=warm.stop)
    stopper.start()
    while thread_nice(warm._tid) != base:            # stop() renices before it waits
        assert stopper.is_alive()
        threading.Event().wait(0.01)
    release.set()
    stopper.join(30)
    assert nice_after == [base]


def test_set_thread_nice_names_failure_by_its_result() -> None:
    if not sys.platform.startswith("linux"):
        assert not set_thread_nice(5)
        return
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(set_thread_nice(thread_nice() + 1)))
    t.start()
    t.join(10)
    assert result == [True]


def test_the_agent_publishes_its_int8_rate_after_announcing_itself(mosquitto,
                                                                  tmp_path: Path) -> None:
    config = AgentConfig(name="pi-1", cluster="w", broker=mosquitto.uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path / "art")
    agent = Agent(config, KEY)
    with Coordinator(mosquitto.uri, "w", KEY) as c:
        agent.start()
        try:
            assert agent._warm.wait(60)
            assert agent.profile is not None and agent.profile.int8_ops > 0
            c.wait_for(1, 30)
            for _ in range(500):   # the state carrying it follows the warm-up's publish
                if c.devices()[0].device.int8_ops > 0:
                    break
                threading.Event().wait(0.02)
            assert c.devices()[0].device.int8_ops == agent.profile.int8_ops
            if sys.platform.startswith("linux"):
                assert agent._warm.reniced and agent._warm.nice == WARM_UP_NICE
        finally:
            agent.stop()


def test_no_late_publish_retains_online_after_offline(mosquitto, tmp_path: Path) -> None:
    config = AgentConfig(name="pi-2", cluster="w", broker=mosquitto.uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path / "art")
    agent = Agent(config, KEY)
    agent.start()
    try:
        agent._publish_state("offline", wait=True)   # what stop() publishes first
        agent._publish_state(wait=True)              # the warm-up or a deploy, too late
        got: queue.Queue[bytes] = queue.Queue()
        with ControlClient(mosquitto.uri, "late", key=KEY) as late:
            late.subscribe(topics.state("w", "pi-2"), lambda t, raw: got.put(raw))
            raw = got.get(timeout=5)
        _, state = protocol.unseal(KEY, topics.state("w", "pi-2"), raw, time.time(), None,
                                   protocol.DeviceState, None)
        assert state.status == "offline"
    finally:
        agent.stop()
