"""Test suite (a package so helper modules such as tests.render.validators can be imported)."""
