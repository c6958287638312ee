"""Drop-in replacements for other libraries' APIs.

- :mod:`featattn.compat.flashlinear`: ``LinearAttention`` / ``LinearAttentionSmallVHD`` of
  flashy_linear_attention (``from flashlinear import ...``).
"""
