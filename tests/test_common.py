"""common.py: the commit a run's records name."""

from __future__ import annotations

import common
from common import code_commit, git_commit, set_loaded_commit


def test_code_commit_is_head_until_a_standby_sets_the_commit_it_loaded() -> None:
    """A queue job run by a standby records the commit its code was loaded from (workers.run
    sets it once it has checked it against HEAD), not HEAD at the moment a record is written."""
    assert code_commit() == git_commit()
    try:
        set_loaded_commit("f" * 40)
        assert code_commit() == "f" * 40 and git_commit() != "f" * 40
    finally:
        common._loaded_commit = None
    assert code_commit() == git_commit()
