"""Who may ask and how often: API keys (``keys``) and per-key rate limits (``rate_limits``).

What one request may carry (its size, counts, sampling values) is not access: that is the request bounds.
"""
