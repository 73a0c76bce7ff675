"""eoforge.datasets: sensor and band registry, GeoTIFF readers, WebDataset shards, statistics.

Always import this package as ``eoforge.datasets``.
"""

if __name__ == "datasets":  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "The eoforge data package was imported as the bare name 'datasets' (the repository root "
        "is on sys.path). Import it as 'eoforge.datasets', and run pytest with "
        "'--import-mode=importlib' (the project's default) so HuggingFace 'datasets' is not shadowed."
    )
