"""Small helpers every layer may use: process groups, device capabilities, state-dict checks, atomic file writes,
input sizes."""
