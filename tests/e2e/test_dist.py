"""The distributions as a user gets them: ``make dist`` builds every wheel and sdist and passes
``twine check --strict``; each carries the licence, readme, URLs and classifiers; the api wheel
ships the .proto files; and the documented install commands work in a fresh virtual environment —
from the built wheels (``pip install --find-links dist meshllm-client``) and from a checkout
(``pip install ./protos ./client``).

No package index is used: the fresh environment sees this environment's third-party packages
(grpcio, protobuf, ...) through a folder of links that leaves out every meshllm distribution, so
pip must install meshllm-api and meshllm-client from what was built, and resolve one from the other.
"""

from __future__ import annotations

import email.parser
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
PARTS = {
    "protos": "meshllm-api",
    "server": "meshllm-server",
    "client": "meshllm-client",
    "router": "meshllm-router",
    "replica": "meshllm-replica",
}
PROTOS = ("admin.proto", "generation.proto", "replica_control.proto")


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make dist`` into a temporary folder (the venv stamps count as made: no reinstall)."""
    out = tmp_path_factory.mktemp("dist")
    stamps = [f"--old-file={VENV}/.meshllm-env", f"--old-file={VENV}/.meshllm-installed"]
    printed = run("make", *stamps, "dist", f"DIST={out}", f"VENV={VENV}", timeout=600)
    assert printed.count("PASSED") == 2 * len(PARTS), printed
    return out


def wheel(dist: Path, name: str) -> zipfile.ZipFile:
    (path,) = dist.glob(f"{name.replace('-', '_')}-0.1.0-py3-none-any.whl")
    return zipfile.ZipFile(path)


def metadata(archive: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(archive.read(name).decode())


def test_make_dist_builds_a_wheel_and_an_sdist_of_every_part(dist: Path) -> None:
    names = sorted(p.name for p in dist.iterdir())
    expected = sorted(
        f"{n.replace('-', '_')}-0.1.0{suffix}"
        for n in PARTS.values()
        for suffix in ("-py3-none-any.whl", ".tar.gz")
    )
    assert names == expected


@pytest.mark.parametrize("part", PARTS)
def test_every_wheel_carries_licence_readme_urls_and_classifiers(dist: Path, part: str) -> None:
    archive = wheel(dist, PARTS[part])
    meta = metadata(archive)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    licence = next(n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
    assert archive.read(licence) == (ROOT / "LICENSE").read_bytes()
    assert meta["Description-Content-Type"] == "text/markdown"
    assert str(meta.get_payload()).startswith(f"# {PARTS[part]}\n")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL", []))
    assert {"Homepage", "Source", "Documentation", "Issues"} <= set(urls)
    classifiers = meta.get_all("Classifier", [])
    assert (
        "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.11" in classifiers
    )


@pytest.mark.parametrize("part", PARTS)
def test_every_sdist_carries_the_licence_as_a_file(dist: Path, part: str) -> None:
    (path,) = dist.glob(f"{PARTS[part].replace('-', '_')}-0.1.0.tar.gz")
    with tarfile.open(path) as sdist:
        member = sdist.getmember(f"{path.name.removesuffix('.tar.gz')}/LICENSE")
        assert member.isfile()
        extracted = sdist.extractfile(member)
        assert extracted is not None and extracted.read() == (ROOT / "LICENSE").read_bytes()


def test_the_api_wheel_ships_the_proto_files_next_to_the_generated_code(dist: Path) -> None:
    archive = wheel(dist, "meshllm-api")
    for name in PROTOS:
        shipped = archive.read(f"meshllm/api/v1/{name}")
        assert shipped == (ROOT / "protos" / "meshllm" / "api" / "v1" / name).read_bytes()
    assert "meshllm/api/v1/generation_pb2.py" in archive.namelist()


def fresh_venv(path: Path, tmp_path: Path) -> Path:
    """A venv without meshllm that sees this one's third-party packages (links, no index)."""
    venv.create(path, with_pip=False)
    ours = Path(sysconfig.get_paths()["purelib"])
    links = tmp_path / f"{path.name}-third-party"
    links.mkdir()
    for entry in ours.iterdir():
        if "meshllm" not in entry.name and entry.suffix != ".pth":
            (links / entry.name).symlink_to(entry)
    (site,) = path.glob("lib/python*/site-packages")
    (site / "third_party.pth").write_text(f"{links}\n")
    return path / "bin" / "python"


PIP = (sys.executable, "-m", "pip")


def pip_install(python: Path, *args: str | Path) -> str:
    return run(*PIP, "--python", python, "install", "--no-index", *args)


CLIENT_CHECK = """
import importlib.util, sys
import meshllm.api, meshllm.client
from meshllm.client import Client
print(meshllm.api.__file__)
print(meshllm.client.__file__)
print([n for n in ("meshllm.router", "meshllm.replica", "meshllm.server") if importlib.util.find_spec(n)])
"""


def assert_client_installed(python: Path, prefix: Path) -> None:
    api, client, servers = run(python, "-c", CLIENT_CHECK).splitlines()
    assert api.startswith(str(prefix)) and client.startswith(str(prefix))
    assert servers == "[]"
    assert "usage: meshllm" in run(prefix / "bin" / "meshllm", "--help")


def test_pip_install_the_client_from_the_built_wheels(dist: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "wheels", tmp_path)
    printed = pip_install(python, "--find-links", dist, "meshllm-client")
    assert "Successfully installed meshllm-api-0.1.0 meshllm-client-0.1.0" in printed
    assert_client_installed(python, tmp_path / "wheels")
    (site,) = (tmp_path / "wheels").glob("lib/python*/site-packages")
    assert (site / "meshllm" / "api" / "v1" / "generation.proto").is_file()


def test_pip_install_protos_and_client_from_a_checkout(tmp_path: Path) -> None:
    """README's ``pip install ./protos ./client`` (``--no-build-isolation``: hatchling from here)."""
    python = fresh_venv(tmp_path / "checkout", tmp_path)
    printed = pip_install(python, "--no-build-isolation", "./protos", "./client")
    assert "Successfully installed meshllm-api-0.1.0 meshllm-client-0.1.0" in printed
    assert_client_installed(python, tmp_path / "checkout")


def test_pip_install_the_client_alone_names_what_is_missing(tmp_path: Path) -> None:
    """Why the docs say ``./protos ./client``: meshllm-api is on no index."""
    python = fresh_venv(tmp_path / "alone", tmp_path)
    done = subprocess.run(
        [
            *PIP,
            "--python",
            str(python),
            "install",
            "--no-index",
            "--no-build-isolation",
            "./client",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode != 0
    assert "meshllm-api" in done.stderr


def test_pip_install_router_and_replica_from_a_checkout(tmp_path: Path) -> None:
    """The README's router and replica installs (``./protos ./server './router[tracing]'``,
    ``'./replica[ctranslate2]'``), in one fresh environment: both commands start."""
    prefix = tmp_path / "servers"
    python = fresh_venv(prefix, tmp_path)
    parts = ("./protos", "./server", "./router[tracing]", "./replica[ctranslate2]")
    printed = pip_install(python, "--no-build-isolation", *parts)
    assert "meshllm-router-0.1.0" in printed and "meshllm-replica-0.1.0" in printed
    for command in ("meshllm-router", "meshllm-replica"):
        assert f"usage: {command}" in run(prefix / "bin" / command, "--help")
    (site,) = prefix.glob("lib/python*/site-packages")
    located = run(
        python, "-c", "import meshllm.router, meshllm.replica; print(meshllm.router.__file__)"
    )
    assert located.startswith(str(site))
