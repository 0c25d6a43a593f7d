"""dermfs: a transparent encrypting FUSE filesystem for clinic image stores."""

__version__ = "0.1.0"
