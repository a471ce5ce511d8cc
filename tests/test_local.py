"""The local optimizers' declared protocol and registry (saef.core.local)."""

import inspect

import pytest

from saef.core.local import (LocalOptimizer, MomentumSGD, _members, available_optimizers, optimizer_class,
                             register_optimizer)


@pytest.mark.parametrize("name", available_optimizers())
def test_every_registered_optimizer_has_every_member_of_the_protocol(name):
    """Each registered class has every member LocalOptimizer declares, the methods with the protocol's
    parameters in its order, and an instance passes the runtime protocol check."""
    cls = optimizer_class(name)
    assert cls.name == name
    for member in _members():
        declared = getattr(LocalOptimizer, member, None)
        if callable(declared):
            ours = list(inspect.signature(getattr(cls, member)).parameters)
            theirs = list(inspect.signature(declared).parameters)
            assert ours[: len(theirs)] == theirs or "values" in theirs, (member, ours, theirs)
        elif member != "layout":  # set per instance
            assert hasattr(cls, member), member
    from saef.compress import Layout
    from saef.core import AlgorithmConfig

    config = AlgorithmConfig(optimizer=name, compressor="identity")
    assert isinstance(cls(Layout([2, 3]), config), LocalOptimizer)


def test_the_registry_refuses_a_duplicate_and_an_incomplete_class():
    """Registering a name twice needs overwrite=True; a class that lacks members is refused, naming them."""
    assert available_optimizers() == ("sgd", "adam")
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(MomentumSGD)

    class Half:
        name = "half"

        def update(self, state, grads, points):
            return grads

    with pytest.raises(ValueError, match="missing .*apply"):
        register_optimizer(Half)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam"):
        optimizer_class("half")
