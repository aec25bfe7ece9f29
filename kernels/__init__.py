"""Host-independent token operations and methods: nothing here imports ComfyUI."""
