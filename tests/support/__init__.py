"""Helpers the tests share: building tiny models and data, running the CLI, driving the web page in a browser."""
