"""The feature store (numpy + SQLAlchemy, no torch)."""
