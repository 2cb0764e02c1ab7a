"""deploy/user-data.sh: shellcheck-clean, and lays down a working install in a fake root."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwatch.config import load_config
from spotwatch.emulator import ImdsEmulator
from tests.conftest import installed_python
from tests.readme_commands import run_in_overlaid_root, shell_block, upper

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "user-data.sh"


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("spotwatch-*.whl"))


def run_user_data(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "HOME": str(root), "DESTDIR": str(root), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_installs_into_fake_root(tmp_path: Path, wheel: Path, imds: ImdsEmulator) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "root"
    result = run_user_data(
        root,
        SPOTWATCH_BUCKET="team-checkpoints",
        SPOTWATCH_PACKAGE=str(wheel),
        SPOTWATCH_PIP_ARGS="--no-deps --no-index",
        # YAML would read a plain "#" as a comment's start and ": " as a mapping's.
        SPOTWATCH_CHECKPOINT_DIR="/data/ckpt #2",
        SPOTWATCH_PREFIX="job: 42's #1/",
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url,  # the region comes from IMDS
    )
    assert result.returncode == 0, result.stderr

    config = load_config(root / "etc/spotwatch/config.yaml")
    assert config.region == "us-west-2"
    assert config.watch[0].path == Path("/data/ckpt #2")
    assert config.watch[0].prefix == "job: 42's #1/"
    assert (root / "data/ckpt #2").is_dir()

    env_file = root / "etc/spotwatch/spotwatch.env"
    assert env_file.read_text() == "S3_BUCKET_NAME=team-checkpoints\n"
    assert env_file.stat().st_mode & 0o077 == 0  # the environment file is private

    unit = root / "etc/systemd/system/spotwatch.service"
    assert unit.read_text() == (ROOT / "systemd" / "spotwatch.service").read_text()
    wanted = root / "etc/systemd/system/multi-user.target.wants/spotwatch.service"
    assert wanted.is_symlink()
    assert os.readlink(root / "usr/local/bin/spotwatch") == "/opt/spotwatch/bin/spotwatch"
    assert (root / "opt/spotwatch/bin/spotwatch").is_file()


def test_run_again_it_keeps_the_files_it_replaces_and_says_so(tmp_path: Path, wheel: Path,
                                                              imds: ImdsEmulator) -> None:
    """Run again on an instance with other settings, over a config the operator edited: the
    new files are in place, the earlier ones kept beside them and named; the same settings
    again replace nothing."""
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "root"
    settings = {"SPOTWATCH_PACKAGE": str(wheel), "SPOTWATCH_PIP_ARGS": "--no-deps --no-index",
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
    assert run_user_data(root, SPOTWATCH_BUCKET="first-bucket", **settings).returncode == 0
    etc = root / "etc/spotwatch"
    again = run_user_data(root, SPOTWATCH_BUCKET="first-bucket", **settings)
    assert again.returncode == 0 and "replaced" not in again.stderr, again.stderr
    with (etc / "config.yaml").open("a") as config:
        config.write("  keep_sets: 3\n")  # the operator's edit
    edited = (etc / "config.yaml").read_text()
    done = run_user_data(root, SPOTWATCH_BUCKET="other-bucket", **settings)
    assert done.returncode == 0, done.stderr
    assert (etc / "spotwatch.env").read_text() == "S3_BUCKET_NAME=other-bucket\n"
    assert load_config(etc / "config.yaml").sync.keep_sets == 0
    [kept_config] = etc.glob("config.yaml.replaced-*")
    [kept_env] = etc.glob("spotwatch.env.replaced-*")
    assert kept_config.read_text() == edited
    assert kept_env.read_text() == "S3_BUCKET_NAME=first-bucket\n"
    for env_file in (kept_env, etc / "spotwatch.env"):
        assert env_file.stat().st_mode & 0o077 == 0  # private, as written
    for kept in (kept_config, kept_env):
        assert f"the earlier one kept as {kept}" in done.stderr
    assert not list(etc.glob(".*.new"))


# Values an operator may set, as environment variables carry them: no NUL, no line breaks.
SETTING_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40)


@settings(max_examples=60, deadline=None)
@given(value=SETTING_TEXT)
def test_config_values_reach_the_config_file_exactly(value: str) -> None:
    """Whatever a setting holds, the config file the script writes reads back as that value
    (yaml_quote, as the script defines it)."""
    quote = subprocess.run(
        ["bash", "-c", f'source <(sed -n "/^yaml_quote() {{/,/^}}/p" {shlex.quote(str(SCRIPT))})'
                       ' && yaml_quote "$1"', "bash", value],
        capture_output=True, text=True, check=True, timeout=30).stdout
    assert yaml.safe_load(f"prefix: {quote}\n") == {"prefix": value}


def test_refuses_without_bucket(tmp_path: Path) -> None:
    result = run_user_data(tmp_path / "root", SPOTWATCH_REGION="us-west-2")
    assert result.returncode == 1
    assert "set SPOTWATCH_BUCKET" in result.stderr
    assert not (tmp_path / "root" / "etc").exists()


def test_readme_command_installs_and_enables(tmp_path: Path, imds: ImdsEmulator) -> None:
    """The README's command, as written, on a running instance (root overlaid, see
    tests/readme_commands.py): installs from the checkout, writes the config with the
    instance's region, enables and starts the unit."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("systemctl") is None:
        pytest.skip("needs root, unshare and systemctl")
    block = shell_block("deploy/user-data.sh")
    done = run_in_overlaid_root(block + "/usr/local/bin/spotwatch --version\n", workdir=tmp_path,
                                cwd=ROOT, extra_env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("spotwatch ")

    config = load_config(upper(tmp_path, "/etc/spotwatch/config.yaml"))
    assert config.region == "us-west-2"
    assert config.watch[0].path == Path("/opt/ml/checkpoints")
    env_file = upper(tmp_path, "/etc/spotwatch/spotwatch.env")
    assert env_file.read_text() == "S3_BUCKET_NAME=my-checkpoints\n"
    assert upper(tmp_path, "/etc/systemd/system/spotwatch.service").read_text() == \
        (ROOT / "systemd" / "spotwatch.service").read_text()
    assert upper(tmp_path, "/etc/systemd/system/multi-user.target.wants/"
                           "spotwatch.service").is_symlink()
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload", "enable spotwatch.service", "restart spotwatch.service"]


def _needs_overlaid_root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("systemctl") is None:
        pytest.skip("needs root, unshare and systemctl")


def _user_data_command(**settings: str) -> str:
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in settings.items())
    return f"{assignments} bash deploy/user-data.sh\n"


