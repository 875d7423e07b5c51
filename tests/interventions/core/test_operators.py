"""Algebraic identities of the pure operators, on plain tensors."""

import torch

from interventions import Direction, add, clamp, mean_ablate, project_out, projection, reference_ablate


def _basis(d=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(k, d, generator=g)).orthonormalized().vectors


def _h(shape=(2, 5, 16), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_project_out_leaves_zero_projection():
    U, h = _basis(), _h()
    out = project_out(h, U)
    assert projection(out, U).abs().max() < 1e-5
    # the orthogonal complement is untouched
    P_perp = torch.eye(16) - U.T @ U
    torch.testing.assert_close(out @ P_perp, h @ P_perp, atol=1e-5, rtol=0)


def test_project_out_is_idempotent():
    U, h = _basis(), _h()
    once = project_out(h, U)
    torch.testing.assert_close(project_out(once, U), once, atol=1e-6, rtol=0)


def test_alpha_zero_is_identity_bit_for_bit():
    U, h = _basis(), _h()
    assert torch.equal(project_out(h, U, alpha=0.0), h)
    assert torch.equal(add(h, U[:1], alpha=0.0), h)


def test_steering_composes_additively():
    v, h = torch.randn(1, 16), _h()
    torch.testing.assert_close(add(add(h, v, 0.7), v, 1.3), add(h, v, 2.0), atol=1e-5, rtol=0)
    # steering moves the projection by exactly alpha * |v|^2 for a single vector
    u = v / v.norm()
    shift = projection(add(h, v, 0.5), u) - projection(h, u)
    torch.testing.assert_close(shift, torch.full_like(shift, 0.5 * v.norm().item()), atol=1e-5, rtol=0)


def test_mean_ablate_sets_the_stored_mean():
    U, h = _basis(), _h()
    mean = torch.tensor([0.5, -1.0, 2.0])
    out = mean_ablate(h, U, mean)
    torch.testing.assert_close(projection(out, U), mean.expand(2, 5, 3), atol=1e-5, rtol=0)


def test_clamp_sets_the_value_and_zero_clamp_is_ablation():
    U, h = _basis(), _h()
    torch.testing.assert_close(projection(clamp(h, U, 3.0), U), torch.full((2, 5, 3), 3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(clamp(h, U, 0.0), project_out(h, U), atol=1e-6, rtol=0)


def test_reference_ablate_takes_the_references_projection_and_nothing_else():
    U, h, h_ref = _basis(), _h(), _h(seed=2)
    out = reference_ablate(h, U, projection(h_ref, U))
    torch.testing.assert_close(projection(out, U), projection(h_ref, U), atol=1e-5, rtol=0)
    P_perp = torch.eye(16) - U.T @ U
    torch.testing.assert_close(out @ P_perp, h @ P_perp, atol=1e-5, rtol=0)
    # against itself it is the identity; against a zero reference it is zero-ablation
    torch.testing.assert_close(reference_ablate(h, U, projection(h, U)), h, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        reference_ablate(h, U, torch.zeros(2, 5, 3)), project_out(h, U), atol=1e-6, rtol=0
    )


def test_operators_keep_dtype_and_do_not_write_in_place():
    U, h = _basis(), _h().to(torch.bfloat16)
    before = h.clone()
    out = project_out(h, U)
    assert out.dtype == torch.bfloat16
    assert torch.equal(h, before)


def test_gradients_flow_through_ablation():
    U = _basis()
    h = _h().requires_grad_(True)
    project_out(h, U).sum().backward()
    # d/dh of sum(h - h U^T U) = 1 - U^T U 1
    expected = (torch.ones(16) - U.T @ (U @ torch.ones(16))).expand(2, 5, 16)
    torch.testing.assert_close(h.grad, expected, atol=1e-5, rtol=0)
