"""The canonical layer: passes that turn an exported model into the small, regular graph the relevance walk expects,
and the declared patterns (patterns.py) that every recogniser of a written-out construct is."""