# As `sudo` runs a command on Amazon Linux and RHEL: a secure_path without /usr/local.
WITHOUT_USR_LOCAL = ('PATH=$(printf %s "$PATH" | tr : "\\n" | grep -v "^/usr/local/" '
                     '| paste -sd: -) ')


def test_first_launch_with_restore_and_nothing_to_restore_still_starts_spotwatch(
        tmp_path: Path, wheel: Path, bucket: str, imds: ImdsEmulator) -> None:
    """SPOTWATCH_RESTORE=yes in a launch template is there from a job's first instance on, when
    the bucket holds no checkpoint yet: that instance must still be protected."""
    _needs_overlaid_root()
    command = WITHOUT_USR_LOCAL + _user_data_command(
        SPOTWATCH_BUCKET=bucket, SPOTWATCH_PACKAGE=str(wheel), SPOTWATCH_RESTORE="yes")
    done = run_in_overlaid_root(command, workdir=tmp_path, cwd=ROOT,
                                extra_env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
    assert done.returncode == 0, done.stderr
    # The restore ran (whatever PATH sudo left) and said why it restored nothing.
    assert "no complete" in done.stderr
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload", "enable spotwatch.service", "restart spotwatch.service"]


APT_GET_SHIM = """#!/bin/sh
# Records the call; installing python3-venv brings ensurepip back (lifts the overlay hiding it).
echo "$*" >>"$APT_LOG"
case "$*" in *python3-venv*) umount "$STDLIB" ;; esac
"""


def test_installs_python3_venv_where_python3_lacks_ensurepip(
        tmp_path: Path, wheel: Path, imds: ImdsEmulator) -> None:
    """Debian and Ubuntu ship `venv` with python3 but ensurepip only in python3-venv: there,
    `python3 -m venv --help` works while making a venv fails. Here the python3 on PATH gets
    its ensurepip hidden (an overlay whiteout in a private mount namespace)."""
    _needs_overlaid_root()
    stdlib = subprocess.run(
        ["python3", "-c", "import ensurepip, os; print(os.path.dirname(os.path.dirname("
                          "ensurepip.__file__)))"],
        capture_output=True, text=True, check=True).stdout.strip()
    lib_upper, lib_work = tmp_path / "stdlib-upper", tmp_path / "stdlib-work"
    lib_upper.mkdir()
    lib_work.mkdir()
    (tmp_path / "shims").mkdir()
    (tmp_path / "shims" / "apt-get").write_text(APT_GET_SHIM)
    (tmp_path / "shims" / "apt-get").chmod(0o755)
    hide_ensurepip = (f"mount -t overlay overlay -o lowerdir={stdlib},upperdir={lib_upper},"
                      f"workdir={lib_work} {stdlib}\nrm -rf {stdlib}/ensurepip\n")
    command = _user_data_command(SPOTWATCH_BUCKET="team-checkpoints",
                                 SPOTWATCH_PACKAGE=str(wheel),
                                 SPOTWATCH_PIP_ARGS="--no-deps --no-index")
    done = run_in_overlaid_root(hide_ensurepip + command, workdir=tmp_path, cwd=ROOT,
                                extra_env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
                                           "APT_LOG": str(tmp_path / "apt.log"),
                                           "STDLIB": stdlib})
    assert done.returncode == 0, done.stderr
    assert "install -y -q python3-venv" in (tmp_path / "apt.log").read_text()
    assert upper(tmp_path, "/opt/spotwatch/bin/spotwatch").is_file()


