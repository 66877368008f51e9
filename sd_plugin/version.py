"""The single source of sd_plugin's version (read by the build and by ``sd_plugin.__version__``)."""

__version__ = "0.1.0"
