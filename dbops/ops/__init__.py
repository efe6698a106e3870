"""Workflows (check, archive, backup, restore, failover), written against the protocols."""
