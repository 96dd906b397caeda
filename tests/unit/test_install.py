"""What the Makefile and the Dockerfile pass to pip for PyTorch, with each documented TORCH_SPEC.

No package is installed: `pip` is replaced by a recorder, the real `make` and `sh` run the real
recipes, and pip's own option parser reads what they passed, as pip would."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement

REPO = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Where the docs tell GPU users how to pick their build: every TORCH_SPEC="…" they show.
DOCUMENTED_IN = [
    "README.md",
    "docs/kubernetes.md",
    "deploy/kubernetes/components/gpu/kustomization.yaml",
    "compose/Dockerfile",
]


@dataclass(frozen=True)
class PipInstall:
    requirements: list[str]
    editables: list[str]
    index_url: str
    no_deps: bool


def _pip_install(argv: list[str]) -> PipInstall:
    """argv as pip's `install` command parses it; every requirement must be one pip accepts."""
    from pip._internal.commands import create_command

    assert argv[0] == "install", argv
    options, args = create_command("install").parse_args(argv[1:])
    for text in args:
        if not text.startswith((".", "/")):  # a local project is a path, the rest requirements
            Requirement(text)  # raises InvalidRequirement where pip would refuse the argument
    return PipInstall(args, options.editables, options.index_url, options.ignore_dependencies)


def _recorder(folder: Path, name: str, log: Path) -> None:
    """An executable `name` in `folder` that appends its arguments to `log` as one JSON line."""
    script = folder / name
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\nwith open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def _which(program: str) -> str:
    found = shutil.which(program)
    assert found, f"{program} is needed to run the install recipes"
    return found


def _recorded(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _no_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse reads what the recipes pass, not this machine's pip.conf or PIP_* variables."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def _make_installs(tmp_path: Path, *make_args: str, gpu: bool = False) -> list[PipInstall]:
    """Run the Makefile's install recipe for a fresh venv with a recording pip; what it installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()  # the venv exists: only the install recipe runs
    log = tmp_path / "pip.log"
    _recorder(venv / "bin", "pip", log)
    tools = tmp_path / "tools"  # PATH: touch, and nvidia-smi only on the "GPU machine"
    tools.mkdir()
    (tools / "touch").symlink_to(_which("touch"))
    if gpu:
        _recorder(tools, "nvidia-smi", tmp_path / "nvidia.log")
    subprocess.run(
        [_which("make"), "-C", str(REPO), f"VENV={venv}", *make_args, f"{venv}/.installed-run"],
        env={"PATH": str(tools)},
        check=True,
        capture_output=True,
    )
    return [_pip_install(argv) for argv in _recorded(log)]


def test_make_installs_the_cpu_build_where_no_nvidia_driver_is_found(tmp_path: Path) -> None:
    torch, project = _make_installs(tmp_path)
    assert torch.requirements == ["torch==2.13.0"]
    assert torch.index_url == CPU_INDEX and torch.no_deps
    # Sluice and torch's own dependencies come from PyPI, not from PyTorch's index.
    assert project.editables == ["."] and project.index_url != CPU_INDEX


def test_make_installs_pypi_default_build_where_nvidia_smi_exists(tmp_path: Path) -> None:
    torch, _ = _make_installs(tmp_path, gpu=True)
    assert torch.requirements == ["torch==2.13.0"]
    assert torch.index_url == "https://pypi.org/simple"  # pip's default: PyPI's (CUDA) build


def _documented_specs() -> list[str]:
    specs = set()
    for name in DOCUMENTED_IN:
        text = " ".join((REPO / name).read_text().split())  # a spec may wrap over lines
        text = re.sub(r"\s*#\s*", " ", text)  # …or over comment lines
        specs |= set(re.findall(r'TORCH_SPEC="([^"]+)"', text))
    return sorted(specs)


def test_the_docs_show_at_least_one_cuda_recipe() -> None:
    assert any("/cu" in spec for spec in _documented_specs()), _documented_specs()


@pytest.mark.parametrize("spec", _documented_specs())
def test_every_documented_torch_spec_works_with_make(tmp_path: Path, spec: str) -> None:
    torch, _ = _make_installs(tmp_path, f"TORCH_SPEC={spec}")
    assert torch.requirements == ["torch==2.13.0"]
    assert torch.index_url == shlex.split(spec)[shlex.split(spec).index("--index-url") + 1]


def _dockerfile() -> tuple[str, str]:
    """The TORCH_SPEC default and the RUN command that installs, as the Dockerfile states them."""
    lines = (REPO / "compose" / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    default = next(line for line in lines if line.startswith("ARG TORCH_SPEC="))
    run = next(line for line in lines if line.startswith("RUN ") and "TORCH_SPEC" in line)
    return shlex.split(default.removeprefix("ARG TORCH_SPEC="))[0], run.removeprefix("RUN ")


def _docker_installs(tmp_path: Path, spec: str) -> list[PipInstall]:
    """The RUN command under sh with TORCH_SPEC set as Docker sets a build argument."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    _recorder(bin_dir, "pip", log)
    _, run = _dockerfile()
    subprocess.run([_which("sh"), "-c", run], env={"PATH": str(bin_dir), "TORCH_SPEC": spec}, check=True, cwd=tmp_path)
    return [_pip_install(argv) for argv in _recorded(log)]


def test_dockerfile_builds_the_cpu_build_by_default(tmp_path: Path) -> None:
    default, _ = _dockerfile()
    torch, project = _docker_installs(tmp_path, default)
    assert torch.requirements == ["torch==2.13.0"] and torch.index_url == CPU_INDEX and torch.no_deps
    assert project.requirements == ["."] and project.index_url != CPU_INDEX


@pytest.mark.parametrize("spec", _documented_specs())
def test_every_documented_torch_spec_works_as_a_docker_build_arg(tmp_path: Path, spec: str) -> None:
    torch, _ = _docker_installs(tmp_path, spec)
    assert torch.requirements == ["torch==2.13.0"]
    assert torch.index_url in spec


def test_a_quoted_spec_with_an_index_is_what_pip_refuses() -> None:
    """The check above can fail: one argument holding a requirement and an index is invalid."""
    with pytest.raises(InvalidRequirement):
        _pip_install(["install", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"])
