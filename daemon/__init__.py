"""berthd and its parts (see the README's map: api/, tasks/, storage/, grpc/, cli/, and the
pure leaves at this level: config, filters, paging, oci, reference, documents).

Importing this package must stay cheap and trio-free: the CLI imports from it.
"""

__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it from here
