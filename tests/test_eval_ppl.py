"""ppl by position: the streamed loss equals one full forward (float64), windows reset the state, buckets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.train_models import tiny_titans
from titans_train.eval.ppl import PositionLoss, bucket_of, bucket_range, evaluate_ppl
from titans_train.eval.stream import token_nll


@pytest.mark.parametrize("variant", ["lmm", "mag", "mac", "mal", "transformer"])
def test_streamed_loss_equals_full_forward_float64(variant):
    torch.manual_seed(0)
    model = tiny_titans(variant).double().eval()
    ids = torch.randint(0, 17, (51,))  # 50 targets: pieces of 7 cross memory chunks, windows and MAC segments
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    full = F.cross_entropy(logits[0], ids[1:], reduction="none")
    streamed = torch.cat([nll for _, nll in token_nll(model, ids, piece_len=7)])
    assert streamed.dtype == torch.float64
    assert (streamed - full).abs().max() <= 1e-8
    r = evaluate_ppl(model, [ids.numpy()], window=50, piece_len=7)
    assert abs(r["loss_streamed"] - float(full.mean())) <= 1e-8
    assert abs(r["loss_windowed"] - float(full.mean())) <= 1e-8  # one window covering everything: no reset


def test_windowed_resets_the_state_every_window():
    torch.manual_seed(1)
    model = tiny_titans("lmm").double().eval()
    ids = torch.randint(0, 17, (41,))
    windowed = torch.cat([nll for _, nll in token_nll(model, ids, piece_len=6, reset_every=16)])
    with torch.no_grad():  # reference: each window of 16 inputs on its own, fresh state
        ref = torch.cat([F.cross_entropy(model(ids[None, s:min(s + 16, 40)])[0][0], ids[s + 1:min(s + 17, 41)],
                                         reduction="none") for s in range(0, 40, 16)])
    assert (windowed - ref).abs().max() <= 1e-10
    streamed = torch.cat([nll for _, nll in token_nll(model, ids, piece_len=6)])
    assert (streamed[16:] - windowed[16:]).abs().max() > 1e-6  # the carried state changes late tokens


def test_position_buckets_double():
    assert bucket_of(np.array([0, 511, 512, 1023, 1024, 2047, 2048, 5000])).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert [bucket_range(b) for b in range(4)] == [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    acc = PositionLoss()
    acc.add(0, np.ones(600))
    acc.add(500, np.full(100, 3.0))  # positions 500..599: 12 in bucket 0, 88 in bucket 1
    assert acc.count == [512 + 12, 88 + 88]
    assert acc.by_bucket()[0] == pytest.approx((512 + 36) / 524)
    assert acc.loss() == pytest.approx((600 + 300) / 700)
    assert math.isnan(PositionLoss().loss())
