"""The aiohttp HTTPS service in front of the KZG engines."""
