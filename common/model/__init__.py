"""The network and what turns images into vectors."""
