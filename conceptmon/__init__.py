"""Concept-Monitor: watch what a network learns during training, neuron by neuron."""
__version__ = "0.1.0"

__all__ = ["Monitor", "lightning_callback", "__version__"]


def __getattr__(name):
    # Lazy: `import conceptmon` stays cheap; torch loads on first use of the API.
    if name in ("Monitor", "lightning_callback"):
        from . import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'conceptmon' has no attribute {name!r}")
