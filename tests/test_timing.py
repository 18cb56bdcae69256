"""pcg.timing: the benchmarks' measuring helpers (the host-hidden mode of
paired_time_ms that bench/moe.py's chain column uses)."""
import pytest
import torch

from pcg.timing import device_time_ms, paired_time_ms


def test_paired_time_ms_rejects_a_hide_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="hide_host_us has 1 entries for 2 functions"):
        paired_time_ms([lambda: None, lambda: None], hide_host_us=[0.0])


def _cycles(us):
    return int(us * 1e-6 * torch.cuda.get_device_properties(0).clock_rate * 1e3)


@pytest.mark.gpu
def test_hidden_time_is_the_gpu_work_and_excludes_the_host():
    # The GPU work is a 300 us spin; the host then sleeps 2 ms before the end
    # event. Timed plainly the events see ~2.3 ms; hidden behind a spin longer
    # than the host's work they see only the 300 us.
    import time
    work = _cycles(300.0)

    def slow_host_call():
        torch.cuda._sleep(work)
        time.sleep(0.002)

    plain, hidden = paired_time_ms([slow_host_call, slow_host_call], warmup=1, reps=5,
                                   hide_host_us=[0.0, 20000.0])
    assert plain > 2.0, plain
    assert 0.25 < hidden < 0.6, hidden
    assert 0.25 < device_time_ms(slow_host_call, reps=3, hide_us=20000.0) < 0.6


@pytest.mark.gpu
def test_hidden_time_is_minus_one_when_the_spin_is_too_short():
    import time

    def host_bound():
        time.sleep(0.005)
        torch.cuda._sleep(_cycles(10.0))

    (hidden,) = paired_time_ms([host_bound], warmup=1, reps=2, hide_host_us=[1.0])
    assert hidden == -1.0
