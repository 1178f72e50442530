"""Firmware profiles: detection and facts against fixture trees of real boards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.config import load_settings
from edge.errors import ConfigError, ProfileError
from edge.profiles import (
    check_profile_name,
    decode_revision,
    decode_throttled,
    detect,
    facts_for,
    load_profiles,
    read_facts,
)
from tests.test_cli import edge

BOARDS = Path(__file__).parent / "fixtures" / "boards"
SHIPPED = load_profiles()

# fixture tree -> (uname -m on that board, the profile it must be recognised as)
EXPECTED = {
    "raspberrypi-5": ("aarch64", "raspberrypi-5"),
    "raspberrypi-4": ("aarch64", "raspberrypi-4"),
    "raspberrypi-4-2gb": ("armv7l", "raspberrypi-4"),
    "raspberrypi-4-no-thermal": ("aarch64", "raspberrypi-4"),
    "raspberrypi-400": ("aarch64", "raspberrypi-4"),
    "raspberrypi-cm4": ("aarch64", "raspberrypi-4"),
    "raspberrypi-3b": ("armv7l", "raspberrypi-3"),
    "raspberrypi-3bplus": ("armv7l", "raspberrypi-3"),
    "raspberrypi-zero-2w": ("aarch64", "raspberrypi-zero-2w"),
    "nvidia-jetson-nano": ("aarch64", "nvidia-jetson"),
    "nvidia-jetson-agx-orin": ("aarch64", "nvidia-jetson"),
    "odroid-n2plus": ("aarch64", "generic-arm64"),
    "beaglebone-black": ("armv7l", "generic-armv7"),
    "x86_64-nuc": ("x86_64", "generic-x86_64"),
    "container-on-raspberrypi-4": ("aarch64", "raspberrypi-4"),
    "container-x86_64": ("x86_64", "generic-x86_64"),
}


def test_every_fixture_tree_is_listed() -> None:
    assert sorted(p.name for p in BOARDS.iterdir()) == sorted(EXPECTED)


def test_every_shipped_profile_is_detected_from_some_tree() -> None:
    assert {profile for _, profile in EXPECTED.values()} == set(SHIPPED)


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_board_is_detected_as_its_profile(board: str) -> None:
    machine, profile = EXPECTED[board]
    assert detect(BOARDS / board, machine).name == profile


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_facts_of_every_board_are_values_or_null_with_reason(board: str) -> None:
    machine, _ = EXPECTED[board]
    name, facts = facts_for("auto", BOARDS / board, machine)
    assert name == EXPECTED[board][1]
    assert set(facts) == {"machine", *SHIPPED[name].facts}
    for fact in facts.values():
        assert set(fact) in ({"value", "source"}, {"value", "reason"})
        assert (fact["value"] is None) == ("reason" in fact)
    json.dumps(facts)  # what `edge profile --json` and telemetry carry


def test_pi4_facts() -> None:
    facts = read_facts(SHIPPED["raspberrypi-4"], BOARDS / "raspberrypi-4")
    # No /proc/device-tree in this tree: the /sys/firmware path is the fallback.
    assert facts["model"] == {"value": "Raspberry Pi 4 Model B Rev 1.4",
                              "source": "/sys/firmware/devicetree/base/model"}
    assert facts["compatible"]["value"] == ["raspberrypi,4-model-b", "brcm,bcm2711"]
    assert facts["board"]["source"] == "/proc/cpuinfo"
    assert facts["board"]["value"] == {
        "code": "c03114", "type": "4B", "type_code": 0x11, "revision": "1.4",
        "memory_mib": 4096, "processor": "BCM2711", "manufacturer": "Sony UK",
        "warranty_void": False,
    }
    assert facts["memory"]["value"] == {"total_bytes": 3884328 * 1024}
    assert facts["temperatures"]["value"] == [
        {"zone": "thermal_zone0", "type": "cpu-thermal", "celsius": 48.686}]
    throttled = facts["throttled"]["value"]
    assert throttled["raw"] == "0x50005"
    assert throttled["under_voltage"] and throttled["throttled"]
    assert throttled["under_voltage_occurred"] and throttled["throttled_occurred"]
    assert not throttled["arm_freq_capped"] and not throttled["soft_temp_limit_occurred"]
    assert facts["bootloader_version"]["value"] == "8ba17717fbcedd4c3b6d4bce7e50c7af4155cba9"
    assert facts["bootloader_timestamp"]["value"] == 1705069397


def test_pi5_throttled_flags_are_found_under_its_own_bus_node() -> None:
    facts = read_facts(SHIPPED["raspberrypi-5"], BOARDS / "raspberrypi-5")
    assert facts["throttled"]["source"] == (
        "/sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled")
    assert facts["throttled"]["value"]["raw"] == "0x0"
    assert facts["board"]["value"]["type"] == "5"
    assert facts["board"]["value"]["memory_mib"] == 8192


def test_pi_without_thermal_zone_has_null_temperatures_with_reason() -> None:
    facts = read_facts(SHIPPED["raspberrypi-4"], BOARDS / "raspberrypi-4-no-thermal")
    assert facts["temperatures"] == {"value": None,
                                     "reason": "/sys/class/thermal: no thermal zones"}
    assert facts["board"]["value"]["code"] == "a03111"
    assert facts["throttled"]["value"]["raw"] == "0x0"


def test_container_without_sys_class_thermal_gives_reasons_not_a_crash() -> None:
    name, facts = facts_for("auto", BOARDS / "container-on-raspberrypi-4", "aarch64")
    # The host's cpuinfo shows through, so the board is still known by its revision code.
    assert name == "raspberrypi-4"
    assert facts["board"]["value"]["type"] == "4B"
    assert facts["temperatures"] == {"value": None,
                                     "reason": "/sys/class/thermal: no such directory"}
    for key in ("model", "compatible", "throttled", "bootloader_version"):
        assert facts[key]["value"] is None
        assert "no such file" in facts[key]["reason"]


def test_empty_root_gives_every_fact_a_reason(tmp_path: Path) -> None:
    for profile in SHIPPED.values():
        for fact in read_facts(profile, tmp_path).values():
            assert fact["value"] is None and fact["reason"]


def test_unreadable_zone_keeps_the_others() -> None:
    facts = read_facts(SHIPPED["nvidia-jetson"], BOARDS / "nvidia-jetson-agx-orin")
    zones = {z["type"]: z for z in facts["temperatures"]["value"]}
    assert zones["tj-thermal"]["celsius"] == 47.968
    assert zones["cv1-thermal"]["celsius"] is None
    assert "thermal_zone5/temp" in zones["cv1-thermal"]["reason"]
    assert facts["l4t_release"]["value"]["release"] == "35.4.1"


def test_jetson_nano_facts() -> None:
    facts = read_facts(SHIPPED["nvidia-jetson"], BOARDS / "nvidia-jetson-nano")
    assert facts["model"]["value"] == "NVIDIA Jetson Nano Developer Kit"
    assert facts["l4t_release"]["value"]["release"] == "32.7.1"
    assert [z["type"] for z in facts["temperatures"]["value"]][:2] == ["AO-therm", "CPU-therm"]


def test_x86_cpu_model() -> None:
    facts = read_facts(SHIPPED["generic-x86_64"], BOARDS / "x86_64-nuc")
    assert facts["cpu_model"]["value"] == "Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz"


@pytest.mark.parametrize(
    ("code", "kind", "revision", "memory", "maker", "processor"),
    [
        (0xC03114, "4B", "1.4", 4096, "Sony UK", "BCM2711"),
        (0xA03111, "4B", "1.1", 1024, "Sony UK", "BCM2711"),
        (0xB03115, "4B", "1.5", 2048, "Sony UK", "BCM2711"),
        (0xD04170, "5", "1.0", 8192, "Sony UK", "BCM2712"),
        (0x902120, "Zero 2 W", "1.0", 512, "Sony UK", "BCM2837"),
        (0xA020D3, "3B+", "1.3", 1024, "Sony UK", "BCM2837"),
        (0xA22082, "3B", "1.2", 1024, "Embest", "BCM2837"),
        (0xC03130, "400", "1.0", 4096, "Sony UK", "BCM2711"),
        (0xB03140, "CM4", "1.0", 2048, "Sony UK", "BCM2711"),
        (0xA32082, "3B", "1.2", 1024, "Sony Japan", "BCM2837"),
    ],
)
def test_revision_code_is_decoded(
    code: int, kind: str, revision: str, memory: int, maker: str, processor: str
) -> None:
    board = decode_revision(code)
    assert (board["type"], board["revision"], board["memory_mib"], board["manufacturer"],
            board["processor"]) == (kind, revision, memory, maker, processor)


def test_old_style_revision_code_is_refused() -> None:
    with pytest.raises(ValueError, match="old-style"):
        decode_revision(0x000E)


def test_revision_from_device_tree_when_cpuinfo_has_none(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(BOARDS / "raspberrypi-zero-2w", root)
    (root / "proc" / "cpuinfo").write_text("processor\t: 0\n")
    facts = read_facts(SHIPPED["raspberrypi-zero-2w"], root)
    assert facts["board"]["source"] == "/proc/device-tree/system/linux,revision"
    assert facts["board"]["value"]["type"] == "Zero 2 W"


def test_throttled_bits() -> None:
    flags = decode_throttled(0x80008)
    assert flags["soft_temp_limit"] and flags["soft_temp_limit_occurred"]
    assert not any(v for k, v in flags.items() if k not in
                   ("raw", "soft_temp_limit", "soft_temp_limit_occurred"))
    assert decode_throttled(0x20000)["arm_freq_capped_occurred"]
    assert not decode_throttled(0x20000)["arm_freq_capped"]


def test_garbage_in_sysfs_is_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(BOARDS / "raspberrypi-3b", root)
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("zz\n")
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("hot\n")
    (root / "proc/cpuinfo").write_text("Revision\t: 1000000002x\n")
    facts = read_facts(SHIPPED["raspberrypi-3"], root)
    assert "not a hexadecimal number" in facts["throttled"]["reason"]
    assert "not a number" in facts["temperatures"]["value"][0]["reason"]
    # A Revision line that is not hexadecimal: the device tree's copy of the code is used.
    assert facts["board"]["source"] == "/proc/device-tree/system/linux,revision"
    (root / "proc/device-tree/system/linux,revision").write_bytes(b"\x00\xa2")
    reason = read_facts(SHIPPED["raspberrypi-3"], root)["board"]["reason"]
    assert "Revision '1000000002x' is not hexadecimal" in reason
    assert "expected 4 bytes, got 2" in reason


def test_reads_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    model = root / "proc/device-tree/model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x" * (1024 * 1024))
    facts = read_facts(SHIPPED["generic-arm64"], root)
    assert len(facts["model"]["value"]) <= 4096


def test_unknown_board_falls_back_to_generic_by_machine(tmp_path: Path) -> None:
    assert detect(tmp_path, "aarch64").name == "generic-arm64"
    assert detect(tmp_path, "armv7l").name == "generic-armv7"
    assert detect(tmp_path, "x86_64").name == "generic-x86_64"
    # A Pi model string on an x86 machine is not a Pi.
    assert detect(BOARDS / "raspberrypi-4", "x86_64").name == "generic-x86_64"


def test_unknown_machine(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="riscv64"):
        detect(tmp_path, "riscv64")
    assert facts_for("auto", tmp_path, "riscv64") == (
        "unknown", {"machine": {"value": "riscv64", "source": "uname -m"}})


def test_named_profile_is_used_without_detection() -> None:
    name, facts = facts_for("raspberrypi-4", BOARDS / "x86_64-nuc", "x86_64")
    assert name == "raspberrypi-4"
    assert facts["throttled"]["value"] is None


def test_policy_defaults() -> None:
    policy = SHIPPED["raspberrypi-zero-2w"].policy
    assert policy.queue_max_bytes == 64 * 1024 * 1024
    assert policy.telemetry_interval == 120.0
    assert policy.queue_commit_interval == 0.05
    for profile in SHIPPED.values():
        assert profile.policy.queue_max_bytes and profile.policy.telemetry_interval


def test_named_profile_missing_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[node]\nprofile = "raspberrypi-9"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(f"config {path}: [node] profile: ")
    assert "raspberrypi-4" in message and "generic-x86_64" in message
    assert 'got "raspberrypi-9"' in message or "got 'raspberrypi-9'" in message
    path.write_text('[node]\nprofile = "raspberrypi-4"\n')
    assert load_settings(path).node.profile == "raspberrypi-4"


def test_check_profile_name() -> None:
    assert check_profile_name("auto") == "auto"
    assert check_profile_name("nvidia-jetson") == "nvidia-jetson"
    with pytest.raises(ValueError, match="generic-arm64"):
        check_profile_name("jetson")


def _profile_dir(tmp_path: Path, text: str, name: str = "broken.toml") -> Path:
    directory = tmp_path / "profiles"
    directory.mkdir()
    shutil.copy(Path(SHIPPED["generic-arm64"].source), directory)
    (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("[match\n", "not valid TOML"),
        ('[match]\nmachine = "aarch64"\nmodel = ["X"]\n', "[match] machine: expected a list"),
        ('[match]\nmachine = ["aarch64"]\n', "[match]: expected at least one of model"),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\nshape = 1\n', "[match] shape: unknown"),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\n[facts]\nmood = ["/x"]\n',
         "[facts] mood: unknown fact"),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\n[facts]\nmodel = ["proc/x"]\n',
         "[facts] model: expected a non-empty list of absolute paths"),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\n[facts]\nmodel = ["/../etc"]\n',
         "[facts] model: expected"),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\n[policy]\nqueue_max_bytes = "lots"\n',
         '[policy] queue_max_bytes: expected a size above 0 like "256MiB", got \'lots\''),
        ('[match]\nmachine = ["aarch64"]\nmodel = ["X"]\n[policy]\nqueue_commit_interval'
         ' = "5s"\n', "[policy] queue_commit_interval: expected a duration from 0s to 1s"),
        ('[match]\nmachine = ["aarch64"]\nrevision_types = [300]\n', "[match] revision_types"),
    ],
)
def test_malformed_profile_is_a_clear_error(tmp_path: Path, text: str, detail: str) -> None:
    directory = _profile_dir(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(directory)
    assert str(caught.value).startswith(f"firmware profile {directory / 'broken.toml'}: ")
    assert detail in str(caught.value)


def test_generic_profile_may_not_name_a_board(tmp_path: Path) -> None:
    directory = _profile_dir(tmp_path, '[match]\nmachine = ["x"]\nmodel = ["Pi"]\n',
                             "generic-x.toml")
    with pytest.raises(ProfileError, match=r"generic-x\.toml: \[match\]: a generic-"):
        load_profiles(directory)


def test_cli_json_with_root() -> None:
    done = edge("profile", "--json", "--root", str(BOARDS / "raspberrypi-3bplus"),
                "--machine", "armv7l")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["profile"] == "raspberrypi-3"
    assert answer["facts"]["board"]["value"]["type"] == "3B+"
    assert answer["facts"]["throttled"]["value"]["soft_temp_limit"] is True


def test_cli_table_shows_reasons() -> None:
    done = edge("profile", "--root", str(BOARDS / "container-x86_64"), "--machine", "x86_64")
    assert done.returncode == 0, done.stderr
    assert "generic-x86_64" in done.stdout
    assert "AMD EPYC 7B13" in done.stdout
    assert "no such directory" in done.stdout  # temperatures, with its reason


def test_cli_honours_config_profile(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[node]\nprofile = "raspberrypi-5"\n')
    done = edge("profile", "--json", "--config", str(config), "--root",
                str(BOARDS / "raspberrypi-4"), "--machine", "aarch64")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["profile"] == "raspberrypi-5"
    config.write_text('[node]\nprofile = "pi"\n')
    done = edge("profile", "--config", str(config), "--root", str(BOARDS / "raspberrypi-4"))
    assert done.returncode == 2
    assert "[node] profile" in done.stderr and "raspberrypi-4" in done.stderr
