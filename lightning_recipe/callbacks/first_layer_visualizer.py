"""FirstLayerVisualizer (placeholder: being written)."""

from lightning_recipe.callbacks._monitor import Monitor


class FirstLayerVisualizer(Monitor):
    def __init__(self, **kwargs):
        super().__init__(every_n_steps=1, **kwargs)
