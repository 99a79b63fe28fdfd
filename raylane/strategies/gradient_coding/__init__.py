"""Gradient coding for stragglers: codes (strategies/gradient_coding/codes.py), sequential codes SR-SGC / M-SGC (strategies/gradient_coding/sgc.py), the
patience rule (patience.py), the coded driver and worker (strategy.py)."""
