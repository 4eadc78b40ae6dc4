"""SupCon training: the loop and what decides it."""
