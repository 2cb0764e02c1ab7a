"""The mount table's one reader: mount points written in octal escapes, names that are not
UTF-8, optional fields before the type; and the commands that read it never trip on a host's
odd mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch import mounts
from spotwatch.mounts import Mount, file_system_type, is_mount_point

# Python's own view of a path's bytes: any bytes but NUL and '/', decoded as paths are.
name_parts = st.binary(min_size=1, max_size=12).filter(
    lambda raw: b"\0" not in raw and b"/" not in raw and raw not in (b".", b"..")
).map(os.fsdecode)
absolute_paths = st.lists(name_parts, min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))
optional_fields = st.lists(st.sampled_from(["shared:1", "master:7", "propagate_from:2",
                                            "unbindable"]), max_size=3)


def kernel_escaped(path: str) -> str:
    """As the kernel writes a mount point in the table (show_mountinfo's mangle)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def mountinfo_line(point: str, fs_type: str, optional: list[str]) -> bytes:
    fields = ["36", "25", "0:32", "/", kernel_escaped(point), "rw,relatime", *optional, "-",
              fs_type, "none", "rw"]
    return os.fsencode(" ".join(fields))


@given(points=st.lists(absolute_paths, min_size=1, max_size=5),
       optional=optional_fields, fs_type=st.sampled_from(["ext4", "proc", "tmpfs", "fuse.s3"]))
def test_every_point_reads_back_as_the_path_it_names(
        tmp_path_factory: pytest.TempPathFactory, points: list[str], optional: list[str],
        fs_type: str) -> None:
    table = tmp_path_factory.mktemp("table") / "mountinfo"
    table.write_bytes(b"\n".join(mountinfo_line(point, fs_type, optional) for point in points))
    assert mounts.mounts(table) == [Mount(Path(point), fs_type) for point in points]


def test_lines_not_of_the_format_are_passed_over(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"garbage\n" + mountinfo_line("/data", "xfs", []) +
                      b"\n1 2 0:3 / /x rw no-separator-here\n")
    assert mounts.mounts(table) == [Mount(Path("/data"), "xfs")]


def test_an_unreadable_table_is_none(tmp_path: Path) -> None:
    assert mounts.mounts(tmp_path / "absent") is None


def test_the_nearest_and_last_mount_above_a_path_gives_its_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"\n".join([
        mountinfo_line("/", "ext4", []), mountinfo_line("/srv", "xfs", ["shared:3"]),
        mountinfo_line("/srv/a b", "tmpfs", []), mountinfo_line("/srv/a b", "proc", []),
        mountinfo_line("/srv/ab", "nfs", [])]))
    monkeypatch.setattr(mounts, "MOUNT_INFO", table)
    assert file_system_type(Path("/srv/a b/x/y")) == "proc"  # the later mount hides the first
    assert file_system_type(Path("/srv/a bc")) == "xfs"  # a sibling's prefix is not above it
    assert file_system_type(Path("/srv/ab")) == "nfs"
    assert file_system_type(Path("/home")) == "ext4"
    assert is_mount_point(Path("/srv/a b")) and not is_mount_point(Path("/srv/a"))


def test_this_hosts_table_is_read() -> None:
    """The real table: / is mounted, and a fresh directory below no mount of its own is not."""
    table = mounts.mounts()
    if table is None:
        pytest.skip("no /proc/self/mountinfo here")
    assert is_mount_point(Path("/"))
    assert file_system_type(Path("/proc/self")) == "proc"


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounting in a private namespace takes root and unshare")


@needs_mount_namespace
@pytest.mark.parametrize("odd_name", [b"odd\xffname", b"with space", b"back\\slash", b"cr\rlf\n"])
def test_check_reads_a_host_with_an_odd_mount_point_and_still_refuses_a_kernel_fs(
        tmp_path: Path, odd_name: bytes) -> None:
    """A mount point anywhere on the host whose name is not UTF-8 or holds what the table
    escapes: `check` still reads the table, refuses a state.dir on a proc file system with
    its one line and exit 2, and never gives a traceback."""
    bystander = os.fsencode(tmp_path) + b"/" + odd_name
    os.mkdir(bystander)
    kernel_fs = tmp_path / "kernel fs"
    kernel_fs.mkdir()
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"aws: {{region: us-east-1}}\n"
                      f"watch: [{{path: '{checkpoints}', prefix: run1/}}]\n"
                      f"state: {{dir: '{kernel_fs}/state'}}\n")
    script = 'mount -t tmpfs none "$1" && mount -t proc proc "$2" && shift 2 && exec "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", bystander,
         kernel_fs, sys.executable, "-m", "spotwatch.cli", "check", "-c", str(config)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "S3_BUCKET_NAME": "spotwatch-mounts"})
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"spotwatch: error: config key 'state.dir' ({kernel_fs}/state) is "
                             "on a proc file system, which cannot keep state: set state.dir to "
                             "a directory on a disk\n")
