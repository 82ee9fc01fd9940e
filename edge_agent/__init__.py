"""edge-agent: moves complete DAQ files into a data lake and frees the buffer only once the lake holds them."""

__version__ = "0.1.0"
