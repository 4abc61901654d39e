"""neuronserve: serve Hugging Face models on every NeuronCore, GPU or CPU core of a host, without docker."""

__version__ = "0.2.0"
