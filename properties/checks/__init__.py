"""The property checks, grouped by what they are about."""
