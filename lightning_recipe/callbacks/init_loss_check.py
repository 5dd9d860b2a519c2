"""InitLossCheck (placeholder: being written)."""

from lightning_recipe.callbacks._preflight import PreflightCheck


class InitLossCheck(PreflightCheck):
    pass
