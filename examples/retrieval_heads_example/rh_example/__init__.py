"""Example third-party plugins for retrieval-heads (see docs/writing-a-plugin.md)."""
