"""Include/exclude follow aws s3 sync exactly: the AWS CLI's own filter is the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from awscli.customizations.s3.fileformat import FileFormat
from awscli.customizations.s3.fileinfo import FileInfo
from awscli.customizations.s3.filters import create_filter
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spotwatch.config import WatchDir
from spotwatch.sync.filters import PathFilter
from spotwatch.sync.tracker import ChangeTracker

ROOT = "/ckpt"


def test_defaults_exclude_temp_and_caches() -> None:
    f = PathFilter(ROOT, ("*.tmp", "*.tmp/*", "__pycache__/*", ".git/*"), ())
    assert f.accepts("step_1/model.pt")
    assert not f.accepts("model.pt.tmp")
    assert not f.accepts("step_1/model.pt.tmp")  # '*' crosses '/' as in aws s3 sync
    assert not f.accepts("step_2.tmp/model.pt")  # a staging directory, renamed when complete
    assert not f.accepts("__pycache__/x.pyc")
    assert f.accepts("sub/__pycache__/x.pyc")  # patterns are anchored at the watched dir
    assert not f.accepts(".git/HEAD")


def test_include_after_exclude_reincludes() -> None:
    f = PathFilter(ROOT, ("*",), ("*.pt", "*.json"))
    assert f.accepts("step_1/model.pt")
    assert f.accepts("meta.json")
    assert not f.accepts("events.out.tfevents")


def test_include_alone_filters_nothing() -> None:
    f = PathFilter(ROOT, (), ("*.pt",))
    assert f.accepts("anything.bin")


def test_matching_is_case_sensitive() -> None:
    assert PathFilter(ROOT, ("*.TMP",), ()).accepts("a.tmp")


def test_absolute_patterns_match_the_full_path() -> None:
    assert not PathFilter(ROOT, ("/*",), ()).accepts("step_1/model.pt")  # excludes everything
    only_step_2 = PathFilter("/data/../ckpt/", ("*",), ("/ckpt/step_2/*",))
    assert only_step_2.accepts("step_2/model.pt")
    assert not only_step_2.accepts("step_1/model.pt")
    assert PathFilter(ROOT, ("/other/*",), ()).accepts("step_1/model.pt")


def test_tracker_honours_absolute_patterns(tmp_path: Path) -> None:
    """The tracker passes paths relative to its root; the filter anchors them at the root."""
    watch = WatchDir(tmp_path, exclude=(f"{tmp_path}/step_1/*",))
    tracker = ChangeTracker(watch, settle_seconds=0.1, quiet_seconds=1.0)
    assert tracker.relative(tmp_path / "step_1" / "model.pt") is None
    assert tracker.relative(tmp_path / "step_2" / "model.pt") == "step_2/model.pt"


def aws_cli_accepts(root: str, relative_path: str, exclude: list[str], include: list[str],
                    destination: str) -> bool:
    """What `aws s3 sync ROOT DEST --exclude ... --include ...` decides for one local file."""
    parameters = {
        "src": root, "dest": destination, "dir_op": True,
        "filters": [["--exclude", p] for p in exclude] + [["--include", p] for p in include],
    }
    # The CLI lists a local directory as its formatted path joined with each name below it.
    listed_root = FileFormat().format(root, destination, {"dir_op": True})["src"]["path"]
    file_info = FileInfo(src=os.path.join(listed_root, relative_path), src_type="local")
    return bool(list(create_filter(parameters).call([file_info])))


# Names as a filesystem may hold them: wildcard characters, dots, unicode, and the lone
# surrogates that stand for bytes that are not UTF-8 (os.fsdecode).
NAME_CHARS = st.sampled_from([*"ab.-_[]?*!^\\ ", "é", "ß", "Σ", "\u0301", "日", "\U0001f600",
                              "\udcff"])
names = st.text(NAME_CHARS, min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
relative_paths = st.lists(names, min_size=1, max_size=4).map("/".join)
# Roots as a user may write them; the CLI (and spotwatch) normalise them with abspath.
roots = st.lists(st.one_of(names, st.sampled_from([".", "..", ""])), max_size=3).map(
    lambda parts: "/" + "/".join(parts))
PATTERN_CHARS = st.sampled_from([*"ab.*?[]!^-/\\", "é", "\udcff"])


@st.composite
def patterns(draw: st.DrawFn, root: str, relative_path: str) -> str:
    """Random patterns, and ones made from the file's own path so that many of them match."""
    full_path = os.path.join(os.path.abspath(root), relative_path)
    source = draw(st.sampled_from([relative_path, full_path, root + "/" + relative_path]))
    if draw(st.booleans()):
        return draw(st.text(PATTERN_CHARS, max_size=8))
    cut = draw(st.integers(0, len(source)))
    wildcard = draw(st.sampled_from(["*", "?", "", "[!x]", "[", "]", "/", "//", "**"]))
    if draw(st.booleans()):
        return source[:cut] + wildcard
    return wildcard + source[cut:]


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str, list[str], list[str], str]:
    root, relative_path = draw(roots), draw(relative_paths)
    pattern_lists = st.lists(patterns(root, relative_path), max_size=4)
    bucket = draw(st.sampled_from(["ckpt", "my.bucket-1"]))
    prefix = draw(st.sampled_from(["", "run1/", "a/*/["]))
    return (root, relative_path, draw(pattern_lists), draw(pattern_lists),
            f"s3://{bucket}/{prefix}")


@settings(max_examples=1500, deadline=None)
@given(cases())
@example(("/ckpt", "step_1/model.pt", ["/*"], [], "s3://ckpt/"))
@example(("/", "model.pt", ["*"], [], "s3://ckpt/"))  # the CLI lists "//model.pt" here
@example(("/ck[pt]", "model.tmp", ["*.tmp"], [], "s3://ckpt/"))  # the root is pattern text
def test_decisions_equal_the_aws_cli(case: tuple[str, str, list[str], list[str], str]) -> None:
    root, relative_path, exclude, include, destination = case
    expected = aws_cli_accepts(root, relative_path, exclude, include, destination)
    assert PathFilter(root, tuple(exclude), tuple(include)).accepts(relative_path) == expected


@pytest.mark.parametrize("root", ["/data/run[1]/ckpt", "/data/*/ckpt", "/data/run?/ckpt",
                                  "/data/[!x]/ckpt", "/data/ckpt"])
def test_the_default_excludes_hold_whatever_characters_the_watched_path_has(root: str) -> None:
    """The CLI anchors a pattern by joining it to the path, whose wildcard characters then
    act as wildcards: `run[1]` matches only `run1`, and the default excludes matched nothing
    under a watched `run[1]/ckpt`. They are spotwatch's own guard, anchored literally; a
    configured pattern keeps the CLI's meaning."""
    defaults = PathFilter.for_watch(WatchDir(Path(root)))
    assert defaults.accepts("step_1/model.pt")
    assert not defaults.accepts("step_2.tmp/model.pt") and not defaults.accepts("model.pt.tmp")
    assert not defaults.accepts("tmp-checkpoint-5/model.safetensors")
    configured = PathFilter.for_watch(WatchDir(Path(root), exclude=("*.tmp",)))
    assert configured.accepts("model.pt.tmp") == aws_cli_accepts(root, "model.pt.tmp",
                                                                  ["*.tmp"], [], "s3://ckpt/")
