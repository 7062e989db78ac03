"""The kibble command line."""
