import pytest
import torch
from kernel_utils import device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.moe_routing import moe_route


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (13, 6, 2), (37, 60, 6), (5, 3, 3)])
@pytest.mark.parametrize("scoring,renorm", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_moe_route_matches_reference(device, dtype, t, e, k, scoring, renorm):
    # Each row is a permutation of e values 0.125 apart (exact in bf16 up to |8|): no ties, so the top-k
    # choice is unique and both sides must agree on it exactly.
    logits = torch.stack([torch.randperm(e, device=device) for _ in range(t)]).float().mul(0.125).sub(2).to(dtype)
    got = moe_route(logits, k, scoring, renorm)
    want = ref.moe_route(logits, k, scoring, renorm)
    # Weights: fp32 math from the same rounded logits; tables must be exact.
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), atol=1e-6, rtol=1e-5)
    for name, g, w in zip(["ids", "counts", "offsets", "sorted_ids", "inverse"], got[1:], want[1:]):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w.cpu()), name


@pytest.mark.parametrize("device", device_params())
def test_moe_route_tables_consistent(device):
    logits = torch.randn(29, 16, device=device)
    _, ids, counts, offsets, sorted_ids, inverse = moe_route(logits, 4)
    flat = ids.flatten().long()
    assert int(offsets[-1]) == flat.numel() == int(counts.sum())
    for ex in range(16):
        seg = sorted_ids[int(offsets[ex]):int(offsets[ex + 1])].long()
        assert torch.all(flat[seg] == ex)
    assert torch.equal(sorted_ids[inverse.long()].long().cpu(), torch.arange(flat.numel()))


def test_moe_route_rejects_bad_args():
    with pytest.raises(ValueError, match="top_k 9 must be in"):
        moe_route(torch.randn(2, 8), 9)
