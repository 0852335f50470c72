"""Test helpers shipped with the package: tiny local models and a Hub-compatible server."""
