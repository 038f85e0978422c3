"""A power cut during an install: whatever ``active.json`` names on disk afterwards is complete on disk.

kill -9 (tests/device_agent/test_crash_safety.py) keeps the page cache, so it
cannot show what a power cut loses: every write that was not fsynced. This test
records the install's fsyncs and renames as a write log and replays it against
that rule, cut after every event: a file's bytes survive only once they were
fsynced, a new or renamed folder entry only once its parent folder was fsynced
afterwards. At no cut may the surviving ``active.json`` name a version whose
files did not all survive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_agent.repository import Repository
from tests.support.bundles import write_tiny_bundle

MODEL = "tiny-classifier"


@dataclass(frozen=True)
class Event:
    kind: str  # "fsync" or "rename"
    path: Path  # fsync: the file or folder; rename: the destination
    source: Path | None = None  # rename: the source


@pytest.fixture
def write_log(monkeypatch):
    """Every os.fsync and os.rename/os.replace, in order, with resolved paths."""
    events: list[Event] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def logged_fsync(descriptor: int) -> None:
        fsync(descriptor)
        events.append(Event("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}"))))

    def logged_move(move):
        def moved(source, destination, *args, **kwargs):
            move(source, destination, *args, **kwargs)
            events.append(Event("rename", Path(destination).resolve(), Path(source).resolve()))

        return moved

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "rename", logged_move(rename))
    monkeypatch.setattr(os, "replace", logged_move(replace))
    return events


def _survives(events: list[Event], path: Path, cut: int) -> bool:
    """Whether ``path`` (a file, or a folder entry) is on disk after a power cut following ``events[:cut]``."""
    log = events[:cut]
    moves = [i for i, e in enumerate(log) if e.kind == "rename" and (path == e.path or e.path in path.parents)]
    if not moves:  # never renamed: its bytes were written and fsynced where it is
        return any(e.kind == "fsync" and e.path == path for e in log)
    last = moves[-1]
    move = log[last]
    before = move.source / path.relative_to(move.path)  # where it lived when it was written
    entry_durable = any(e.kind == "fsync" and e.path == move.path.parent for e in log[last + 1:])
    return entry_durable and _survives(events, before, last)


def test_every_version_active_json_can_name_after_a_cut_is_whole(tmp_path, keyring, signing_key, write_log):
    repository = Repository(tmp_path / "state", keyring)
    repository.start()
    write_tiny_bundle(tmp_path / "v1.ekb", signing_key, "1.0.0")
    repository.install(tmp_path / "v1.ekb")
    write_tiny_bundle(tmp_path / "v2.ekb", signing_key, "2.0.0")
    repository.install(tmp_path / "v2.ekb")

    models = (tmp_path / "state" / "models" / MODEL).resolve()
    active = models / "active.json"
    writes = [i for i, e in enumerate(write_log) if e.kind == "rename" and e.path == active]
    assert len(writes) >= 2, "each install rewrites active.json by a rename"
    for version, written in zip(("1.0.0", "2.0.0"), writes, strict=False):
        slot = models / "slots" / version
        files = [p for p in slot.rglob("*") if p.is_file()]
        assert files, f"the slot of {version} holds the bundle's files"
        for cut in range(written + 1, len(write_log) + 1):
            if not _survives(write_log, active, cut):
                continue  # the old active.json is what survives this cut
            lost = [str(p.relative_to(slot)) for p in files if not _survives(write_log, p, cut)]
            assert not lost, f"a power cut after event {cut} leaves active.json naming {version} without {lost}"
            break
        else:
            pytest.fail(f"active.json naming {version} never became durable (no fsync of {models} after its rename)")


def test_the_log_replay_catches_a_tree_renamed_before_its_files_were_fsynced(tmp_path):
    """The rule itself: a rename made durable is not enough when the files under it were never fsynced."""
    staging, slot = (tmp_path / "staging" / "x").resolve(), (tmp_path / "slots" / "1").resolve()
    log = [Event("rename", slot, staging), Event("fsync", slot.parent)]
    assert not _survives(log, slot / "model.onnx", len(log))
    synced = [Event("fsync", staging / "model.onnx"), *log]
    assert _survives(synced, slot / "model.onnx", len(synced))
    assert not _survives(synced, slot / "model.onnx", 2), "the rename alone, before its folder's fsync, is lost"
