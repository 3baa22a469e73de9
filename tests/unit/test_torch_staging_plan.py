"""pycoll/torch/staging.py without peers: how a large device tensor is cut into segments, and the
safe fallback when a method starts another number of calls than there are segments."""
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')")

from fake_device import FakeCopier, on_device  # noqa: E402
from pycoll.torch import staging  # noqa: E402


@pytest.fixture
def copier():
    c = FakeCopier(delay=0.001)
    staging.install_copier(c)
    yield c
    staging.install_copier(None)


def test_a_large_device_tensor_goes_as_segments_over_one_pooled_buffer(copier):
    dev = on_device(torch.arange(2500, dtype=torch.float32))
    st = staging.Staged([[dev]], "inout", segmented=True, segment_bytes=4000)
    segments = st.args[0]
    assert [s.numel() for s in segments] == [1000, 1000, 500]
    assert st.outputs(segments) == [dev]  # the Work's result is the caller's tensor, once
    for k, seg in enumerate(segments):
        st.before_call(k)  # segment k has landed on the host
        assert torch.equal(seg, torch.arange(1000 * k, 1000 * k + seg.numel(), dtype=torch.float32))
        seg.mul_(2)
    st.finish()
    assert torch.equal(dev, torch.arange(2500, dtype=torch.float32))  # no after_call: nothing copied back yet
    assert staging.pool_for(copier).made == 1


def test_one_call_for_all_segments_waits_for_all_and_copies_back_whole(copier):
    dev = on_device(torch.arange(2500, dtype=torch.float32))
    st = staging.Staged([[dev]], "inout", segmented=True, segment_bytes=4000)
    st.calls(1)  # e.g. a method that fuses its list into one call
    for seg in st.args[0]:  # every segment is on the host before the call starts
        seg.mul_(2)
    st.finish()
    assert torch.equal(dev, 2 * torch.arange(2500, dtype=torch.float32))
