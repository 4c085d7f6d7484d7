"""`save` and `export_peft` write an artifact as a whole: a process killed (SIGKILL) at a
random point of a re-save, a save failing half-way (disk full) or two saves racing leave the
old artifact or the new one, which reloads as it was written; never a mix, never a stray
temporary directory after the next save."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import threading

import pytest
import torch
import torch.nn as nn

from peftplan.backends import (
    PlanError,
    adapter_tensors,
    applied_plan,
    apply,
    export_peft,
    import_peft,
    load,
    save,
)
from tests.backends.adapters import plan_for

TRIES = 20


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def _version(v: int) -> nn.Module:
    """A model tuned as version ``v``: LoRA alpha ``v + 1`` in the plan, every adapter entry ``v``."""
    model = _model()
    apply(
        model,
        plan_for(
            model,
            {"0": {"method": "lora", "rank": 8, "alpha": v + 1}, "2": {"method": "lora", "rank": 4, "alpha": v + 1}},
        ),
    )
    with torch.no_grad():
        for t in adapter_tensors(model).values():
            t.fill_(v)
    return model


def _version_of(model: nn.Module) -> int:
    """The version a reloaded model holds; fails when its plan and its tensors disagree."""
    alphas = {e["alpha"] for e in applied_plan(model).sites.values()}
    values = {float(t.detach().unique()[0]) for t in adapter_tensors(model).values() if t.unique().numel() == 1}
    n = len(adapter_tensors(model))
    assert (
        len(alphas) == 1
        and len(values) == 1
        and sum(t.unique().numel() == 1 for t in adapter_tensors(model).values()) == n
    ), f"mixed artifact: alphas {alphas}, tensor values {values}"
    (alpha,), (value,) = alphas, values
    assert alpha == value + 1, f"mixed artifact: the plan is version {alpha - 1}, the tensors version {value}"
    return int(value)


def _write_forever(write, directory) -> None:
    torch.set_num_threads(1)
    v = 1
    while True:
        write(_version(v), directory)
        v += 1


def _export(model, directory):
    export_peft(model, directory)


def _import(directory):
    return import_peft(_model(), directory)


def _load(directory):
    return load(_model(), directory)


WRITERS = {"save": (save, _load), "export_peft": (_export, _import)}


@pytest.mark.parametrize("kind", WRITERS)
def test_kill_during_resave_leaves_old_or_new(tmp_path, kind):
    write, read = WRITERS[kind]
    directory = tmp_path / "run"
    write(_version(0), directory)
    rng, seen = random.Random(0), set()
    ctx = multiprocessing.get_context("fork")
    for _ in range(TRIES):
        child = ctx.Process(target=_write_forever, args=(write, directory), daemon=True)
        child.start()
        child.join(rng.uniform(0.02, 0.2))  # lands anywhere in a save: the child does nothing else
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        seen.add(_version_of(read(directory)))
    assert len(seen) > 1  # the kills did land after some re-saves
    write(_version(99), directory)  # the next save cleans up what the killed ones left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert _version_of(read(directory)) == 99


@pytest.mark.parametrize("kind", WRITERS)
def test_failing_resave_keeps_the_old_artifact(tmp_path, monkeypatch, kind):
    write, read = WRITERS[kind]
    write(_version(1), tmp_path / "run")
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    module = "peftplan.backends.artifact" if kind == "save" else "peftplan.backends.peft_interop"
    monkeypatch.setattr(f"{module}.save_file", disk_full)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(_version(2), tmp_path / "run")
    assert _version_of(read(tmp_path / "run")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_concurrent_saves_into_one_directory(tmp_path):
    errors = []

    def saver(v):
        try:
            for _ in range(5):
                save(_version(v), tmp_path / "run")
        except BaseException as e:  # collected: a thread's exception does not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(v,)) for v in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _version_of(_load(tmp_path / "run")) in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_save_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PlanError, match=r"notes\.txt.*new or empty directory"):
        save(_version(1), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_written_files_get_the_umasks_mode_or_keep_the_replaced_ones(tmp_path):
    import stat

    from peftplan.backends.atomic import write_atomic

    old = os.umask(0o027)
    try:
        fresh = write_atomic(tmp_path / "front.html", "<html></html>")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's private 0o600
        os.chmod(fresh, 0o604)
        assert stat.S_IMODE(write_atomic(fresh, "again").stat().st_mode) == 0o604 and fresh.read_text() == "again"
    finally:
        os.umask(old)
