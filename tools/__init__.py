"""Developer tools for the token-reduction pack (not loaded by ComfyUI)."""
