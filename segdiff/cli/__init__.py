"""The `python -m segdiff.X` command lines: each parses its flags, calls the library once, and fails the
same way (`common`)."""
