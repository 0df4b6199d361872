"""The mapping tables (``<family>.toml``), installed as the package ``ckptconv.mappings`` so they
ship in the wheel and load with ``importlib.resources`` (see setup.py). This file only makes the
directory a regular package; the tables are data."""
