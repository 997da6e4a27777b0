"""Session state: the record codec and the stores that keep records."""
