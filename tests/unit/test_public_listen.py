"""Listening beyond loopback: which settings may, and the URLs `sluice up` prints for each client."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.entry_urls import CONTAINERS, EntryURL, entry_urls
from services.mesh.config import Settings, is_loopback, settings_error

HOST = {
    "lo": ["127.0.0.1", "::1"],
    "eth0": ["192.0.2.2", "fd00::2"],
    "docker0": ["172.17.0.1"],
    "br-1f2e": ["172.18.0.1"],
}
LOOPBACK = ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]
BEYOND = ["0.0.0.0", "::", "192.0.2.2", "edge.example.com"]


def test_is_loopback() -> None:
    assert [is_loopback(host) for host in LOOPBACK] == [True] * len(LOOPBACK)
    assert [is_loopback(host) for host in BEYOND] == [False] * len(BEYOND)


def test_public_host_defaults_to_host() -> None:
    assert Settings().listen_host == "127.0.0.1"
    assert Settings(host="0.0.0.0").listen_host == "0.0.0.0"
    assert Settings(public_host="0.0.0.0").listen_host == "0.0.0.0"


def test_no_auth_beyond_loopback_is_refused_unless_waived() -> None:
    Settings(auth=False)  # loopback: only this machine can reach it
    Settings(auth=True, public_host="0.0.0.0")
    for beyond in ({"public_host": "0.0.0.0"}, {"host": "0.0.0.0"}, {"public_host": "192.0.2.2"}):
        with pytest.raises(ValidationError) as refused:
            Settings(auth=False, **beyond)
        assert "--public-without-auth" in settings_error(refused.value)
    Settings(auth=False, public_host="0.0.0.0", public_without_auth=True)


def test_sluice_up_says_why_it_refuses_an_open_door() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--no-auth", "--public-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("sluice up: --no-auth with the edge listening on 0.0.0.0")
    assert "Traceback" not in result.stderr


def test_a_bad_setting_is_named_as_its_flag() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(max_running=0)
    assert settings_error(refused.value) == "--max-running: Input should be greater than or equal to 1"


def test_loopback_listener_is_for_this_machine_only() -> None:
    assert entry_urls("127.0.0.1", 8000, "http", HOST) == [EntryURL("this machine only", "http://127.0.0.1:8000/v1")]


def test_every_interface_gives_each_client_its_url() -> None:
    urls = entry_urls("0.0.0.0", 8000, "http", HOST)
    assert [(u.who, u.url) for u in urls] == [
        ("this machine", "http://127.0.0.1:8000/v1"),
        ("other machines (eth0)", "http://192.0.2.2:8000/v1"),  # IPv4 only: 0.0.0.0 binds no IPv6
        (CONTAINERS, "http://172.17.0.1:8000/v1"),  # Docker's bridge; its user networks are not listed
    ]
    assert "host.docker.internal" in urls[-1].note


def test_ipv6_wildcard_lists_both_families() -> None:
    urls = [u.url for u in entry_urls("::", 8443, "https", HOST)]
    assert "https://192.0.2.2:8443/v1" in urls and "https://[fd00::2]:8443/v1" in urls


def test_without_docker_containers_are_told_docker_desktop_name() -> None:
    urls = entry_urls("0.0.0.0", 8000, "http", {"lo": ["127.0.0.1"], "eth0": ["192.0.2.2"]})
    assert urls[-1] == EntryURL(CONTAINERS, "http://host.docker.internal:8000/v1", urls[-1].note)


def test_one_address_is_everyones() -> None:
    assert entry_urls("192.0.2.2", 8000, "http", HOST) == [
        EntryURL("this machine and others", "http://192.0.2.2:8000/v1")
    ]
