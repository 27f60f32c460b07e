"""PhotoEnhance Serve: GFPGAN and Real-ESRGAN on Ray Serve."""

__version__ = "0.1.0"
