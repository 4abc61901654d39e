"""A full disk, for real: the model repository on a tiny tmpfs (mounting needs root, as in CI).

A worker writes nothing at start (its log goes to the journal), so a full disk shows up in two places:
- `neuronserve compile` into it fails with a clear error and leaves no half-written directory behind;
- an artifact copied onto it that did not fit is cut short: its group refuses it with one log line and exits
  (gunicorn's boot-error code; the unit fails), while the other model on the same disk keeps serving.
The same path covers any damaged or unreadable artifact: the checksum of every bucket is verified at start.
(chmod 000 is no test here: the tests run as root, who reads it anyway; under systemd the group runs as the
unprivileged neuronserve user.)
"""
from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from faultkit import ready, record, start_stack, wait_until
from neuronserve.build.artifact import read_manifest
from neuronserve.build.compile import compile_model
from neuronserve.errors import ArtifactError

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes, unmounted at the end."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {r.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in mounted:
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], check=True)


def on_disk(path: Path) -> int:
    """Bytes the files under `path` take on a tmpfs (whole pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


@pytest.mark.parametrize("room", ["no bucket", "buckets but no tokenizer"])
def test_compile_onto_a_full_disk_is_a_clear_error(small_disk, model_repo, tiny_model_dir, room):
    # the traces (buckets share one file: each counted once)
    buckets = sum(on_disk(model_repo / "cls" / f) for f in {b.file for b in read_manifest(model_repo / "cls").buckets})
    disk = small_disk(PAGE * 64 if room == "no bucket" else buckets + PAGE * 16)
    with pytest.raises(ArtifactError, match="No space left on device") as e:
        compile_model(tiny_model_dir("text-classification"), disk / "cls", name="cls", task="text-classification",
                      backend="cpu", target="cpu", batch_sizes=[1, 4], sequence_lengths=[32])
    assert "cannot write" in str(e.value)
    assert list(disk.iterdir()) == []         # the staging directories were removed


def copy_until_full(src: Path, dst: Path) -> str:
    """Copy an artifact file by file, manifest first (as `cp -r` or rsync would, in some order), until the disk
    is full; returns the file it was writing when ENOSPC came."""
    manifest = read_manifest(src)
    order = ["manifest.json", manifest.tokenizer, *dict.fromkeys(b.file for b in manifest.buckets)]
    dst.mkdir()
    for name in order:
        try:
            if (src / name).is_dir():
                shutil.copytree(src / name, dst / name)
            else:
                shutil.copyfile(src / name, dst / name)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return name
    raise AssertionError(f"{src} fit on the disk: make the disk smaller")


def test_an_artifact_cut_short_by_a_full_disk_fails_its_group_alone(small_disk, model_repo, tmp_path_factory,
                                                                      basetemp):
    cls = model_repo / "cls"
    manifest = read_manifest(cls)
    room = (on_disk(model_repo / "emb") + on_disk(cls / "manifest.json") + on_disk(cls / manifest.tokenizer)
            + on_disk(cls / manifest.buckets[0].file) // 2)
    disk = small_disk(room)
    shutil.copytree(model_repo / "emb", disk / "emb")        # fits
    cut_at = copy_until_full(cls, disk / "cls")
    s = start_stack(tmp_path_factory.mktemp("full-disk-stack"), {"emb": {"groups": 1}, "cls": {"groups": 1}},
                    repo=disk)
    try:
        wait_until(lambda: any(name == "cls-0" for name, _ in s.exited()), 240, "cls-0 to exit")
        assert dict(s.exited()) == {"cls-0": 3}      # gunicorn's worker-boot error: no respawn loop
        log = s.log_path("cls-0").read_text(errors="replace")
        errors = [line for line in log.splitlines() if "cannot start cls-0" in line]
        assert len(errors) == 1 and "[ERROR]" in errors[0] and cut_at in errors[0], log
        assert "checksum mismatch" in errors[0] or "cannot read artifact" in errors[0], log
        assert "Traceback" not in log, log
        # the model beside it, on the same full disk, serves through nginx
        wait_until(lambda: ready(s.group_urls["emb-0"]), 240, "emb-0 ready")
        codes = [httpx.post(s.front_url + "/models/emb", json={"inputs": f"still here {i}"}, timeout=30).status_code
                 for i in range(20)]
        refused = httpx.post(s.front_url + "/models/cls", json={"inputs": "anyone?"}, timeout=30).status_code
        record(basetemp, "full_disk_at_start", {
            "cut_short_at": cut_at, "failed_group_exit_code": 3, "error_line": errors[0].split("] ", 3)[-1],
            "other_model_sent": len(codes), "other_model_failed": sum(c != 200 for c in codes),
            "dead_model_status_through_nginx": refused})
        assert codes == [200] * len(codes)
        assert refused == 502
        assert [name for name, _ in s.exited()] == ["cls-0"]
    finally:
        s.stop()
