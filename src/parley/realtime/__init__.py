"""Real time: typed events, the broker between processes, the per-process hub and the
WebSocket/SSE transports (§8, §9)."""
