"""The study record: a round trip through the stored attrs, records written before it had a
schema number, a newer schema refused, and the resume check naming the first field."""
from __future__ import annotations

import dataclasses

import pytest

from search.api import make_spec
from search.engine.config import FinetuneConfig
from search.errors import UserError
from search.study.create import check_resume
from search.study.spec import SCHEMA, StudySpec

SPEC = make_spec(model="lenet300", dataset="digits", profile="mobile-cpu", budget={"size_kb": 40.0},
                 finetune=FinetuneConfig(steps=7, k=4), n_trials=12)


def test_round_trip_and_k_belongs_to_the_machine():
    assert SPEC.finetune.k is None  # K is how a machine runs trials, not what the study is
    back = StudySpec.from_attrs(SPEC.to_attrs())
    assert back == SPEC and back.to_attrs() == SPEC.to_attrs()
    assert back.budget.size_kb == 40.0 and back.hparams == {"hidden": [300, 100]}
    assert back.hardware_profile().name == "mobile-cpu"


def test_a_record_written_before_the_schema_still_opens():
    # what the previous version stored: no "schema", no "weights" key without --weights
    old = {k: v for k, v in SPEC.to_attrs().items() if k not in ("schema", "weights")}
    spec = StudySpec.from_attrs(old, "old")
    assert spec.schema == 1 and spec.weights is None and SPEC.first_difference(spec) is None


def test_newer_schema_and_missing_record_are_one_line_errors():
    with pytest.raises(UserError, match=f"newer hwcompress .*reads up to {SCHEMA}"):
        StudySpec.from_attrs({**SPEC.to_attrs(), "schema": SCHEMA + 1}, "new")
    with pytest.raises(UserError, match="has no search spec"):
        StudySpec.from_attrs(None, "plain")
    with pytest.raises(UserError, match="broken search spec"):
        StudySpec.from_attrs({"model": "lenet300", "dataset": "digits"}, "half")


def test_resume_may_change_only_the_trial_budget():
    check_resume(SPEC, dataclasses.replace(SPEC, n_trials=40), "s")
    other = dataclasses.replace(SPEC, finetune=dataclasses.replace(SPEC.finetune, steps=8))
    with pytest.raises(UserError, match=r"created with finetune.steps=7 but this run asks for finetune.steps=8"):
        check_resume(SPEC, other, "s")
    # a space field names the flag behind it
    factorizing = dataclasses.replace(SPEC, space=dataclasses.replace(SPEC.space, ranks=(1.0, 0.5), forms=("svd",)))
    with pytest.raises(UserError, match=r"created with space.forms=None but this run asks for space.forms=\[.svd.\] "
                                        r"\(--factorize\); use the same value"):
        check_resume(SPEC, factorizing, "s")
