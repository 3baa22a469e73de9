"""The torch Work objects of the "pycoll" backend: what a failed or finished Work reports
(exception(), is_success(), get_future_result()) matches what torch's own Works report."""
import datetime

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402
from torch._C._distributed_c10d import WorkResult  # noqa: E402

import pycoll.testing  # noqa: E402


def _works():
    out = {}
    w = dist.all_reduce(torch.ones(3), async_op=True)
    w.block_current_stream()  # results are on the host once the work is done
    out["ok"] = (w.is_completed(), w.is_success(), w.exception(), w.get_future_result().wait(), w.result()[0].tolist())
    pg = dist.new_group(backend="pycoll", timeout=datetime.timedelta(seconds=2))
    if dist.get_rank() == 0:  # rank 1 never joins: this all_reduce times out or loses its peer
        w = dist.all_reduce(torch.ones(3), group=pg, async_op=True)
        try:
            w.wait()
            out["wait"] = "returned"
        except RuntimeError as exc:
            out["wait"] = str(exc)
        out["failed"] = (w.is_completed(), w.is_success(), type(w.exception()).__name__,
                         w.get_future_result().wait())
    return out


@pytest.mark.timeout(60)
def test_a_work_reports_success_and_failure_as_torch_works_do():
    res = pycoll.testing.run(_works, 2, init="torch:pycoll", timeout=50)
    for out in res:
        assert out["ok"] == (True, True, None, int(WorkResult.SUCCESS), [2.0] * 3)
    done, success, exc_type, result = res[0]["failed"]
    assert done and not success and exc_type in ("CollectiveTimeout", "PeerFailure", "CoordinatorError")
    assert result == int(WorkResult.TIMEOUT if exc_type == "CollectiveTimeout" else WorkResult.COMM_ERROR)
    assert res[0]["wait"] != "returned"
