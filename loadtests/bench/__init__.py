"""`make bench` (`python -m loadtests.bench`): lorafleet's speed and memory claims, each
measured side by side in one run. See `__main__` for the list and loadtests/NOTES.md for what
was tried on the hf engine."""
