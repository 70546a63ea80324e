"""The lowest layer: errors, configuration, crash-safe file io, locking, devices and model references.

Everything else in retrolm may import from here; nothing here imports from the rest of the package.
"""

from retrolm.core.errors import RetrolmError

__all__ = ["RetrolmError"]
