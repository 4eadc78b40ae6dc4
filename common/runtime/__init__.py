"""Process facilities every layer may use: device, seeds, signals, multi-process helpers."""
