"""The release wing."""
