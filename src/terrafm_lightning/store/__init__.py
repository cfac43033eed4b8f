"""The store format: the one thing the write path (prep) and the read path (data) share."""
