"""What a testbed reads: profiles (built-in and ``edgeswarm.testbed/1`` files) and churn
scripts, each mistake named; a churn script played against a fake testbed on a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeswarm.cli import app
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.testbed_churn import ChurnRun, Join, Kill, Leave, check_churn, parse_churn
from edgeswarm.testbed_profile import builtin, load_profile, parse_profile

# -- profiles -------------------------------------------------------------------------------


def test_mixed_cycles_through_kinds_named_after_them() -> None:
    profile = builtin("mixed", 6)
    assert [(d.id, d.speed) for d in profile.devices] == [
        ("laptop-1", 1.0), ("jetson-1", 0.6), ("phone-1", 0.4), ("pi-1", 0.25),
        ("laptop-2", 1.0), ("jetson-2", 0.6)]
    assert all(d.memory_bytes for d in profile.devices)
    assert profile.links_of(profile.devices[0]) == {"*": "100mbit:5ms"}


def test_uniform_and_the_default_link_override() -> None:
    profile = load_profile("uniform", 3, link="1gbit:1ms")
    assert [(d.id, d.speed) for d in profile.devices] == [("dev-1", 1.0), ("dev-2", 1.0),
                                                          ("dev-3", 1.0)]
    assert profile.default_link == "1gbit:1ms"
    assert len(load_profile("mixed").devices) == 4


def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "lab.json"
    path.write_text(json.dumps(doc))
    return path


LAB = {"format": "edgeswarm.testbed/1", "default_link": "100mbit:5ms", "devices": [
    {"id": "laptop-1", "speed": 1},
    {"id": "pi-1", "speed": 0.25, "memory_bytes": 1 << 30,
     "links": {"*": "20mbit:10ms", "laptop-1": "100mbit:2ms"}},
    {"id": "pi-2", "speed": 0.25}]}


def test_a_profile_file_is_read_and_cut_to_the_devices_asked_for(tmp_path: Path) -> None:
    path = _write(tmp_path, LAB)
    profile = load_profile(str(path))
    assert [d.id for d in profile.devices] == ["laptop-1", "pi-1", "pi-2"]
    pi = profile.devices[1]
    assert profile.links_of(pi) == {"*": "20mbit:10ms", "laptop-1": "100mbit:2ms"}
    assert profile.links_of(profile.devices[0]) == {"*": "100mbit:5ms"}
    two = load_profile(path, devices=2, link="10mbit:1ms")
    assert [d.id for d in two.devices] == ["laptop-1", "pi-1"]
    assert two.default_link == "10mbit:1ms"
    with pytest.raises(InvalidInput, match=r"describes 3 devices; cannot start 5"):
        load_profile(path, devices=5)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("format"), "'format' must be 'edgeswarm.testbed/1'"),
    (lambda d: d.update(format="edgeswarm.testbed/2"), "found 'edgeswarm.testbed/2'"),
    (lambda d: d.update(devices=[]), "devices: List should have at least 1 item"),
    (lambda d: d["devices"].append({"id": "pi-1"}), "'pi-1' appears twice"),
    (lambda d: d["devices"][1].update(speed=0), "devices[1].speed"),
    (lambda d: d["devices"][1].update(speed="fast"), "devices[1].speed"),
    (lambda d: d["devices"][0].update(cpu=4), "devices[0].cpu: Extra inputs"),
    (lambda d: d["devices"][0].update(id="no spaces"), "devices[0].id"),
    (lambda d: d["devices"][1]["links"].update({"pi-2": "9 furlongs"}),
     "devices[1].links: link spec '9 furlongs'"),
    (lambda d: d["devices"][1]["links"].update({"bad peer": "1mbit"}), "'bad peer'"),
    (lambda d: d.update(default_link="quick"), "default_link: link spec 'quick'"),
])
def test_bad_profile_files_name_the_problem(tmp_path: Path, change, message: str) -> None:
    doc = json.loads(json.dumps(LAB))
    change(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(InvalidInput) as info:
        load_profile(path)
    assert str(path) in str(info.value) and message in str(info.value), info.value


def test_unreadable_profiles_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown testbed profile 'mixd'"):
        load_profile("mixd")
    with pytest.raises(InvalidInput, match="cannot read testbed profile"):
        load_profile(str(tmp_path / "none.json"))
    with pytest.raises(InvalidInput, match="is not JSON"):
        parse_profile("{", "p.json")


def test_the_cli_refuses_a_bad_profile_file_before_starting_anything(tmp_path: Path) -> None:
    path = _write(tmp_path, {**LAB, "default_link": "quick"})
    result = CliRunner().invoke(app, ["testbed", "--profile", str(path)])
    assert isinstance(result.exception, InvalidInput), result.output
    assert "default_link: link spec 'quick'" in str(result.exception)


# -- churn scripts --------------------------------------------------------------------------

SCRIPT = """\
# a pi dies and is replaced; a phone leaves cleanly
at 6.0 join pi-9 speed=0.3 link=10mbit:20ms link-laptop-1=1gbit:1ms   # out of order
at 3.0 kill pi-1
at 8   leave phone-1
"""


def test_a_churn_script_parses_in_time_order() -> None:
    events = parse_churn(SCRIPT)
    assert events == [
        Kill(3.0, "pi-1", 3),
        Join(6.0, "pi-9", 0.3, {"*": "10mbit:20ms", "laptop-1": "1gbit:1ms"}, 2),
        Leave(8.0, "phone-1", 4)]
    check_churn(events, ["pi-1", "phone-1"])


@pytest.mark.parametrize(("line", "message"), [
    ("kill pi-1", "expected 'at SECONDS kill|leave|join DEVICE"),
    ("at soon kill pi-1", "'soon' is not a number"),
    ("at -1 kill pi-1", ">= 0"),
    ("at 1 reboot pi-1", "unknown action 'reboot'"),
    ("at 1 kill pi/1", "'pi/1' is not a device id"),
    ("at 1 kill pi-1 now", "kill takes no options"),
    ("at 1 join pi-9 speed=0", "speed must be > 0"),
    ("at 1 join pi-9 speed=quick", "could not convert"),
    ("at 1 join pi-9 colour=red", "unknown option 'colour'"),
    ("at 1 join pi-9 fast", "'fast' is not key=value"),
    ("at 1 join pi-9 link=10mbit:20", "link spec '10mbit:20'"),
])
def test_bad_churn_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_churn(f"# header\n\n{line}\n", source="churn.txt")
    assert f"churn.txt line 3: {line!r}" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize(("script", "message"), [
    ("at 1 kill pi-7", "line 1: kill pi-7: no such device running then"),
    ("at 1 kill pi-1\nat 2 leave pi-1", "line 2: leave pi-1: no such device"),
    ("at 1 join pi-1", "line 1: join pi-1: a device of that name is running"),
])
def test_churn_names_are_checked_against_the_running_devices(script: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_churn(parse_churn(script), ["pi-1", "pi-2"])


def test_the_cli_refuses_a_bad_churn_line_before_starting_anything(tmp_path: Path) -> None:
    churn = tmp_path / "churn.txt"
    churn.write_text("at 1 kill pi-1\nat 2 explode jetson-1\n")
    result = CliRunner().invoke(app, ["testbed", "--churn", str(churn)])
    assert isinstance(result.exception, InvalidInput), result.output
    assert "line 2: 'at 2 explode jetson-1': unknown action 'explode'" in str(result.exception)


class FakeTestbed:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str]] = []
        self.now = 100.0

    def kill(self, name: str) -> None:
        self.calls.append((self.now, "kill", name))

    def leave(self, name: str) -> None:
        self.calls.append((self.now, "leave", name))

    def join(self, name: str, speed: float = 1.0, links: dict[str, str] | None = None,
             wait: bool = True) -> None:
        assert not wait   # a churn join must not hold up the next event
        self.calls.append((self.now, f"join speed={speed} links={links}", name))


def test_a_churn_run_plays_each_event_at_its_time_on_the_injected_clock() -> None:
    fake = FakeTestbed()

    def sleep(seconds: float) -> None:
        assert 0 < seconds <= 0.5
        fake.now += seconds

    run = ChurnRun(fake, parse_churn(SCRIPT), clock=lambda: fake.now, sleep=sleep).start()
    assert run.wait(10)
    assert fake.calls == [
        (103.0, "kill", "pi-1"),
        (106.0, "join speed=0.3 links={'*': '10mbit:20ms', 'laptop-1': '1gbit:1ms'}", "pi-9"),
        (108.0, "leave", "phone-1")]
    assert [round(at, 6) for at, _ in run.applied] == [3.0, 6.0, 8.0] and not run.errors


def test_a_churn_run_records_failures_and_stops_when_asked() -> None:
    fake = FakeTestbed()

    def fail(name: str) -> None:
        raise InvalidInput(f"agent {name!r} is not running any more")

    fake.kill = fail  # type: ignore[method-assign]
    run = ChurnRun(fake, parse_churn("at 0 kill pi-1\nat 0 leave pi-2\nat 3600 leave pi-3"))
    run.start()
    assert not run.wait(0.5)          # waiting (really) for the event an hour away
    run.stop()
    assert run.done
    assert [e.device for e, _ in run.errors] == ["pi-1"] and "not running" in run.errors[0][1]
    assert [e.device for _, e in run.applied] == ["pi-2"]
