"""The sidecar image, built with the README's own buildah commands, then run against the moto
server and the IMDS emulator on loopback.

The base image is the README's: a Debian root made with debootstrap (from this machine's apt
mirror), of a release whose Python differs from the host's, so the test proves the image builds
for its own Python whatever the host has. No registry of container images is needed. Storage
is vfs and isolation chroot, which work without a container engine or kernel overlay support;
storage lives in a cache directory, so the base and unchanged build layers are reused by the
next run.

buildah's chroot isolation has no PID namespace of its own, so the sidecar runs its image's
entrypoint under `unshare --pid --fork`: the entrypoint is PID 1 of a new PID namespace, as
with Docker or Kubernetes, and what it fails to reap stays a zombie there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotwatch.emulator import ImdsEmulator
from tests.conftest import REGION, installed_python, object_bytes, wait_for
from tests.readme_commands import ROOT, run_block, shell_block, shims

TOOLS = ("buildah", "debootstrap", "unshare")
BUILD_TIMEOUT = 1800
CACHE = Path(os.environ.get("SPOTWATCH_TEST_CACHE", "/var/cache/spotwatch-test"))
CACHE_LIMIT = 12 * 2**30  # beyond this, stale build layers are pruned after the run
README_MIRROR = "http://deb.debian.org/debian"
README_RELEASE = "trixie"  # Python 3.13
OTHER_RELEASE = "bookworm"  # Python 3.11, for a host that has 3.13
IMAGE = "localhost/spotwatch:latest"
CONFIG_IN_IMAGE = "/etc/spotwatch/config.yaml"


@dataclass
class Buildah:
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return ["buildah", "--storage-driver", "vfs", *args]

    def __call__(self, *args: str, timeout: float = BUILD_TIMEOUT) -> str:
        done = subprocess.run(self.command(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        assert done.returncode == 0, f"buildah {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout.strip()

    def config(self, image: str) -> dict[str, Any]:
        inspected: dict[str, Any] = json.loads(self("inspect", "--type", "image", image))
        return inspected


def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _apt_mirror() -> str | None:
    """The Debian mirror this machine installs from, to debootstrap the base."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    text = "\n".join(p.read_text() for p in sources if p.is_file() and p.suffix != ".disabled")
    mirrors = re.findall(r"(https?://\S+/debian)/?(?:\s|$)", text)
    return mirrors[0] if mirrors else None


def _release() -> str:
    """The README's release, unless its Python is the host's (then the test would not show
    that the image builds for a Python other than the host's)."""
    return OTHER_RELEASE if sys.version_info[:2] == (3, 13) else README_RELEASE


def _as_on_this_machine(block: str, mirror: str) -> str:
    """A README block with this machine's apt mirror and the release chosen above."""
    return block.replace(README_MIRROR, mirror).replace(README_RELEASE, _release())


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    missing = _missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install buildah "
                    "debootstrap; .ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("building the image with vfs storage and debootstrap needs root")
    CACHE.mkdir(parents=True, exist_ok=True)
    storage_conf = CACHE / "storage.conf"
    storage_conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{CACHE}/storage"\n'
                            f'runroot = "{CACHE}/run"\n')
    # The README's commands run as written (sudo is a shim for root); only where buildah keeps
    # its images is redirected, to the cache.
    path = f"{shims(tmp_path_factory.mktemp('shims'))}:{os.environ['PATH']}"
    tool = Buildah({**os.environ, "PATH": path, "CONTAINERS_STORAGE_CONF": str(storage_conf)})
    yield tool
    subprocess.run(tool.command("rm", "--all"), capture_output=True, env=tool.env)
    if _size(CACHE / "storage") > CACHE_LIMIT:
        subprocess.run(tool.command("rmi", "--prune"), capture_output=True, env=tool.env)


def _size(directory: Path) -> int:
    du = subprocess.run(["du", "-sb", str(directory)], capture_output=True, text=True)
    return int(du.stdout.split()[0]) if du.returncode == 0 else 0


