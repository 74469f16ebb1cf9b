"""Issue 17, item 6: an export is written into a directory beside the target and renamed into
place only when every file is written and checked. A failure midway leaves no half-written
directory (was: weights.safetensors alone, and a retry failed with "not empty"), a failed
--force export leaves the old export as it was, and a retry succeeds."""
from __future__ import annotations

import pytest

import models
from search.compression.plan import CHANNEL, make_plan
from search.engine.config import FinetuneConfig
from search.engine.finetune import Engine
from search.errors import UserError
from search.export import exporter
from search.export.exporter import export_plan

FILES = {"config.json", "weights.safetensors", "size.json", "model.onnx"}


@pytest.fixture(scope="module")
def setup():
    """lenet300 on digits with fresh weights (an export needs no trained ones) and one engine
    (one compile) for every export here."""
    task = models.get_task("lenet300", "digits")
    variables = task.init_variables()
    engine = Engine(task, variables, FinetuneConfig(steps=0, k=1))
    return task, variables, engine, make_plan([0.5, 0.25, 0.0], CHANNEL, [8, 4, 8], [8, 8, 8])


def _export(setup, out, **kw):
    task, variables, engine, plan = setup
    return export_plan(task, variables, plan, out, engine=engine, profile="mobile-cpu", **kw)


def _snapshot(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _fail_at(monkeypatch, step):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(exporter, step, boom)


# to_onnx: weights.safetensors is written, model.onnx is not; _price: all but config.json
@pytest.mark.parametrize("step", ["to_onnx", "_price"])
def test_a_failed_export_leaves_nothing_and_a_retry_succeeds(setup, tmp_path, monkeypatch, step):
    out = tmp_path / "out"
    _fail_at(monkeypatch, step)
    with pytest.raises(OSError, match="No space left"):
        _export(setup, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no target, no staging directory
    monkeypatch.undo()
    r = _export(setup, out)  # no --force needed
    assert r.out_dir == out and {p.name for p in out.iterdir()} == FILES
    assert list(tmp_path.iterdir()) == [out]


def test_a_failed_forced_export_keeps_the_old_one(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _export(setup, out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="not empty; pass --force"):
        _export(setup, out)  # refused, before any work
    _fail_at(monkeypatch, "to_onnx")
    with pytest.raises(OSError):
        _export(setup, out, force=True)
    assert _snapshot(out) == before and list(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    (out / "mine.txt").write_text("replaced only on success")
    _export(setup, out, force=True)
    assert {p.name for p in out.iterdir()} == FILES and list(tmp_path.iterdir()) == [out]


def test_an_unwritable_place_is_one_line_and_creates_nothing(setup, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot write the export beside .*a-file/out") as e:
        _export(setup, tmp_path / "a-file" / "out")
    assert "\n" not in str(e.value) and [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_an_existing_empty_directory_is_filled(setup, tmp_path):
    (tmp_path / "out").mkdir()
    _export(setup, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES
