from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import _parser, main
from services.inference.manifest import MANIFEST, verify_manifest
from services.mesh.config import CONFIG_ENV, MESH, SERVICES, Settings, settings_for, settings_from_args, up_settings
from services.mesh.lifecycle.ready import advertised_address
from services.up import INFERENCE_ENVIRONMENT, inference_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text('edge_port = 9001\ncache_ttl_s = 5.0\nmodel = "/models/qwen"\n')
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("SLUICE_CACHE_TTL_S", "7")
    args = _parser().parse_args(["up", "--model", "/models/llama"])
    settings = settings_from_args(args)
    assert settings.edge_port == 9001  # file
    assert settings.cache_ttl_s == 7.0  # env beats file
    assert settings.model == Path("/models/llama")  # flag beats file
    assert settings.drain_grace_s == Settings.model_fields["drain_grace_s"].default


def test_unknown_key_in_the_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text("edge_prot = 1\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with pytest.raises(ValueError, match="edge_prot"):
        Settings()


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/nonexistent/sluice.toml")
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        Settings()


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(edge_port=1234, insecure=True, served_model_name="alias", cache_enabled=False)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_served_model_name_defaults_to_the_directory_name() -> None:
    assert Settings(model=Path("/srv/models/Qwen2.5-7B-Instruct")).model_name == "Qwen2.5-7B-Instruct"
    assert Settings(model=Path("/x"), served_model_name="chat").model_name == "chat"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["up"],
        ["serve", "edge"],
        ["serve", "inference"],
        ["serve", "preprocess"],
        ["serve", "cache"],
        ["certs", "init"],
        ["model", "init"],
        ["model", "manifest"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
    ],
)
def test_every_command_explains_itself(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: sluice" in result.stdout
    assert len(result.stdout.splitlines()) > 5


def _options(*command: str) -> set[str]:
    """The --options a command's help lists."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as shown:
        main([*command, "--help"])
    return set(re.findall(r"--[a-z][a-z-]*", shown.getvalue()))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_takes_exactly_the_settings_it_reads(service: str) -> None:
    offered = _options("serve", service) - {"--help", "--config", "--ready-file"}
    offered -= {f"--no-{flag[2:]}" for flag in offered}  # the negative form of a boolean
    assert offered == {_flag(name) for name in settings_for(MESH, service)}


def test_up_takes_every_setting_but_those_it_decides_for_its_children() -> None:
    offered = _options("up")
    assert {_flag(name) for name in up_settings() if name != "edge_port"} <= offered and "--port" in offered
    assert not {_flag(name) for name in ("metrics_port", "preprocess_addr", "inference_addr", "cache_addr")} & offered
    every_setting = set(up_settings()) | {name for service in SERVICES for name in settings_for(MESH, service)}
    assert every_setting == set(Settings.model_fields)


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"| `{name}` | `SLUICE_{name.upper()}` |" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_wildcard_binds_are_advertised_as_loopback() -> None:
    assert advertised_address("0.0.0.0", 80) == "127.0.0.1:80"
    assert advertised_address("::", 80) == "127.0.0.1:80"
    assert advertised_address("10.1.2.3", 80) == "10.1.2.3:80"
    assert advertised_address("::1", 80) == "[::1]:80"


def test_inference_replicas_on_one_machine_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for name in INFERENCE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    env = {"SLUICE_TORCH_THREADS": "0"}
    assert inference_env(Settings(), env, 1) == env | INFERENCE_ENVIRONMENT
    assert inference_env(Settings(), env, 3)["SLUICE_TORCH_THREADS"] == "2"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert inference_env(Settings(), env, 4)["SLUICE_TORCH_THREADS"] == "1"
    # A thread count the user chose is theirs.
    assert inference_env(Settings(torch_threads=3), {"SLUICE_TORCH_THREADS": "3"}, 2)["SLUICE_TORCH_THREADS"] == "3"


def test_idle_torch_workers_sleep_unless_the_user_chose_a_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert inference_env(Settings(), {}, 1)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY" not in inference_env(Settings(), {}, 1)  # the child inherits the user's ACTIVE


def test_freed_memory_stays_with_the_inference_process_unless_the_user_tuned_malloc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert int(inference_env(Settings(), {}, 1)["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 30
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert "MALLOC_MMAP_THRESHOLD_" not in inference_env(Settings(), {}, 1)


def test_model_manifest_command_writes_a_manifest_the_service_accepts(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_manifest = [sys.executable, "-m", "services.cli", "model", "manifest"]
    result = subprocess.run([*write_manifest, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / MANIFEST)
    verify_manifest(tmp_path)
    missing = subprocess.run([*write_manifest, str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no files" in missing.stderr
