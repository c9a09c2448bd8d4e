"""``python -m ode_bert`` (and ``accelerate launch -m ode_bert ...``): the ``ode-bert`` command line."""

from .cli import main

raise SystemExit(main())
