"""kcompress: make trained Keras models small and fast for phones and edge devices.

Importing the package does not import TensorFlow; the submodules that need it do.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
