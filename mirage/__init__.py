"""mirage: synthetic images in, object detectors out."""

__version__ = "0.1.0"
