"""Include/exclude follow aws s3 sync: everything included, later matching filter wins."""

from __future__ import annotations

from spotwatch.filters import PathFilter


def test_defaults_exclude_temp_and_caches() -> None:
    f = PathFilter(("*.tmp", "*.tmp/*", "__pycache__/*", ".git/*"), ())
    assert f.accepts("step_1/model.pt")
    assert not f.accepts("model.pt.tmp")
    assert not f.accepts("step_1/model.pt.tmp")  # '*' crosses '/' as in aws s3 sync
    assert not f.accepts("step_2.tmp/model.pt")  # a staging directory, renamed when complete
    assert not f.accepts("__pycache__/x.pyc")
    assert f.accepts("sub/__pycache__/x.pyc")  # patterns are anchored at the watched dir
    assert not f.accepts(".git/HEAD")


def test_include_after_exclude_reincludes() -> None:
    f = PathFilter(("*",), ("*.pt", "*.json"))
    assert f.accepts("step_1/model.pt")
    assert f.accepts("meta.json")
    assert not f.accepts("events.out.tfevents")


def test_include_alone_filters_nothing() -> None:
    f = PathFilter((), ("*.pt",))
    assert f.accepts("anything.bin")


def test_matching_is_case_sensitive() -> None:
    assert PathFilter(("*.TMP",), ()).accepts("a.tmp")
