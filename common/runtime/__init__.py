"""Process facilities every layer may use."""
