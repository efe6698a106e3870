"""dbops: keeps PostgreSQL recoverable."""

__version__ = "0.1.0"
