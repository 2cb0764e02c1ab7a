"""The sidecar image: built with buildah from the Dockerfile, then run against the moto server
and the IMDS emulator on loopback.

The base image is a Debian root made with debootstrap from this machine's own apt mirror, so
no registry of container images is needed. Storage is vfs and isolation chroot, which work
without a container engine or kernel overlay support.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotwatch.emulator import ImdsEmulator
from tests.conftest import REGION, object_bytes, wait_for

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("buildah", "debootstrap")
BUILD_TIMEOUT = 900


@dataclass
class Buildah:
    storage: Path

    def command(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.storage / "root"), "--runroot",
                str(self.storage / "run"), "--storage-driver", "vfs", *args]

    def __call__(self, *args: str, timeout: float = BUILD_TIMEOUT) -> str:
        done = subprocess.run(self.command(*args), capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"buildah {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout.strip()


def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _apt_mirror_and_suite() -> tuple[str, str] | None:
    """The Debian mirror and release this machine installs from, to debootstrap the base."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    text = "\n".join(p.read_text() for p in sources if p.is_file() and p.suffix != ".disabled")
    mirrors = [uri for uri in re.findall(r"(https?://\S+/debian)/?(?:\s|$)", text)]
    release = re.search(r"^VERSION_CODENAME=(\w+)$", Path("/etc/os-release").read_text(), re.M)
    if not mirrors or release is None:
        return None
    return mirrors[0], release.group(1)


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    missing = _missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install buildah "
                    "debootstrap; .ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("building the image with vfs storage and debootstrap needs root")
    tool = Buildah(tmp_path_factory.mktemp("container-storage"))
    yield tool
    subprocess.run(tool.command("rm", "--all"), capture_output=True)
    subprocess.run(tool.command("rmi", "--all", "--force"), capture_output=True)
    shutil.rmtree(tool.storage, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> str:
    source = _apt_mirror_and_suite()
    if source is None:
        pytest.skip("no Debian apt mirror configured on this machine to debootstrap from")
    mirror, suite = source
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", suite,
         str(rootfs), mirror], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    base_python = subprocess.run(["chroot", str(rootfs), "python3", "-c",
                                  "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.split()
    host_python = [str(part) for part in sys.version_info[:2]]
    if base_python != host_python:
        shutil.rmtree(rootfs)
        pytest.skip(f"base image has Python {'.'.join(base_python)}, the wheelhouse is built "
                    f"for {platform.python_version()}")
    container = buildah("from", "scratch")
    buildah("copy", container, f"{rootfs}/", "/")
    buildah("commit", "--rm", container, "localhost/spotwatch-base:test")
    shutil.rmtree(rootfs)
    return "localhost/spotwatch-base:test"


@pytest.fixture(scope="module")
def image(buildah: Buildah, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("context")
    source = _mkdir(context / "source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", str(source), "-w",
         str(context / "wheelhouse")], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert wheels.returncode == 0, wheels.stderr
    shutil.rmtree(source)
    shutil.copy(ROOT / "Dockerfile", context / "Dockerfile")
    buildah("bud", "--isolation", "chroot", "--format", "docker", "--build-arg",
            f"BASE_IMAGE={base_image}", "-t", "localhost/spotwatch:test", str(context))
    return "localhost/spotwatch:test"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture
def container(buildah: Buildah, image: str) -> Iterator[str]:
    name = buildah("from", image).splitlines()[-1]
    yield name
    subprocess.run(buildah.command("rm", name), capture_output=True)


def test_image_metadata(buildah: Buildah, image: str) -> None:
    config: dict[str, Any] = yaml.safe_load(buildah("inspect", "--type", "image", image))
    docker = config["Docker"]["config"]
    assert docker["User"] == "spotwatch"
    assert docker["Entrypoint"] == ["spotwatch"]
    assert docker["Cmd"] == ["run", "-c", "/etc/spotwatch/config.yaml"]
    assert docker["Healthcheck"]["Test"][-3:] == ["--healthy", "-c", "/etc/spotwatch/config.yaml"]


def test_image_runs_version_as_non_root(buildah: Buildah, container: str) -> None:
    version = buildah("run", "--isolation", "chroot", container, "--", "spotwatch", "--version")
    assert re.fullmatch(r"spotwatch \d+\.\d+\.\d+\S*", version)
    assert buildah("run", "--isolation", "chroot", container, "--", "id", "-u") == "10001"


def test_sidecar_uploads_on_notice_against_loopback_services(
        buildah: Buildah, container: str, tmp_path: Path, s3: Any, bucket: str,
        imds: ImdsEmulator) -> None:
    # The volumes of the README's pod example: checkpoints (read-only for the sidecar),
    # notices (read by the trainer) and the config.
    checkpoints, notices, etc = (_mkdir(tmp_path / name) for name in ("ckpt", "notices", "etc"))
    notices.chmod(0o777)
    (etc / "config.yaml").write_text(yaml.safe_dump({
        "aws": {"region": REGION},
        "watch": [{"path": "/opt/ml/checkpoints", "prefix": "job/"}],
        "sync": {"settle_seconds": 0.2, "quiet_seconds": 1.0, "stop_timeout": 20},
        "imds": {"endpoint": imds.url, "poll_interval": 0.2},
        "hooks": {"notice_file": "/run/spotwatch/notice.json"},
    }))
    environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "S3_BUCKET_NAME": bucket}
    run_args = ["run", "--isolation", "chroot", "--network", "host",
                "-v", f"{checkpoints}:/opt/ml/checkpoints:ro", "-v", f"{notices}:/run/spotwatch",
                "-v", f"{etc}:/etc/spotwatch:ro"]
    for name, value in environment.items():
        run_args += ["--env", f"{name}={value}"]
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log:
        sidecar = subprocess.Popen(
            buildah.command(*run_args, container, "--", "spotwatch", "run", "-c",
                            "/etc/spotwatch/config.yaml"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "daemon_started" in log_path.read_text() or sidecar.poll() is not None,
                 timeout=60)
        assert sidecar.poll() is None, log_path.read_text()

        shard = os.urandom(300_000)
        (checkpoints / "step_10.pt").write_bytes(shard)
        imds.fire_spot_interruption()
        wait_for(lambda: (notices / "notice.json").exists(), timeout=30)
        assert wait_for(lambda: _object_or_none(s3, bucket, "job/step_10.pt"),
                        timeout=30) == shard

        health = subprocess.run(
            buildah.command(*run_args, container, "--", "spotwatch", "status", "--healthy",
                            "-c", "/etc/spotwatch/config.yaml"),
            capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr

        # A container stop: SIGTERM to the daemon itself (buildah would SIGKILL its child).
        os.kill(_daemon_pid(session=sidecar.pid), signal.SIGTERM)
        assert sidecar.wait(timeout=60) == 0, log_path.read_text()
        assert '"daemon_stopped"' in log_path.read_text()
    finally:
        if sidecar.poll() is None:
            os.killpg(sidecar.pid, signal.SIGKILL)
            sidecar.wait(timeout=60)


def _daemon_pid(session: int) -> int:
    """The host pid of `spotwatch run` among the processes of the sidecar's session."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        # buildah's chroot helpers carry the same arguments: skip them for the daemon itself.
        if int(fields[3]) == session and not cmdline[0].startswith(b"buildah") and (
                b"run" in cmdline and any(part.endswith(b"/spotwatch") for part in cmdline)):
            return int(stat.parent.name)
    raise AssertionError("spotwatch run not found among the sidecar's processes")


def _object_or_none(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return object_bytes(s3, bucket, key)
    except s3.exceptions.NoSuchKey:
        return None
