"""`edit-r1-jax parity qwen2_5_vl` on a tiny random checkpoint: table rows present, tiny errors, exit code 0."""
import re

import pytest

from edit_r1_jax import cli
from edit_r1_jax.models.qwen2_5_vl import testing as T


@pytest.mark.slow
def test_parity_cli_tiny(tmp_path, capsys):
    T.tiny_torch_model(tie=True, seed=4).save_pretrained(str(tmp_path))
    rc = cli.main(["parity", "qwen2_5_vl", "--hf-dir", str(tmp_path), "--max-new-tokens", "8",
                   "--grids", "1x4x6,1x4x4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("vision.block.0", "vision.block.1 (full)", "vision.merger", "text.layer.1", "text.norm", "logits"):
        assert row in out
    rel = float(re.search(r"^logits\s+\S+\s+(\S+)", out, re.M).group(1))
    assert rel < 1e-5
    assert "greedy tokens: 8/8 equal" in out


def test_parity_help_lists_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["parity", "--help"])
    out = capsys.readouterr().out
    assert "qwen2_5_vl" in out and "flux" in out
