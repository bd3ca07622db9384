"""LayerwiseLoad.start's refused option combinations (no GPU needed: checked before anything is
enqueued)."""
import pytest

from kvstore.errors import InvalidArgumentError
from kvstore.gpu_movers import check_start_options


@pytest.mark.parametrize("background, lookahead", [(True, 2), (True, 1), (False, 0), (False, -1)])
def test_bad_lookahead_is_refused(background, lookahead):
    with pytest.raises(InvalidArgumentError, match="lookahead"):
        check_start_options(background=background, lookahead=lookahead)


@pytest.mark.parametrize("background, lookahead", [(True, None), (False, None), (False, 1), (False, 3)])
def test_allowed_combinations_pass(background, lookahead):
    check_start_options(background=background, lookahead=lookahead)
