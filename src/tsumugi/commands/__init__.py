"""Script bodies: parse flags, build the run configuration, call the library."""
