"""router_client package."""
