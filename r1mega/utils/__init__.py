"""Small utilities shared across r1mega (file IO, runtime environment)."""
