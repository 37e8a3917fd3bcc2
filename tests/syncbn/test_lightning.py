"""syncbn.lightning.SyncBatchNorm in a real Lightning Trainer (2 CPU processes, gloo): exact against BatchNorm.

One fit step with ``Trainer(strategy="ddp", accelerator="cpu", devices=2, plugins=[syncbn.lightning.SyncBatchNorm()])``
(``tests/syncbn/lightning_fit.py``) must leave both ranks with the running stats and weights that plain BatchNorm
gives on the concatenated global batch (float64), with synchronized layers while training and the original
BatchNorm classes back after ``fit``. Skipped where Lightning is not installed (it comes with the dev extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="Lightning is not installed (pip install lightning; the dev extra has it)")

from tests.syncbn import lightning_fit  # after the skip: it imports Lightning
from tests.syncbn.session_run import run_in_own_session


def test_lightning_plugin_is_exact_against_batchnorm_on_the_global_batch(tmp_path: Path) -> None:
    script = Path(lightning_fit.__file__)
    result = run_in_own_session([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, timeout=150)
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    plain = lightning_fit.bn_classes(lightning_fit.build_net())
    for rank in ranks:
        assert set(rank["classes_in_training"].values()) == {"SyncBatchNorm"}
        assert rank["classes_in_training"].keys() == plain.keys()
        assert rank["classes_after_fit"] == plain, "revert ran at the end of fit and restored the classes"

    # The reference: plain BatchNorm on both ranks' batches at once, one SGD step on the mean loss.
    seen = torch.cat([rank["seen"] for rank in ranks])
    assert seen.shape[0] == lightning_fit.SAMPLES
    x, y = seen[:, :-3].reshape(-1, 3, 6, 6), seen[:, -3:]
    assert not torch.equal(ranks[0]["seen"], ranks[1]["seen"]), "each rank trained on its own half"
    net = lightning_fit.build_net()
    nn.functional.mse_loss(net(x), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= lightning_fit.LR * p.grad
    expected = net.state_dict()
    for r, rank in enumerate(ranks):
        assert list(rank["state"]) == list(expected)
        for key, value in expected.items():
            torch.testing.assert_close(rank["state"][key], value, rtol=0, atol=1e-10, msg=f"rank {r}: {key}")
    # Local statistics would not give this: rank 0's own batch moves the running mean elsewhere.
    local = lightning_fit.build_net()
    local(x[: len(ranks[0]["seen"])])
    assert not torch.allclose(local[1].running_mean, expected["1.running_mean"], rtol=0, atol=1e-6)
