"""Which set is the newest, for restore and retention alike (sync.sets.remote): sets dated
alike are ordered by their step numbers, never by the order they happened to be sealed in."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spotwatch.keys import manifest_key, natural_order
from spotwatch.sync.pruner import plan_deletions
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry
from spotwatch.sync.sets.remote import list_manifests

from .conftest import Workspace, keys_in
from .memory_store import InMemoryObjectStore
from .test_checkpoint_sets import restore
from .test_daemon_e2e import flush_summary

DATED_NS = 1_700_000_000 * 10**9  # second-granular, as an archive keeps it
NAMES = ("step_{}", "global_step{}", "checkpoint-{}", "iter_{:07d}", "epoch={}.ckpt")


def dated(name: str, mtime_ns: int, sealed_at: float) -> Manifest:
    path = f"{name}/model.pt" if "." not in name else name
    return Manifest(name, "run1/", (ManifestEntry(f"run1/{path}", path, 1, mtime_ns, "c"),),
                    sealed_at)


@given(numbers=st.lists(st.integers(0, 10**7), min_size=2, max_size=6, unique=True),
       pattern=st.sampled_from(NAMES),
       seals=st.lists(st.floats(1.7e9, 1.8e9), min_size=6, max_size=6),
       keep=st.integers(1, 5))
def test_sets_dated_alike_are_newest_by_their_step_number(
        numbers: list[int], pattern: str, seals: list[float], keep: int) -> None:
    """Whatever order the sets were sealed in (seals), the higher step is the newer: restore
    tries the sets in that order, and retention keeps the highest steps."""
    store = InMemoryObjectStore()
    for number, sealed_at in zip(numbers, seals, strict=False):
        manifest = dated(pattern.format(number), DATED_NS, sealed_at)
        store.put(manifest_key("run1/", manifest.set_name), manifest.to_json().encode())
    manifests = list_manifests(store, "run1/")
    by_step = [pattern.format(n) for n in sorted(numbers, reverse=True)]
    assert [m.set_name for m in manifests] == by_step

    plan = plan_deletions("run1/", lambda _: True, manifests, [], keep, lambda _: True)
    dropped = {d.key for d in plan if d.key.startswith("run1/.spotwatch/")}
    assert dropped == {manifest_key("run1/", name) for name in by_step[keep:]}


@given(st.lists(st.text(st.sampled_from("ab_-=.0123456789"), min_size=1, max_size=8),
                min_size=1, max_size=8, unique=True))
def test_any_names_sort_by_natural_order(names: list[str]) -> None:
    """Any two set names compare, each once in the order, numbers by their value."""
    ordered = sorted(names, key=natural_order)
    assert sorted(ordered) == sorted(names)
    assert sorted(reversed(names), key=natural_order) == ordered  # a total order


def test_restore_and_retention_take_the_higher_step_when_mtimes_tie(
        workspace: Workspace, s3: Any) -> None:
    """step_100 and step_200 unpacked with one mtime; step_100 happens to be sealed last."""
    for name in ("step_200", "step_100"):
        path = workspace.checkpoints / name / "model.pt"
        path.parent.mkdir()
        path.write_bytes(name.encode())
        os.utime(path, ns=(DATED_NS, DATED_NS))
        assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_200" in result.stdout
    assert os.listdir(target) == ["step_200"]

    pruned = workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1")
    assert pruned.returncode == 0, pruned.stderr
    keys = keys_in(s3, workspace.bucket)
    assert {"run1/step_200/model.pt", manifest_key("run1/", "step_200")} <= keys, keys
    assert "run1/step_100/model.pt" not in keys, keys


@given(steps=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1,
                      max_size=8, unique_by=lambda step: step[0]),
       pattern=st.sampled_from(NAMES), keep=st.integers(1, 4))
def test_retention_keeps_the_newest_and_the_highest_steps(
        steps: list[tuple[int, int]], pattern: str, keep: int) -> None:
    """Whatever the sets' dates (a file written into an old step later makes it the newest by
    date), retention keeps the `keep` newest sets of the series and its `keep` highest steps,
    and drops only sets that are neither."""
    store = InMemoryObjectStore()
    for number, age in steps:
        manifest = dated(pattern.format(number), DATED_NS - age * 10**9, 1.8e9)
        store.put(manifest_key("run1/", manifest.set_name), manifest.to_json().encode())
    manifests = list_manifests(store, "run1/")
    plan = plan_deletions("run1/", lambda _: True, manifests, [], keep, lambda _: True)
    dropped = {d.key for d in plan if d.key.startswith("run1/.spotwatch/")}
    newest = [m.set_name for m in manifests][:keep]
    highest = sorted((m.set_name for m in manifests), key=natural_order, reverse=True)[:keep]
    assert dropped == {manifest_key("run1/", m.set_name) for m in manifests
                       if m.set_name not in {*newest, *highest}}


def test_an_old_step_written_to_later_does_not_cost_the_steps_after_it(
        workspace: Workspace, s3: Any) -> None:
    """keep_sets 1: step_200 saved, then an evaluation writes into step_100. step_100 is the
    newest by date, restored and kept; step_200, the trainer's latest step, stays in S3 too,
    and restore says so."""
    for age, name in ((300, "step_100"), (200, "step_200")):
        path = workspace.checkpoints / name / "model.pt"
        path.parent.mkdir()
        path.write_bytes(name.encode())
        os.utime(path, ns=(DATED_NS - age * 10**9,) * 2)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    (workspace.checkpoints / "step_100" / "eval_results.json").write_text('{"loss": 1.0}')
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    result = restore(workspace, "--to", str(workspace.root / "restored"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("restored step_100 ")
    assert ("; higher steps of its series, dated older: step_200 (--set step_200 restores it)"
            in result.stdout)

    pruned = workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1")
    assert pruned.returncode == 0, pruned.stderr
    keys = keys_in(s3, workspace.bucket)
    assert {"run1/step_200/model.pt", manifest_key("run1/", "step_200"),
            "run1/step_100/eval_results.json", manifest_key("run1/", "step_100")} <= keys, keys


def test_names_with_several_numbers_are_kept_by_date_alone() -> None:
    """`val_loss=2.34-step=1000`: its first number is no step, so the "highest" of such names
    is no later work; retention keeps them by date alone."""
    store = InMemoryObjectStore()
    for age, name in ((300, "gpt--val_loss=3.10-step=100"), (200, "gpt--val_loss=2.90-step=200"),
                      (100, "gpt--val_loss=2.50-step=300")):
        manifest = dated(name, DATED_NS - age * 10**9, 1.8e9)
        store.put(manifest_key("run1/", manifest.set_name), manifest.to_json().encode())
    manifests = list_manifests(store, "run1/")
    plan = plan_deletions("run1/", lambda _: True, manifests, [], 1, lambda _: True)
    dropped = {d.key for d in plan if d.key.startswith("run1/.spotwatch/")}
    assert dropped == {manifest_key("run1/", "gpt--val_loss=3.10-step=100"),
                       manifest_key("run1/", "gpt--val_loss=2.90-step=200")}
