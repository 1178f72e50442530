"""edge: a store-and-forward MQTT agent for edge devices."""

from edge.envelope import Envelope
from edge.errors import EdgeError

__all__ = ["EdgeError", "Envelope", "__version__"]

__version__ = "0.1.0"
