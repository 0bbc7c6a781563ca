import torch

from recbench.methods.blocks.projection import Projections, projection_bytes, projection_parameters


def test_projection_shapes_identity_and_bytes():
    dims = {"a/b0": 4, "a.b/b1": 8, "c/b0": 16}
    torch.manual_seed(0)
    proj = Projections(dims, 16)
    x4, x8, x16 = torch.randn(3, 4), torch.randn(3, 8), torch.randn(3, 16)
    assert proj("a/b0", x4).shape == (3, 16)
    assert proj("a.b/b1", x8).shape == (3, 16)
    assert proj("c/b0", x16) is x16 and not proj.has("c/b0")  # already D wide: no parameter
    assert proj.parameter_count() == projection_parameters(dims, 16) == (4 + 8) * 16
    assert proj.weight_bytes() == projection_bytes(dims, 16) == (4 + 8) * 16 * 4
    (proj("a/b0", x4).sum() + proj("a.b/b1", x8).sum()).backward()
    assert all(p.grad is not None for p in proj.parameters())