@pytest.fixture(scope="module")
def base_image(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The README's base, debootstrapped once per release and kept in the cache."""
    mirror = _apt_mirror()
    if mirror is None:
        pytest.skip("no Debian apt mirror configured on this machine to debootstrap from")
    name = f"localhost/debian:{_release()}"
    if subprocess.run(buildah.command("inspect", "--type", "image", name), env=buildah.env,
                      capture_output=True).returncode == 0:
        return name
    block = _as_on_this_machine(shell_block("debootstrap"), mirror)
    done = run_block(block, cwd=tmp_path_factory.mktemp("base"), env=buildah.env,
                     timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, f"README base commands failed:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    _trust_like_the_host(buildah, name)
    return name


def _trust_like_the_host(buildah: Buildah, name: str) -> None:
    """The build fetches from PyPI with the base's CA bundle: give it the host's, which also
    holds the CA of a TLS-inspecting proxy when the machine sits behind one (as a site would
    add its CA to its base image)."""
    container = buildah("from", name).splitlines()[-1]
    buildah("copy", container, "/etc/ssl/certs/ca-certificates.crt",
            "/etc/ssl/certs/ca-certificates.crt")
    buildah("commit", "--rm", container, name)


@pytest.fixture(scope="module")
def image(buildah: Buildah, base_image: str) -> str:
    """Built by the README's buildah command, run as written from the checkout."""
    block = _as_on_this_machine(shell_block("buildah --storage-driver vfs bud"), README_MIRROR)
    assert f"BASE_IMAGE={base_image}" in block
    done = run_block(block, cwd=ROOT, env=buildah.env, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, f"README build command failed:\n{done.stdout[-5000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return IMAGE


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture
def container(buildah: Buildah, image: str) -> Iterator[str]:
    name = buildah("from", image).splitlines()[-1]
    yield name
    subprocess.run(buildah.command("rm", name), capture_output=True, env=buildah.env)


def test_image_metadata(buildah: Buildah, image: str) -> None:
    docker = buildah.config(image)["Docker"]["config"]
    assert docker["User"] == "10001:10001"  # numeric: runAsNonRoot can check it
    assert docker["Entrypoint"] == ["tini", "--", "spotwatch"]
    assert docker["Cmd"] == ["run"]
    assert f"SPOTWATCH_CONFIG={CONFIG_IN_IMAGE}" in docker["Env"]
    assert docker["Healthcheck"]["Test"] == ["CMD", "spotwatch", "status", "--healthy"]


def test_image_python_is_not_the_hosts(buildah: Buildah, container: str) -> None:
    version = buildah("run", "--isolation", "chroot", container, "--", "/opt/spotwatch/bin/python",
                      "-c", "import sys, yaml; print(*sys.version_info[:2])").split()
    assert version != [str(part) for part in sys.version_info[:2]]
    assert buildah("run", "--isolation", "chroot", container, "--", "id", "-u") == "10001"
    assert buildah("run", "--isolation", "chroot", container, "--", "id", "-g") == "10001"


def test_the_notice_goes_to_run_spotwatch_which_a_shared_volume_can_hold(
        buildah: Buildah, container: str) -> None:
    """As the image's user, with no config naming a notice file: the daemon writes the notice
    to /run/spotwatch (where `docker run -v spotwatch-notices:/run/spotwatch` shares it with the
    trainer, a named volume taking the image directory's owner), not into its state volume,
    which the trainer never sees."""
    where = buildah("run", "--isolation", "chroot", container, "--", "/opt/spotwatch/bin/python",
                    "-c", "from pathlib import Path; from spotwatch.interruption import "
                    "default_notice_file as f; print(f(Path('/var/lib/spotwatch')))")
    assert where == "/run/spotwatch/notice.json"
    mode = buildah("run", "--isolation", "chroot", container, "--", "stat", "-c", "%u:%g %a",
                   "/run/spotwatch")
    assert mode == "10001:10001 755"  # the trainer, of any user, reads the notice


def test_no_wheel_pip_or_build_tree_in_any_layer(buildah: Buildah, base_image: str,
                                                 image: str, tmp_path: Path) -> None:
    """Every layer on top of the base: what one layer adds and a later one deletes would
    still be shipped, so each layer is read, not only the final file system."""
    base_layers = buildah.config(base_image)["OCIv1"]["rootfs"]["diff_ids"]
    assert buildah.config(image)["OCIv1"]["rootfs"]["diff_ids"][:len(base_layers)] == base_layers
    buildah("push", "--disable-compression", image, f"oci:{tmp_path / 'oci'}:spotwatch")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    manifest = json.loads(_blob(tmp_path / "oci", index["manifests"][0]["digest"]).read_text())
    forbidden = re.compile(r"\.whl$|wheelhouse|^opt/build-tools|^src/|"
                           r"^opt/spotwatch/.*/site-packages/(pip|setuptools|wheel)[/-]|"
                           r"^opt/spotwatch/bin/pip")
    own_layers = manifest["layers"][len(base_layers):]
    assert own_layers
    for layer in own_layers:
        with tarfile.open(_blob(tmp_path / "oci", layer["digest"])) as tar:
            found = [name for name in tar.getnames() if forbidden.search(name.lstrip("./"))]
        assert not found, found[:20]


def _blob(layout: Path, digest: str) -> Path:
    algorithm, value = digest.split(":")
    return layout / "blobs" / algorithm / value


def _config(imds: ImdsEmulator) -> dict[str, Any]:
    return {
        "aws": {"region": REGION},
        "watch": [{"path": "/opt/ml/checkpoints", "prefix": "job/"}],
        # Closed files wait 5 s to settle (until a notice), unclosed ones 6 s.
        "sync": {"settle_seconds": 5, "quiet_seconds": 6, "stop_timeout": 20},
        "imds": {"endpoint": imds.url, "poll_interval": 0.2},
        # A hook that leaves a process behind: it must be reaped, not left a zombie.
        "hooks": {"notice_file": "/run/spotwatch/notice.json",
                  "command": "sleep 1 & echo backgrounded"},
    }


def _as_pid1(image_config: dict[str, Any]) -> list[str]:
    """The image's entrypoint and command as PID 1 of a new PID namespace, as its user."""
    uid, gid = image_config["User"].split(":")
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "setpriv",
            f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            *image_config["Entrypoint"], *image_config["Cmd"]]


def test_sidecar_uploads_on_notice_reaps_hooks_and_flushes_on_sigterm(
        buildah: Buildah, image: str, container: str, tmp_path: Path, s3: Any, bucket: str,
        imds: ImdsEmulator) -> None:
    # The volumes of the README's pod example: checkpoints (read-only for the sidecar),
    # notices (read by the trainer) and the config. The state stays in the image's volume.
    checkpoints, notices, etc = (_mkdir(tmp_path / name) for name in ("ckpt", "notices", "etc"))
    notices.chmod(0o777)
    (etc / "config.yaml").write_text(yaml.safe_dump(_config(imds)))
    environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "S3_BUCKET_NAME": bucket}
    run_args = ["run", "--isolation", "chroot", "--network", "host",
                "-v", f"{checkpoints}:/opt/ml/checkpoints:ro", "-v", f"{notices}:/run/spotwatch",
                "-v", f"{etc}:/etc/spotwatch:ro"]
    for name, value in environment.items():
        run_args += ["--env", f"{name}={value}"]
    image_config = buildah.config(image)["Docker"]["config"]
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log:
        sidecar = subprocess.Popen(
            buildah.command(*run_args, "--user", "0:0", "--cap-add", "CAP_SYS_ADMIN",
                            container, "--", *_as_pid1(image_config)),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=buildah.env)
    try:
        wait_for(lambda: "daemon_started" in log_path.read_text() or sidecar.poll() is not None,
                 timeout=60)
        assert sidecar.poll() is None, log_path.read_text()
        init = _container_init(session=sidecar.pid)
        daemon = [pid for pid in _namespace_members(init) if _is_spotwatch_run(pid)]
        assert [_uid(pid) for pid in daemon] == [10001], daemon

        shard = os.urandom(300_000)
        (checkpoints / "step_10.pt").write_bytes(shard)
        imds.fire_spot_interruption()
        wait_for(lambda: (notices / "notice.json").exists(), timeout=30)
        assert wait_for(lambda: _object_or_none(s3, bucket, "job/step_10.pt"),
                        timeout=30) == shard

        # The hook's shell has exited and its background sleep has ended: nothing of it may
        # stay behind as a zombie in the container.
        wait_for(lambda: "hook_command_done" in log_path.read_text(), timeout=30)
        wait_for(lambda: not _live_sleepers(init), timeout=30)
        assert not _zombies(init), _zombies(init)

        # The image's own HEALTHCHECK command, as the engine runs it (no -c needed).
        health = subprocess.run(
            buildah.command(*run_args, container, "--", *image_config["Healthcheck"]["Test"][1:]),
            capture_output=True, text=True, timeout=60, env=buildah.env)
        assert health.returncode == 0, health.stdout + health.stderr

        # A container stop: SIGTERM to PID 1 (tini), which passes it on; the final flush
        # uploads the file still being written when it came (after a notice, a closed file
        # would go at once), once its writer closes it.
        last = os.urandom(100_000)
        status = Path(f"/proc/{daemon[0]}/root/var/lib/spotwatch/status.json")  # its view
        with (checkpoints / "step_20.pt").open("wb") as being_written:
            being_written.write(last)
            being_written.flush()
            wait_for(lambda: json.loads(status.read_text())["unsettled_files"] == 1, timeout=30)
            os.kill(init, signal.SIGTERM)
        assert sidecar.wait(timeout=60) == 0, log_path.read_text()
        assert '"daemon_stopped"' in log_path.read_text()
        assert object_bytes(s3, bucket, "job/step_20.pt") == last
    finally:
        if sidecar.poll() is None:
            os.killpg(sidecar.pid, signal.SIGKILL)
            sidecar.wait(timeout=60)


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _container_init(session: int) -> int:
    """The host pid of the container's PID 1, among the processes of the sidecar's session."""
    for pid in _pids():
        try:
            in_session = os.getsid(pid) == session
        except OSError:
            continue
        if in_session and _status(pid).get("NSpid", "").split()[1:] == ["1"]:
            return pid
    raise AssertionError("no PID 1 of a new PID namespace in the sidecar's session")


def _namespace_members(init: int) -> list[int]:
    namespace = os.readlink(f"/proc/{init}/ns/pid")
    members = []
    for pid in _pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                members.append(pid)
        except OSError:
            continue
    return members


def _is_spotwatch_run(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run" in cmdline and any(part.endswith(b"/spotwatch") for part in cmdline)


def _uid(pid: int) -> int:
    return int(_status(pid)["Uid"].split()[0])


def _live_sleepers(init: int) -> list[int]:
    return [pid for pid in _namespace_members(init)
            if _status(pid).get("Name") == "sleep" and not _status(pid)["State"].startswith("Z")]


def _zombies(init: int) -> list[str]:
    found = [_status(pid) for pid in _namespace_members(init)]
    return [f"{status['Name']} ({status['Pid']})" for status in found
            if status.get("State", "").startswith("Z")]


def _object_or_none(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return object_bytes(s3, bucket, key)
    except s3.exceptions.NoSuchKey:
        return None


def test_kubernetes_example_runs_spotwatch_as_a_native_sidecar() -> None:
    """The README's pod: spotwatch starts first and stops last (an init container with
    restartPolicy Always), as the image's numeric non-root user, with its ledger on a volume
    that outlives the container and the notice volume shared with the trainer."""
    pod = yaml.safe_load(shell_block("kind: Pod", language="yaml"))
    spec = pod["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "spotwatch"]
    assert sidecar["restartPolicy"] == "Always"
    assert all(c["name"] != "spotwatch" for c in spec["containers"])
    uid, gid = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)[0]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert spec["securityContext"]["fsGroup"] == int(gid)

    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    state = volumes[mounts["/var/lib/spotwatch"]["name"]]
    assert "persistentVolumeClaim" in state or "hostPath" in state
    assert mounts["/opt/ml/checkpoints"]["readOnly"] is True
    assert mounts["/etc/spotwatch"]["readOnly"] is True
    (trainer,) = spec["containers"]
    notice_file = {e["name"]: e["value"] for e in trainer["env"]}["SPOTWATCH_NOTICE_FILE"]
    notices = mounts[str(Path(notice_file).parent)]["name"]
    assert notices in {m["name"] for m in trainer["volumeMounts"]}
    assert notices != mounts["/opt/ml/checkpoints"]["name"]  # never uploaded as a checkpoint
    # Room for the final flush (sync.stop_timeout, 100 s by default), inside the notice's 120 s.
    assert 100 < spec["terminationGracePeriodSeconds"] <= 120


def _dockerfile_run(containing: str) -> str:
    """The shell command of the Dockerfile's one RUN instruction containing `containing`, its
    continued lines joined as the builder joins them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    runs = [line.removeprefix("RUN ") for line in text.splitlines()
            if line.startswith("RUN ") and containing in line]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize(("minor", "refused"), [(9, True), (10, True), (11, False), (12, False)])
def test_a_base_with_an_older_python_fails_the_build_at_once_in_one_line(
        tmp_path: Path, minor: int, refused: bool) -> None:
    """spotwatch needs Python 3.11 (watchdog>=7.1): the build stage's first step, run here as
    the builder runs it (sh -c) with that base's python3, stops an older base in one line
    instead of a pip resolver dump."""
    (tmp_path / "python3").symlink_to(installed_python(minor))
    done = subprocess.run(["sh", "-c", _dockerfile_run("3.11 or newer")],
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60)
    if refused:
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"spotwatch needs Python 3.11 or newer; BASE_IMAGE has python3 3.{minor}"]
    else:
        assert (done.returncode, done.stderr) == (0, "")
