"""Training the tiny embedded demo model (not part of the installed package)."""
