"""Matrix-free root finders for ``z = g(z)``, one module per family; each registers itself."""

from . import anderson, broyden, gd, newton_krylov, picard  # noqa: F401
