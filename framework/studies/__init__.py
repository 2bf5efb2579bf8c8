"""Self-contained training studies built on the core, each a ``python -m`` command with its own
config in ``conf/``: Chiang & Yogatama's RoPE-vs-NoPE study (:mod:`.rope_vs_nope`, on the
synthetic key-value task of :mod:`.synthetic_kv` and the NoPE switch of :mod:`.positional`) and
RetMask (:mod:`.retmask`, DPO from :mod:`.training`). No run of ``python -m framework`` imports them.
"""
