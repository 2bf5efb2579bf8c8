"""The model side: loading (with the dequantised cache), the attention engine that reads and
edits every head, RoPE's dimension layout, head selection and greedy decoding."""
