"""Which failures the Ray job recovers from (distributed/recovery.py), on the exceptions Ray
Train raises, built by hand: a loss is named, anything else is not retried."""
from __future__ import annotations

import json

import pytest
from ray.train.v2._internal.exceptions import (UserExceptionWithTraceback,
                                               WorkerHealthCheckFailedError)
from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError
from ray.train.v2.api.preemption import PreemptionInfo

from expertpar.distributed.calls import PeerLost, PeerStuck
from expertpar.distributed.recovery import Recoveries, describe_loss, root_error


def _from_workers(**by_rank) -> WorkerGroupError:
    """What Ray Train 2.60 raises: the workers' own exceptions by rank (it unwraps its
    UserExceptionWithTraceback; two tests keep the wrapper, should that change)."""
    return WorkerGroupError("boom", {int(k[1:]): v for k, v in by_rank.items()})


def test_dead_moe_actors_name_the_loss_before_any_workers_symptom():
    err = _from_workers(r0=PeerLost("the router failed in forward: expert actor 1 died"))
    assert describe_loss(err, ["expert actor 1 (hosting experts [(0, 1)])"]) == \
        "expert actor 1 (hosting experts [(0, 1)]) died or stopped answering"


def test_a_workers_lost_peer_is_a_loss_named_by_its_first_line_once_for_all_workers():
    stuck = "expert actor 0 did not answer forward within 5s"
    err = _from_workers(r0=PeerStuck(stuck),
                        r1=PeerStuck(stuck + "\nTraceback ..."))
    assert describe_loss(err, []) == "expert actor 0 did not answer forward within 5s"


def test_a_dead_train_worker_is_a_loss():
    err = _from_workers(r0=WorkerHealthCheckFailedError("worker 0 is gone",
                                                        RuntimeError("actor died")))
    assert describe_loss(err, []) == "train worker 0 died (worker 0 is gone)"


def test_a_preemption_is_a_loss_naming_the_nodes_and_workers():
    err = PreemptionError(PreemptionInfo(deadline_ms=None,
                                         preempted_node_to_ranks={"node-b": [1], "node-a": [0]}))
    assert describe_loss(err, []) == \
        "preemption of nodes ['node-a', 'node-b'] (train workers [0, 1])"


def test_a_bug_or_bad_data_is_not_a_loss_and_is_named_in_one_line():
    err = _from_workers(r0=ValueError("sample 17 of shard-3.tar: bad caption"))
    assert describe_loss(err, []) is None
    assert root_error(err) == "ValueError: sample 17 of shard-3.tar: bad caption"
    wrapped = _from_workers(r1=UserExceptionWithTraceback(ValueError("bad"), "Traceback ..."))
    assert root_error(wrapped) == "ValueError: bad"
    stuck = _from_workers(r0=UserExceptionWithTraceback(PeerStuck("expert actor 1 stuck"), "T"))
    assert describe_loss(stuck, []) == "expert actor 1 stuck"


def test_past_the_limit_every_loss_and_the_last_good_checkpoint_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss/total": 1.0}) + "\n")
    rec = Recoveries(tmp_path, limit=1)
    first = rec.add("router (hosting the gates) died", tmp_path / "step_5", 5)
    assert (first.failed_at_step, first.steps_lost) == (7, 2)
    with pytest.raises(RuntimeError) as err:
        rec.add("train worker 1 died", tmp_path / "step_5", 5)
    text = str(err.value)
    assert "2 losses, past train.max_recoveries=1" in text
    assert "(1) router (hosting the gates) died; (2) train worker 1 died" in text
    assert f"The last good checkpoint is {tmp_path / 'step_5'}" in text
    # The record on disk holds the recovery that was made, and survives into the next call.
    assert [r["loss"] for r in json.loads((tmp_path / "recoveries.json").read_text())] == \
        ["router (hosting the gates) died"]
    assert Recoveries(tmp_path, limit=3).earlier[0]["resumed_from_step"] == 5
