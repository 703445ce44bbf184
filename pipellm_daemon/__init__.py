"""pipellmd: the PipeLLM encryption sidecar."""

__version__ = "0.1.0"
