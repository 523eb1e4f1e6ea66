"""UVC's budgeted gates with block skipping (pipeline/search/uvc.py)."""
from tests.pipeline.search.helpers import identity_block, search, teacher
from tests.pipeline.search.test_masked import mcfg


def test_uvc_skips_a_block_planted_as_identity(data, tiny_lut):
    lut, _ = tiny_lut
    r = search(identity_block(teacher(seed=6)), lut, data, mcfg("uvc", budget_fraction=0.7, mask_iters=60, min_blocks=1))
    assert not r.plan.blocks[1].keep and r.plan.blocks[0].keep
