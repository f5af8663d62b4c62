"""The wheel: only `swarmnet/`, one version, and it runs every subcommand's --help from a clean venv."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import swarmnet
from swarmnet.cli import build_parser

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


def subcommands() -> list[str]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(commands.choices)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend comes from the test environment, nothing is downloaded.
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=180,
    )
    (built,) = out.glob("*.whl")
    return built


def test_wheel_holds_only_the_package_at_the_one_version(wheel):
    assert wheel.name == f"swarmnet-{swarmnet.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("swarmnet/", f"swarmnet-{swarmnet.__version__}.dist-info/"))]
    assert not outside, outside
    assert "swarmnet/cli/__init__.py" in names and "swarmnet/coordinator/http.py" in names
    metadata = zipfile.ZipFile(wheel).read(f"swarmnet-{swarmnet.__version__}.dist-info/METADATA").decode()
    assert f"Version: {swarmnet.__version__}" in metadata
    entry_points = zipfile.ZipFile(wheel).read(f"swarmnet-{swarmnet.__version__}.dist-info/entry_points.txt").decode()
    assert "swarmnet = swarmnet.cli:main" in entry_points


def test_installed_wheel_runs_every_subcommands_help(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The test environment's pip installs into the clean venv (`--python`), so no pip is bootstrapped.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=120,
    )
    # The dependencies (torch, hivemind, ...) come from the test environment's site-packages, not
    # the project checkout: a .pth line adds the directory without running its editable hooks.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    swarmnet_exe = venv / "bin" / "swarmnet"

    def run(*args: str) -> str:
        done = subprocess.run([swarmnet_exe, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    where = subprocess.run([python, "-c", "import swarmnet; print(swarmnet.__file__)"], capture_output=True, text=True,
                           check=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # the installed wheel, not the checkout
    assert run("--version").strip() == f"swarmnet {swarmnet.__version__}"
    assert "usage: swarmnet" in run("--help")
    for command in subcommands():
        assert f"usage: swarmnet {command}" in run(command, "--help"), command
