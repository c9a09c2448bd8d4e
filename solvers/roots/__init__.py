"""Matrix-free root finders for ``z = g(z)``, one module per family; each registers itself."""

from . import picard  # noqa: F401
