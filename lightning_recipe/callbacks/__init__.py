"""Lightning callbacks: thin wiring of Lightning hooks to :mod:`lightning_recipe.diagnostics`."""
