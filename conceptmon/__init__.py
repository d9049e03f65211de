"""Concept-Monitor: watch what a network learns during training, neuron by neuron."""
__version__ = "0.1.0"
