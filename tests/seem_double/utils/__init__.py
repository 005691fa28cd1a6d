"""Test double of SEEM's ``utils`` package."""
