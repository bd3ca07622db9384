"""LayerwiseLoad's refused paths and start() option combinations (no GPU needed: checked before
anything is made or enqueued; the GPU suite runs the start() refusals on a real handle, and the
C++ side's refusal of path 3 in test_validation_errors)."""
import numpy as np
import pytest

from kvstore.errors import InvalidArgumentError
from kvstore.gpu_movers import PATH_NAMES, LayerwiseLoad, check_path, check_start_options
from kvstore.layout import KVLayout


def test_background_with_the_callers_events_is_refused():
    # a CUDA graph waiting on the caller's events would bind to records the helper thread has not made yet
    with pytest.raises(InvalidArgumentError, match="caller's events"):
        check_start_options(background=True, lookahead=None, callers_events=True)


@pytest.mark.parametrize("background, lookahead", [(True, 2), (False, 0), (False, -1)])
def test_bad_lookahead_is_refused(background, lookahead):
    with pytest.raises(InvalidArgumentError, match="lookahead"):
        check_start_options(background=background, lookahead=lookahead, callers_events=False)


@pytest.mark.parametrize("background, lookahead, callers_events",
                         [(True, None, False), (False, None, True), (False, 3, True), (False, None, False)])
def test_allowed_combinations_pass(background, lookahead, callers_events):
    check_start_options(background=background, lookahead=lookahead, callers_events=callers_events)


@pytest.mark.parametrize("path", [3, 5, -1])
def test_unknown_path_is_refused(path):
    with pytest.raises(InvalidArgumentError, match=f"unknown path {path}"):
        check_path(path)


def test_known_paths_pass():
    for path in [0, *PATH_NAMES]:
        check_path(path)


def test_a_handle_with_the_removed_path_is_refused_before_the_gpu_is_touched():
    cache = [np.zeros((2, 4, 16, 2, 8), np.float16) for _ in range(2)]  # a CPU cache: check_gpu would refuse it
    with pytest.raises(InvalidArgumentError, match="staged_ce"):
        LayerwiseLoad(KVLayout.from_flash_attn(cache), [0], [0], 1, path=3)
