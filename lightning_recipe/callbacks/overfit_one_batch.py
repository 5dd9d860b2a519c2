"""OverfitOneBatch (placeholder: being written)."""

from lightning_recipe.callbacks._preflight import PreflightCheck


class OverfitOneBatch(PreflightCheck):
    pass
