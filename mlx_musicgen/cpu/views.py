"""What the numpy forms (numpy_decoder.NumpyDecoder, numpy_t5.NumpyT5) share: they compute on zero-copy numpy
views of an MLX module's weights, and follow the module when its weights are replaced."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def weights(module: nn.Module) -> list[mx.array]:
    return [array for _, array in tree_flatten(module.parameters())]


class WeightViews:
    """The base of a numpy form of `module`: a subclass calls this __init__ first, then makes its views, and says
    in `supports` which modules it can view. A form is one thread's at a time (current() may make its views
    again); weights changed in place, not replaced, are not noticed."""

    def __init__(self, module: nn.Module):
        if not self.supports(module):
            raise ValueError(f"{type(self).__name__} computes on float32 weights in plain layers: this "
                             f"{type(module).__name__} has others: run the {type(module).__name__} itself")
        self.module = module
        self.held: list[mx.array] | None = weights(module)  # what the views are of; None: none made

    @staticmethod
    def supports(module: nn.Module) -> bool:
        raise NotImplementedError

    def current(self) -> bool:
        """Whether the module still holds the weights viewed (not replaced since: adapters merged, weights loaded,
        a dtype changed); if not, the views are made again where the module is still supported, or dropped (so
        as not to keep the old weights alive) until it is."""
        if self.held is not None:
            now = weights(self.module)
            if len(now) == len(self.held) and all(a is b for a, b in zip(now, self.held)):
                return True
        if not self.supports(self.module):
            self.__dict__ = {"module": self.module, "held": None}
            return False
        self.__init__(self.module)
        return True
