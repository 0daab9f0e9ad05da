"""Development and test infrastructure: local servers started on 127.0.0.1."""
