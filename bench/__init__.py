"""The benchmark; run it with `python -m bench`."""
