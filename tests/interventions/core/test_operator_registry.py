"""Operators are registered objects: the spec and the runtime dispatch through the registry, users add
their own, and bad parameters are refused when the spec is built."""

import math

import pytest
import torch

from interventions import (
    OPERATORS,
    Direction,
    Intervention,
    InterventionSet,
    Operator,
    SpecError,
    project_out,
    projection,
    register_operator,
    site_module,
    unpack_output,
)


class ScaleProjection(Operator):
    """Multiply the projection onto the basis by ``value`` (0 = ablate, 1 = leave)."""

    name, needs = "scale_projection_test", frozenset({"basis", "value"})

    def apply(self, h, inputs, alpha):
        coords = projection(h, inputs.vectors)
        delta = (inputs.value - 1.0) * coords
        return h + alpha * (delta @ inputs.vectors.float()).to(h.dtype)


@pytest.fixture
def scale_operator():
    op = register_operator(ScaleProjection())
    yield op
    OPERATORS.pop(op.name)


def test_builtin_operators_are_registered_objects():
    assert {"project_out", "mean_ablate", "reference_ablate", "resample_ablate", "clamp", "add"} <= set(
        OPERATORS
    )
    assert all(isinstance(op, Operator) for op in OPERATORS.values())
    assert OPERATORS["resample_ablate"].resample and "reference" in OPERATORS["resample_ablate"].needs
    assert Intervention("add", torch.ones(1, 8)).op is OPERATORS["add"]


def test_a_registered_operator_runs_by_name(make_model, scale_operator):
    model = make_model().eval()
    d = Direction(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(m, a, o):
        seen["h"] = unpack_output(o)[0]

    handle = site_module(model, "resid_post", 0).register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    plain = seen["h"]
    spec = Intervention.from_dict(
        {"operator": scale_operator.name, "direction": d, "layers": [0], "value": 0.0}
    )
    iset = InterventionSet(model, [spec])
    with torch.no_grad(), iset, iset.phase("train"):
        site_module(model, "resid_post", 0).register_forward_hook(
            keep
        )  # after the set's hook: sees its output
        model(input_ids=ids)
    # value 0 scales the projection to zero: exactly project_out
    U = iset.ops[0].vectors
    torch.testing.assert_close(seen["h"], project_out(plain, U), atol=1e-5, rtol=0)
    with pytest.raises(SpecError, match="needs `value`"):
        Intervention(scale_operator.name, d)


def test_registration_is_checked():
    with pytest.raises(ValueError, match="registered already"):
        register_operator(OPERATORS["add"].__class__())
    bad = ScaleProjection()
    bad.needs = frozenset({"value"})
    with pytest.raises(ValueError, match="'basis' or 'vectors'"):
        register_operator(bad)
    with pytest.raises(SpecError, match="register_operator"):
        Intervention("no_such_operator", torch.ones(1, 8))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", True])
def test_non_finite_coefficients_are_refused_at_spec_time(bad):
    with pytest.raises(SpecError, match="coefficient"):
        Intervention("add", torch.ones(1, 8), coefficient=bad)


@pytest.mark.parametrize("bad", [math.nan, [1.0, math.inf], "high", [[1.0]]])
def test_non_finite_or_malformed_values_are_refused_at_spec_time(bad):
    with pytest.raises(SpecError, match="value"):
        Intervention("clamp", torch.ones(1, 8), value=bad)
