"""pycoll.units: the one parser of bandwidths, durations and sizes (fast, no sockets, no tc)."""

import ast
import math
import re
from pathlib import Path

import pytest

from pycoll import units

pytestmark = pytest.mark.timeout(60)

MBIT = 1e6 / 8  # bytes per second


@pytest.mark.parametrize(
    "text, expected",
    [
        # bits: "mbps" is megabits per second, whatever the case of the prefix
        ("100mbps", 100 * MBIT),
        ("100Mbps", 100 * MBIT),
        ("100MBIT", 100 * MBIT),
        ("100mbit", 100 * MBIT),
        ("100 Mbit/s", 100 * MBIT),
        ("100mb/s", 100 * MBIT),
        ("2.5Gbps", 2.5e9 / 8),
        ("10gbit", 10e9 / 8),
        ("1kbit", 1e3 / 8),
        ("2tbit", 2e12 / 8),
        ("8bit", 1.0),
        ("8bps", 1.0),
        ("1e3bit/s", 125.0),
        ("1mibit", (1 << 20) / 8),
        # bytes: uppercase B
        ("1.25GB", 1.25e9),
        ("125 MB/s", 125e6),
        ("3MBps", 3e6),
        ("1kB", 1e3),
        ("1e3B/s", 1e3),
        ("1 GiB/s", float(1 << 30)),
        ("16MiB/s", float(16 << 20)),
        ("  10gbit  ", 10e9 / 8),
        ("unlimited", math.inf),
        ("inf", math.inf),
    ],
)
def test_bandwidth_spellings(text, expected):
    assert units.parse_bandwidth(text) == pytest.approx(expected)


def test_bandwidth_bare_numbers_only_when_the_caller_says_what_they_are():
    assert units.parse_bandwidth("1000", bare="bit") == 125.0
    assert units.parse_bandwidth(1000, bare="B") == 1000.0
    with pytest.raises(ValueError, match=r"'1000'.*needs a unit"):
        units.parse_bandwidth("1000")
    with pytest.raises(ValueError, match="needs a unit"):
        units.parse_bandwidth(1000)


@pytest.mark.parametrize(
    "value",
    ["10gb", "10GBPS", "10gbits", "10Gb", "fast", "1xbit", "", "-1gbit", "0gbit", "10 MiB/ss", "bit", True, None,
     [1]],
)
def test_bad_bandwidth_names_the_value(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        units.parse_bandwidth(value, "defaults.bandwidth")
    with pytest.raises(ValueError, match=r"^defaults\.bandwidth: "):
        units.parse_bandwidth(value, "defaults.bandwidth")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("50us", 50e-6),
        ("50µs", 50e-6),
        ("50usec", 50e-6),
        ("25ms", 0.025),
        ("25 msec", 0.025),
        ("1.5s", 1.5),
        ("2sec", 2.0),
        ("100ns", 100e-9),
        ("0us", 0.0),
        ("0", 0.0),
        (0, 0.0),
    ],
)
def test_duration_spellings(value, expected):
    assert units.parse_duration(value) == pytest.approx(expected)


def test_duration_exact_and_bare():
    assert units.parse_duration("200us") == 0.0002  # divided, not multiplied: exact
    assert units.parse_duration("25ms") == 0.025
    assert units.parse_duration("0.5", bare="s") == 0.5
    assert units.parse_duration(3, bare="s") == 3.0
    with pytest.raises(ValueError, match="needs a unit"):
        units.parse_duration(3)
    with pytest.raises(ValueError, match=r"'5'.*needs a unit"):
        units.parse_duration("5")