def test_a_trainer_of_another_user_may_write_and_rotate_its_checkpoints(
        tmp_path: Path, wheel: Path, imds: ImdsEmulator) -> None:
    """Root runs the script: the checkpoint directory it makes, and what a restore puts there
    (here: a checkpoint left by root), belong to SPOTWATCH_TRAINER_USER, who may then save new
    checkpoints there and delete old ones (Hugging Face's save_total_limit does)."""
    if os.geteuid() != 0 or shutil.which("systemctl") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, systemctl and runuser")
    # Outside pytest's tmp_path, which only root may enter: the trainer must reach the root.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as reachable:
        Path(reachable).chmod(0o755)
        _write_and_rotate_as(Path(reachable) / "root", "nobody", wheel, imds)


def _write_and_rotate_as(root: Path, user: str, wheel: Path, imds: ImdsEmulator) -> None:
    restored = root / "opt/ml/checkpoints/checkpoint-100"
    restored.mkdir(parents=True)
    (restored / "model.pt").write_bytes(b"weights")
    result = run_user_data(root, SPOTWATCH_BUCKET="team-checkpoints",
                           SPOTWATCH_PACKAGE=str(wheel), SPOTWATCH_PIP_ARGS="--no-deps --no-index",
                           SPOTWATCH_TRAINER_USER=user,
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
    assert result.returncode == 0, result.stderr
    checkpoints = root / "opt/ml/checkpoints"
    as_trainer = ["runuser", "-u", user, "--"]
    rotate = subprocess.run([*as_trainer, "sh", "-c", 'mkdir "$1/checkpoint-200" && '
                             'rm -r "$1/checkpoint-100"', "sh", str(checkpoints)],
                            capture_output=True, text=True, timeout=30)
    assert rotate.returncode == 0, rotate.stderr
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-200"]


def test_an_unknown_trainer_user_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    result = run_user_data(tmp_path / "root", SPOTWATCH_BUCKET="b", SPOTWATCH_REGION="us-west-2",
                           SPOTWATCH_TRAINER_USER="no-such-trainer")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "SPOTWATCH_TRAINER_USER: no user no-such-trainer")
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(("env", "looked_at"), [
    ({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}, "http://[fd00:ec2::254]"),
    ({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9/"}, "http://127.0.0.1:9;"),
])
def test_the_region_is_asked_of_the_imds_the_sdk_would_ask(
        tmp_path: Path, env: dict[str, str], looked_at: str) -> None:
    """On an IPv6-only instance (endpoint mode IPv6) the region comes from IMDS's IPv6
    address, as the SDKs and spotwatch take it; an endpoint given with a slash is used
    without one. Here neither answers: the one line names where it looked."""
    result = run_user_data(tmp_path / "root", SPOTWATCH_BUCKET="team-checkpoints", **env)
    assert result.returncode == 1
    assert f"cannot read the region from IMDS at {looked_at}" in result.stderr, result.stderr


# Older distributions' python3 (Ubuntu 22.04: 3.10, Amazon Linux 2023: 3.9) and the python3.11
# they offer beside it: real interpreters (pyenv's), on a PATH of their own.
NOT_INSTALLED = '#!/bin/sh\necho "$(basename "$0"): command not found" >&2\nexit 127\n'


def _pythons_dir(directory: Path, python3: int, python311: bool) -> Path:
    """python3 of the given minor version; python3.11 real or, as python3.12 and python3.13,
    not installed (a stand-in that shadows whatever the host has)."""
    directory.mkdir()
    (directory / "python3").symlink_to(installed_python(python3))
    for name in ("python3.13", "python3.12", "python3.11"):
        if name == "python3.11" and python311:
            (directory / name).symlink_to(installed_python(11))
        else:
            (directory / name).write_text(NOT_INSTALLED)
            (directory / name).chmod(0o755)
    return directory


def _python3_version(pythons: Path) -> str:
    return subprocess.run([str(pythons / "python3"), "-c", "import platform; "
                           "print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("python3", [10, 9])
def test_an_older_python3_is_passed_over_for_python311(
        tmp_path: Path, wheel: Path, python3: int) -> None:
    """spotwatch needs Python 3.11 (watchdog>=7.1): where python3 is older, the venv is made
    with the python3.11 beside it."""
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    pythons = _pythons_dir(tmp_path / "pythons", python3, python311=True)
    root = tmp_path / "root"
    result = run_user_data(root, PATH=f"{pythons}:/usr/bin:/bin", SPOTWATCH_BUCKET="b",
                           SPOTWATCH_REGION="us-west-2", SPOTWATCH_PACKAGE=str(wheel),
                           SPOTWATCH_PIP_ARGS="--no-deps --no-index")
    assert result.returncode == 0, result.stderr
    version = subprocess.run([str(root / "opt/spotwatch/bin/python"), "-c",
                              "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "(3, 11)"
    assert (root / "opt/spotwatch/bin/spotwatch").is_file()


@pytest.mark.parametrize("python3", [10, 9])
def test_without_python311_it_stops_in_one_line_before_pip(
        tmp_path: Path, wheel: Path, python3: int) -> None:
    """No Python 3.11 or newer (and, with DESTDIR, nothing installed): one line naming what
    python3 is, exit 1, and no venv made, so pip never ran."""
    pythons = _pythons_dir(tmp_path / "pythons", python3, python311=False)
    root = tmp_path / "root"
    result = run_user_data(root, PATH=f"{pythons}:/usr/bin:/bin", SPOTWATCH_BUCKET="b",
                           SPOTWATCH_REGION="us-west-2", SPOTWATCH_PACKAGE=str(wheel),
                           SPOTWATCH_PIP_ARGS="--no-deps --no-index")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "spotwatch user-data: error: Python 3.11 or newer with venv is required "
        f"(found: python3 {_python3_version(pythons)})"]
    assert not (root / "opt").exists()


PACKAGE_MANAGER_SHIM = """#!/bin/sh
# Records the call; installing python3.11 puts the real one where its stand-in was.
echo "$*" >>"$PM_LOG"
case "$*" in *"install "*python3.11*) ln -sf "$PYTHON311" "$(dirname "$0")/python3.11" ;; esac
"""


def _host_without_apt(directory: Path) -> Path:
    """/usr/bin and /usr/sbin as links, less apt-get: a dnf host's PATH."""
    directory.mkdir()
    for source in (Path("/usr/sbin"), Path("/usr/bin")):
        for tool in source.iterdir():
            if tool.name != "apt-get" and not (directory / tool.name).exists():
                (directory / tool.name).symlink_to(tool)
    return directory


@pytest.mark.parametrize(("python3", "manager", "calls"), [
    (10, "apt-get", ["update -q", "install -y -q python3.11 python3.11-venv"]),  # Ubuntu 22.04
    (9, "dnf", ["install -y -q python3.11"]),  # Amazon Linux 2023
])
def test_installs_python311_where_python3_is_older(
        tmp_path: Path, wheel: Path, python3: int, manager: str, calls: list[str]) -> None:
    """On a running instance whose python3 is older than 3.11 and which has no python3.11 yet,
    the distribution's python3.11 is installed and the venv made with it."""
    _needs_overlaid_root()
    pythons = _pythons_dir(tmp_path / "pythons", python3, python311=False)
    (pythons / manager).write_text(PACKAGE_MANAGER_SHIM)
    (pythons / manager).chmod(0o755)
    system = Path("/usr/bin") if manager == "apt-get" else _host_without_apt(tmp_path / "system")
    command = f"PATH={pythons}:{tmp_path / 'shims'}:{system} " + _user_data_command(
        SPOTWATCH_BUCKET="team-checkpoints", SPOTWATCH_REGION="us-west-2",
        SPOTWATCH_PACKAGE=str(wheel), SPOTWATCH_PIP_ARGS="--no-deps --no-index")
    done = run_in_overlaid_root(command, workdir=tmp_path, cwd=ROOT, extra_env={
        "PM_LOG": str(tmp_path / "pm.log"), "PYTHON311": str(installed_python(11))})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pm.log").read_text().splitlines() == calls
    version = subprocess.run([str(upper(tmp_path, "/opt/spotwatch/bin/python")), "-c",
                              "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "(3, 11)"
