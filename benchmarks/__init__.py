"""The speed benchmark behind ``tools/benchmark.py``: this project and effdet measured side by side."""