@pytest.mark.parametrize("value", ["5 min", "ms", "-5ms", -1, "5m", "fast", "", True, None])
def test_bad_duration_names_the_value(value):
    with pytest.raises(ValueError, match=r"^link rtt: .*" + re.escape(repr(value))):
        units.parse_duration(value, "link rtt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4K", 4 << 10),
        ("4k", 4 << 10),
        ("64KiB", 64 << 10),
        ("64KB", 64 << 10),  # sizes are binary: K = KB = KiB
        ("1M", 1 << 20),
        ("16MB", 16 << 20),
        ("16MiB", 16 << 20),
        ("16 mib", 16 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("1.5K", 1536),
        ("1048576", 1 << 20),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_size_spellings(text, expected):
    assert units.parse_size(text) == expected
    assert isinstance(units.parse_size(text), int)


@pytest.mark.parametrize("value", ["0", "0.3K", "-4K", "4X", "iB", "K", "", "4 KiBs", True, None, 1.5])
def test_bad_size_names_the_value(value):
    with pytest.raises(ValueError, match=r"^size: .*" + re.escape(repr(value))):
        units.parse_size(value, "size")


def test_size_multiple():
    assert units.parse_size("64K", multiple=4) == 65536
    with pytest.raises(ValueError, match=r"'6'.*multiple of 4"):
        units.parse_size("6", multiple=4)


def test_formatting():
    assert units.human_size(100) == "100 B"
    assert units.human_size(4 << 10) == "4 KiB"
    assert units.human_size(3 << 19) == "1.5 MiB"
    assert units.human_size(16 << 30) == "16 GiB"
    assert units.format_bandwidth(10e9 / 8) == "10 Gbit/s"
    assert units.format_bandwidth(100 * MBIT) == "100 Mbit/s"
    assert units.format_bandwidth(1.0) == "8 bit/s"
    assert units.format_bandwidth(math.inf) == "unlimited"
    assert units.format_duration(50e-6) == "50 us"
    assert units.format_duration(0.005) == "5 ms"
    assert units.format_duration(1.5) == "1.5 s"
    assert units.format_duration(0) == "0"


@pytest.mark.parametrize("text", ["100mbps", "100mbit", "12.5MB/s", "2.5Gbps", "1 GiB/s"])
def test_round_trips_through_the_formatters(text):
    assert units.parse_bandwidth(units.format_bandwidth(units.parse_bandwidth(text))) == pytest.approx(
        units.parse_bandwidth(text))
    assert units.parse_size(units.human_size(16 << 20)) == 16 << 20


# --- one meaning everywhere -------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["100mbps", "100Mbps", "100mbit", "100 Mbit/s", "12.5MB/s"])
def test_100mbps_agrees_across_topology_link_and_emulator(spelling):
    from pycoll.emulator import EmuSpec, parse_rate, tc_rate
    from pycoll.plan.topology import parse_bandwidth, parse_topology
    from pycoll.net.links import comm_options, link_plan, parse_link

    Bps = 100e6 / 8
    topo = parse_topology(f'[defaults]\nbandwidth = "{spelling}"\nlatency = "5ms"\n'
                          '[[group]]\nname = "g"\ncount = 2\n')
    assert topo.link(0, 1).bandwidth_Bps == pytest.approx(Bps)
    assert parse_bandwidth(spelling) == pytest.approx(Bps)
    # link= goes through wan.parse_link
    bw, rtt = parse_link(f"{spelling}/10ms")
    assert bw == pytest.approx(Bps) and rtt == pytest.approx(0.01)
    assert comm_options(link=f"{spelling}/10ms") == comm_options(link=(Bps, 0.01))
    assert link_plan(bw, rtt) == link_plan(Bps, 0.01)
    # the emulator works in bits/s and gives tc plain bits
    assert parse_rate(spelling) == pytest.approx(100e6)
    assert tc_rate(parse_rate(spelling)) == "100000000bit"
    assert EmuSpec.coerce({"n_peers": 2, "rate": spelling, "delay": "5ms"}).link_spec(0, 1).rate_bps == \
        pytest.approx(100e6)
    assert tc_rate(EmuSpec.from_topology(topo).link_spec(0, 1).rate_bps) == "100000000bit"


def test_emulator_rate_and_time_conversion():
    from pycoll.emulator import parse_rate, parse_time, tc_rate
    from pycoll.emulator.spec import tc_size

    assert parse_rate("1gbit") == 1e9
    assert parse_rate("1000") == 1000.0  # a bare number is bits/s, as for numbers
    assert parse_rate(5e6) == 5e6
    for uncapped in (None, "", "none", "inf", "unlimited", "0", 0, -1, math.inf):
        assert parse_rate(uncapped) is None
    assert parse_time("25ms") == 0.025
    assert parse_time("500us") == 0.0005
    assert parse_time("0.1") == 0.1 and parse_time(0.5) == 0.5 and parse_time(None) == 0.0
    assert tc_rate(2e9) == "2000000000bit"
    assert tc_rate(8000.7) == "8000bit"
    assert tc_size(130000) == "130000b"
    for bad in (0, -1, math.inf):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            tc_rate(bad)
    with pytest.raises(ValueError, match=r"rate: .*'fast'"):
        parse_rate("fast")
    with pytest.raises(ValueError, match=r"time: .*'5 min'"):
        parse_time("5 min")


def test_emulator_tc_commands_use_tc_rate():
    """Every rate core.py writes for tc goes through tc_rate (no hand-written unit suffixes)."""
    src = (Path(units.__file__).parent / "emulator" / "core.py").read_text()
    assert "tc_rate(" in src
    assert not re.search(r"\}(bit|bps|mbit|kbit|gbit)\b", src)


def test_old_names_still_importable():
    from pycoll.benchmark import human_size, parse_size
    from pycoll.emulator import parse_rate, parse_time
    from pycoll.plan.topology import parse_bandwidth, parse_latency

    assert parse_size("16M") == 16 << 20
    with pytest.raises(ValueError, match=r"bad size '6'.*multiple of 4"):
        parse_size("6")  # the benchmark sends float32
    assert human_size(16 << 20) == "16 MiB"
    assert parse_bandwidth("100mbps") == 100 * MBIT
    assert parse_latency("5ms") == 0.005
    assert parse_rate("100mbit") == 100e6 and parse_time("1ms") == 0.001
    with pytest.raises(ValueError, match="bandwidth"):
        parse_bandwidth("10gb")
    with pytest.raises(ValueError, match="latency"):
        parse_latency("5 min")


def test_units_imports_nothing_from_pycoll():
    tree = ast.parse(Path(units.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("pycoll"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("pycoll") for a in node.names)
