"""obliviate: the pure domain package.

The methods of the project as typed, keyword-only functions on numpy arrays and torch
modules: data loading, mutual information between images, DRMI reduction, models,
block-sequenced training and unlearning, and the extraction audit. Nothing here imports
Ray, Prefect or fsspec; randomness always comes in as an explicit generator or seed.
"""

__version__ = "0.1.0"
