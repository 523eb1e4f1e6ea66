"""The exception hierarchy (pipeline/core/errors.py): what crosses a DataLoader worker and a benchmark's bisection."""
import pickle

from vitrim.pipeline.core.errors import UnreachableBudget, UserError


def test_errors_keep_their_type_stage_and_fix_across_processes():
    for e in (UserError("data", "image a.png is unreadable", "remove it"), UnreachableBudget("budget 1 ms", "raise it")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.fix == e.fix and back.stage == e.stage
    assert isinstance(UnreachableBudget("x"), UserError) and UnreachableBudget("x").stage == "search"


def test_a_worker_reraise_keeps_only_the_message():
    """torch re-raises a DataLoader worker's exception as ``type(e)(formatted_traceback)``."""
    tb = 'Caught UserError in DataLoader worker process 0.\nTraceback (most recent call last):\n  File "x.py"\n' \
         "vitrim.pipeline.core.errors.UserError: [data] image a.png is unreadable"
    e = UserError(tb)
    assert e.what == "[data] image a.png is unreadable" and str(e) == e.what
